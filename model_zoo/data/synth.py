"""Synthetic datasets from a planted model (``model_zoo.synthetic``) in the layout
``prepare`` writes, plus the planted parameters and the oracle's metrics per split.

Rows are drawn and written in chunks, and the oracle's AUC comes from fine logit
histograms, so memory stays bounded for tens of millions of rows. The vocabulary
tokens are the index strings ("2", "3", ...), so a raw value ``"7"`` maps to index 7.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, field_validator
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from model_zoo.data.layout import SCHEMA_FILE, SPLITS, STATS_FILE, VOCAB_DIR, arrow_schema, load_schema, weights_column
from model_zoo.data.splits import DEFAULT_FRACTIONS, SplitAssigner, check_fractions
from model_zoo.data.stats import DatasetStats
from model_zoo.data.writer import DEFAULT_FILE_ROWS, DEFAULT_ROW_GROUP_ROWS, SplitWriter, prepare_output
from model_zoo.schema import RESERVED_INDICES, Kind, Task
from model_zoo.synthetic import PlantedConfig, PlantedModel, planted_model
from model_zoo.vocab import FieldVocabulary, Vocabulary

PLANTED_JSON = "planted.json"
PLANTED_TENSORS = "planted.safetensors"
AUC_BINS = 1 << 18
AUC_LOGIT_RANGE = 30.0  # logits beyond ±30 share the end bins; their order is already certain


class SynthConfig(BaseModel):
    planted: PlantedConfig = Field(default_factory=PlantedConfig)
    rows: int = Field(ge=1, description="rows over all splits")
    split: tuple[float, float, float] = Field(default=DEFAULT_FRACTIONS, description="train,valid,test fractions")
    chunk_rows: int = Field(default=1 << 18, ge=1)
    row_group_rows: int = Field(default=DEFAULT_ROW_GROUP_ROWS, ge=1)
    file_rows: int = Field(default=DEFAULT_FILE_ROWS, ge=1)
    overwrite: bool = Field(default=False, description="replace a dataset already in the output directory")
    progress: bool | None = Field(default=None, description="a progress bar (unset: only on a terminal)")

    @field_validator("split")
    @classmethod
    def _fractions(cls, split: tuple[float, float, float]) -> tuple[float, float, float]:
        return check_fractions(split)


class OracleMetrics:
    """Streaming metrics of the planted logits: AUC (from histograms) and logloss for
    clicks, MSE for ratings."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.rows = 0
        self.loss_sum = 0.0
        self.positives = np.zeros(AUC_BINS, dtype=np.int64)
        self.negatives = np.zeros(AUC_BINS, dtype=np.int64)

    def add(self, labels: np.ndarray, logits: np.ndarray) -> None:
        labels = labels.astype(np.float64)
        self.rows += len(labels)
        if self.task == Task.regression:
            self.loss_sum += float(np.sum((logits - labels) ** 2))
            return
        # log(1 + e^-|z|) + max(z, 0) - y z: the stable form of the binary cross-entropy
        self.loss_sum += float(np.sum(np.logaddexp(0.0, logits) - labels * logits))
        scaled = (np.clip(logits, -AUC_LOGIT_RANGE, AUC_LOGIT_RANGE) + AUC_LOGIT_RANGE) / (2 * AUC_LOGIT_RANGE)
        bins = np.minimum((scaled * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        positive = labels > 0.5
        self.positives += np.bincount(bins[positive], minlength=AUC_BINS)
        self.negatives += np.bincount(bins[~positive], minlength=AUC_BINS)

    def result(self) -> dict[str, float]:
        if self.rows == 0:
            return {}
        if self.task == Task.regression:
            mse = self.loss_sum / self.rows
            return {"mse": mse, "rmse": float(np.sqrt(mse))}
        result = {"logloss": self.loss_sum / self.rows}
        total_positive, total_negative = int(self.positives.sum()), int(self.negatives.sum())
        if total_positive and total_negative:
            negatives_below = np.cumsum(self.negatives) - self.negatives
            pairs = np.sum(self.positives * (negatives_below + 0.5 * self.negatives), dtype=np.float64)
            result["auc"] = float(pairs / (total_positive * total_negative))
        else:
            result["auc"] = float("nan")
        return result


def write_synthetic(out: str | Path, config: SynthConfig) -> dict[str, object]:
    """Write ``out`` like ``prepare`` does, plus planted.json and planted.safetensors;
    return the stats (with the oracle's metrics per split)."""
    out = Path(out)
    prepare_output(out, config.overwrite)
    for extra in (PLANTED_JSON, PLANTED_TENSORS):
        (out / extra).unlink(missing_ok=True)
    planted = planted_model(config.planted)
    schema = planted.schema
    splitter = SplitAssigner(config.split, config.planted.seed)
    table_schema = arrow_schema(schema)
    writers = [SplitWriter(out, split, table_schema, config.row_group_rows, config.file_rows) for split in SPLITS]
    stats = DatasetStats(schema)
    oracles = [OracleMetrics(schema.task) for _ in SPLITS]
    disable = None if config.progress is None else not config.progress
    with tqdm(total=config.rows, unit="rows", unit_scale=True, desc="synth", disable=disable) as bar:
        for chunk, start in enumerate(range(0, config.rows, config.chunk_rows)):
            rows = min(config.chunk_rows, config.rows - start)
            rng = np.random.default_rng([config.planted.seed, 1, chunk])
            columns, labels, logits = planted.sample(rows, rng)
            table = _table(planted, columns, labels)
            assigned = splitter.assign(np.arange(start, start + rows, dtype=np.uint64))
            for number, split in enumerate(SPLITS):
                mask = assigned == number
                part = table.filter(pa.array(mask))
                writers[number].write(part)
                stats.add(split, part)
                oracles[number].add(labels[mask], logits[mask])
            bar.update(rows)
    for writer in writers:
        writer.close()

    schema.save(out / SCHEMA_FILE)
    index_vocabulary(planted).save(out / VOCAB_DIR)
    save_planted(planted, out)
    report = {
        "dataset": "synthetic",
        "structure": config.planted.structure,
        "label": schema.label,
        "task": schema.task.value,
        "split_fractions": list(config.split),
        "seed": config.planted.seed,
        **stats.to_dict(),
        "oracle": {split: oracle.result() for split, oracle in zip(SPLITS, oracles)},
    }
    (out / STATS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def index_vocabulary(planted: PlantedModel) -> Vocabulary:
    """Tokens "2", "3", ...: token i sits at index i."""
    return Vocabulary(
        FieldVocabulary(spec.name, [str(i) for i in range(RESERVED_INDICES, spec.vocab_size)])
        for spec in planted.schema.fields
    )


def save_planted(planted: PlantedModel, directory: Path) -> None:
    tensors = {"interactions": planted.interactions, "value_probabilities": planted.value_probabilities}
    for spec, embeddings, linear in zip(planted.schema.fields, planted.embeddings, planted.linear):
        tensors[f"embeddings.{spec.name}"] = embeddings
        tensors[f"linear.{spec.name}"] = linear
    save_file({name: np.ascontiguousarray(t) for name, t in tensors.items()}, str(directory / PLANTED_TENSORS))
    description = {
        "config": planted.config.model_dump(mode="json"),
        "bias": planted.bias,
        "fields": list(planted.schema.names),
        "tensors": PLANTED_TENSORS,
    }
    (directory / PLANTED_JSON).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def load_planted(directory: str | Path) -> PlantedModel:
    """The planted model a ``synth`` directory was drawn from."""
    directory = Path(directory)
    description = json.loads((directory / PLANTED_JSON).read_text(encoding="utf-8"))
    tensors = load_file(str(directory / description["tensors"]))
    config = PlantedConfig.model_validate(description["config"])
    schema = load_schema(directory)
    return PlantedModel(
        config,
        schema,
        [tensors[f"embeddings.{name}"] for name in description["fields"]],
        [tensors[f"linear.{name}"] for name in description["fields"]],
        tensors["interactions"],
        float(description["bias"]),
        tensors["value_probabilities"],
    )


def _table(planted: PlantedModel, columns: dict[str, object], labels: np.ndarray) -> pa.Table:
    """The sampled rows in the parquet layout (bags without their zero-weight padding)."""
    arrays: dict[str, pa.Array] = {}
    for spec in planted.schema.fields:
        if spec.kind == Kind.single:
            arrays[spec.name] = pa.array(np.asarray(columns[spec.name], dtype=np.int32))
        else:
            values, weights = columns[spec.name]
            present = weights > 0
            offsets = pa.array(np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32))
            arrays[spec.name] = pa.ListArray.from_arrays(offsets, pa.array(values[present].astype(np.int32)))
            arrays[weights_column(spec.name)] = pa.ListArray.from_arrays(
                offsets, pa.array(weights[present].astype(np.float32))
            )
    arrays[planted.schema.label] = pa.array(labels.astype(np.float32))
    return pa.table(arrays, schema=arrow_schema(planted.schema))
