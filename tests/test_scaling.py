"""``rankstream experiment scaling``: the single- vs multi-embedding protocol end to end
on planted data, and what its information abundance measures."""

import json

import pytest
import torch

from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec
from model_zoo.synthetic import PlantedConfig
from rayjobs.cli import main
from rayjobs.scaling import information_abundance_of


def test_scaling_writes_the_table_and_plots(tmp_path, capsys):
    data = tmp_path / "planted"
    planted = PlantedConfig(context_fields=3, item_fields=3, vocab_size=30, dim=4, seed=2)
    write_synthetic(data, SynthConfig(planted=planted, rows=3000, progress=False))
    out = tmp_path / "scaling"
    argv = [
        "experiment", "scaling", "--data", str(data), "--out", str(out), "--model", "nfwfm", "--dim", "3",
        "--multipliers", "1", "2", "--seeds", "2", "--epochs", "2", "--batch-size", "256", "--hidden", "8", "4",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "| me | 2 | 3 × 2 |" in capsys.readouterr().out
    result = json.loads((out / "scaling.json").read_text())
    assert [(r["variant"], r["multiplier"], r["kind"], r["dim"], r["sets"]) for r in result["rows"]] == [
        ("se", 1, "nfwfm", 3, 1), ("se", 2, "nfwfm", 6, 1), ("me", 2, "me_nfwfm", 3, 2),
    ]  # fmt: skip
    assert len(result["runs"]) == 6 and {r["seed"] for r in result["runs"]} == {0, 1}
    for row in result["rows"]:
        width = row["dim"] * row["sets"]
        assert 1.0 <= row["mean_ia_per_set"] <= row["dim"] and 1.0 <= row["mean_ia"] <= width
        assert 0.5 < row["test_auc"] <= 1.0 and row["test_auc_std"] >= 0.0
        assert set(row["field_ia"]) == {f"c{i}" for i in range(3)} | {f"i{i}" for i in range(3)}
    assert (out / "scaling.md").read_text().count("\n| ") == 4  # header + 3 rows
    assert (out / "ia.png").stat().st_size > 0 and (out / "scaling.png").stat().st_size > 0


def test_information_abundance_puts_the_sets_side_by_side():
    """Two sets each collapsed to one direction, along different directions of the rows:
    each set's IA is 1, the whole (k·M wide) embedding's IA is 2."""
    schema = FeatureSchema(fields=(FieldSpec(name="a", role="context", vocab_size=4), FieldSpec(name="b", role="item", vocab_size=4)))
    model = build_model(schema, "me_dnn", 3, sets=2)
    rows_a, rows_b = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        for embedding, rows in zip(model.embeddings, (rows_a, rows_b)):
            table = torch.outer(rows, torch.tensor([1.0, 2.0, 2.0]))  # rank one per field
            embedding.vectors.weight[:] = torch.cat([table, table])
    measured = information_abundance_of(model)
    assert measured["mean_ia_per_set"] == pytest.approx(1.0)
    assert measured["field_ia"] == pytest.approx({"a": 2.0, "b": 2.0})
    assert measured["mean_ia"] == pytest.approx(2.0)
