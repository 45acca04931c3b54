"""``rankstream experiment scaling``: the embedding-collapse paper's scaling protocol
(Guo et al., ICML 2024, Table 1) on a prepared dataset.

For each multiplier t the single-embedding model gets embeddings of width t·k and the
multi-embedding one t sets of width k (the same total width; at t = 1 they are the same
model, trained once). Each is trained in-process (``model_zoo.training``) for every
seed and scored on the test split; information abundance is measured per field on the
table of total width t·k (the sets side by side), and per set. Writes scaling.json,
scaling.md, the IA plot (ia.png: fields sorted by vocabulary size) and the metric
against the multiplier (scaling.png).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from model_zoo.data.layout import load_schema
from model_zoo.data.reader import load_split
from model_zoo.diagnostics import embedding_tables, information_abundance, plot_information_abundance
from model_zoo.metrics import primary_metric
from model_zoo.models.base import RankingModel
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema
from model_zoo.training import TrainConfig, evaluate, fit_in_memory, minibatches
from rayjobs.options import FlatCommand, command

DeepKind = Literal["dnn", "dcnv2", "nfwfm"]


class ScalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: DeepKind = "dcnv2"
    dim: int = Field(default=10, ge=1, description="base embedding width k")
    multipliers: list[int] = Field(default=[1, 2, 3, 4], min_length=1)
    seeds: int = Field(default=1, ge=1, description="trainings per model and size (seeds 0 … n−1)")
    hidden: list[int] = Field(default=[128, 64], min_length=1, description="MLP widths; the first is per set")
    cross_layers: int = Field(default=2, ge=1, description="dcnv2 only")
    # l2 0: the command's default before its flags came from here.
    train: TrainConfig = TrainConfig(epochs=30, batch_size=2048, optimizer="adam", learning_rate=1e-3, l2=0.0, patience=3)


class ScalingJob(ScalingConfig):
    """`rankstream experiment scaling`: the experiment, its data and threads."""

    data: Path = Field(description="a prepared dataset (rankstream prepare / synth)")
    out: Path
    threads: int = Field(default=1, ge=1, description="torch threads (1 on a shared 2-core box)")


FLAGS = FlatCommand("Scaling", ScalingJob, sections={"train": TrainConfig}, exclude=("seed",))  # --seeds sets them


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("scaling", help="single vs multi-embedding as embeddings grow (Guo et al. 2024)")
    command(parser, FLAGS, run_scaling)


def run_scaling(job: ScalingJob) -> int:
    torch.set_num_threads(job.threads)
    config = ScalingConfig.model_validate(job.model_dump(exclude={"data", "out", "threads"}))
    summary = scaling_experiment(job.data, job.out, config)
    print(summary["markdown"])
    print(f"wrote {job.out}/scaling.json, scaling.md, ia.png, scaling.png")
    return 0


def scaling_experiment(data: str | Path, out: str | Path, config: ScalingConfig) -> dict:
    """Train every (variant, multiplier, seed); returns what scaling.json holds (plus the markdown)."""
    console = Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {name: load_split(data, name) for name in ("train", "valid", "test")}
    schema = load_schema(data)
    metric, _ = primary_metric(schema.task)
    runs = []
    for multiplier in sorted(set(config.multipliers)):
        # At 1× the multi-embedding model is the single-embedding one.
        for variant in ("se", "me") if multiplier > 1 else ("se",):
            for seed in range(config.seeds):
                started = time.perf_counter()
                model = build_variant(schema, config, variant, multiplier, seed)
                result = fit_in_memory(model, config.train.model_copy(update={"seed": seed}), splits["train"], splits["valid"])
                test = evaluate(model, minibatches(splits["test"], config.train.eval_batch_size))
                run = {
                    "variant": variant, "multiplier": multiplier, "seed": seed, "kind": model.kind,
                    "dim": model.dim, "sets": model.sets, "parameters": sum(p.numel() for p in model.parameters()),
                    "best_epoch": result.best_epoch, "valid": result.best_valid, "test": test,
                    "seconds": time.perf_counter() - started, **information_abundance_of(model),
                }  # fmt: skip
                runs.append(run)
                console.print(
                    f"{variant} {multiplier}× seed {seed}: test {metric} {test[metric]:.4f}, "
                    f"mean IA {run['mean_ia']:.2f} (per set {run['mean_ia_per_set']:.2f}), "
                    f"best epoch {result.best_epoch}, {run['seconds']:.0f} s"
                )
                # After every run, so that a long sweep leaves its results so far.
                summary = write_outputs(out, data, schema, config, metric, runs)
    return summary


def write_outputs(
    out: Path, data: str | Path, schema: FeatureSchema, config: ScalingConfig, metric: str, runs: list[dict]
) -> dict:
    """scaling.json, scaling.md and the plots from the runs so far; returns the JSON content plus the markdown."""
    rows = summarise(runs, metric)
    markdown = markdown_table(config, rows, metric)
    summary = {"config": config.model_dump(mode="json"), "data": str(data), "metric": metric, "rows": rows, "runs": runs}
    (out / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "scaling.md").write_text(markdown)
    vocab_sizes = {spec.name: spec.vocab_size for spec in schema.fields}
    plot_information_abundance({f"{r['variant']} {r['multiplier']}×": r["field_ia"] for r in rows}, vocab_sizes, out / "ia.png")
    plot_scaling(rows, metric, config, out / "scaling.png")
    return {**summary, "markdown": markdown}


def build_variant(schema: FeatureSchema, config: ScalingConfig, variant: str, multiplier: int, seed: int) -> RankingModel:
    """se: one set of width t·k; me: t sets of width k."""
    torch.manual_seed(seed)
    options: dict = {"hidden": config.hidden}
    if config.model == "dcnv2":
        options["cross_layers"] = config.cross_layers
    if variant == "se":
        return build_model(schema, config.model, config.dim * multiplier, **options)
    return build_model(schema, f"me_{config.model}", config.dim, sets=multiplier, **options)


def information_abundance_of(model: RankingModel) -> dict:
    """IA per field of the whole embedding (sets side by side: width t·k for both variants)
    and the mean of each set's own IA."""
    tables = embedding_tables(model)
    whole = torch.cat(tables, dim=1)
    field_ia, per_set = {}, []
    for position, spec in enumerate(model.schema.fields):
        start = int(model.schema.offsets[position])
        rows = slice(start, start + spec.vocab_size)
        field_ia[spec.name] = information_abundance(whole[rows])
        per_set.append(np.mean([information_abundance(table[rows]) for table in tables]))
    return {
        "field_ia": field_ia,
        "mean_ia": float(np.mean(list(field_ia.values()))),
        "mean_ia_per_set": float(np.mean(per_set)),
    }


def summarise(runs: list[dict], metric: str) -> list[dict]:
    """One row per (variant, multiplier): mean and std over seeds."""
    rows = []
    for key in dict.fromkeys((r["variant"], r["multiplier"]) for r in runs):
        group = [r for r in runs if (r["variant"], r["multiplier"]) == key]
        values = np.array([r["test"][metric] for r in group])
        rows.append({
            "variant": key[0], "multiplier": key[1], "kind": group[0]["kind"], "dim": group[0]["dim"],
            "sets": group[0]["sets"], "parameters": group[0]["parameters"], "seeds": len(group),
            f"test_{metric}": float(values.mean()), f"test_{metric}_std": float(values.std()),
            "test_logloss": float(np.mean([r["test"].get("logloss", np.nan) for r in group])),
            "mean_ia": float(np.mean([r["mean_ia"] for r in group])),
            "mean_ia_per_set": float(np.mean([r["mean_ia_per_set"] for r in group])),
            "field_ia": {f: float(np.mean([r["field_ia"][f] for r in group])) for f in group[0]["field_ia"]},
        })  # fmt: skip
    return rows


def markdown_table(config: ScalingConfig, rows: list[dict], metric: str) -> str:
    lines = [
        f"{config.model}, base k = {config.dim}, {rows[0]['seeds']} seed(s); test {metric} mean ± std over seeds; "
        "IA = mean over fields of the information abundance of the whole embedding "
        "(width t·k; ME: its sets side by side), per set = mean of each set's own IA. "
        "At 1× ME is the SE model.",
        "",
        f"| variant | × | dim × sets | parameters | test {metric} | logloss | mean IA | IA per set |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['multiplier']} | {row['dim']} × {row['sets']} | {row['parameters']:,} | "
            f"{row[f'test_{metric}']:.4f} ± {row[f'test_{metric}_std']:.4f} | {row['test_logloss']:.4f} | "
            f"{row['mean_ia']:.2f} | {row['mean_ia_per_set']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_scaling(rows: list[dict], metric: str, config: ScalingConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    base = [r for r in rows if r["multiplier"] == 1]
    for variant, label in (("se", "single embedding"), ("me", "multi-embedding")):
        series = base + [r for r in rows if r["variant"] == variant and r["multiplier"] > 1]
        axis.errorbar(
            [r["multiplier"] for r in series], [r[f"test_{metric}"] for r in series],
            yerr=[r[f"test_{metric}_std"] for r in series], marker="o", capsize=3, label=label,
        )  # fmt: skip
    axis.set_xticks(sorted({r["multiplier"] for r in rows}))
    axis.set_xlabel("embedding size (× base)")
    axis.set_ylabel(f"test {metric}")
    axis.set_title(f"{config.model}, base k = {config.dim}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
