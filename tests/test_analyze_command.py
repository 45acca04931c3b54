"""`rankstream experiment analyze` on trained FwFM and DPLR-FwFM bundles: the post-hoc
fit's numbers are those of model_zoo.analysis, the dropped fields are the least
important ones in order, and both plots are written."""

import json

import pytest
import torch

from model_zoo.analysis import dplr_from_fwfm, field_importance
from model_zoo.bundle import save_bundle
from model_zoo.data.reader import load_split
from model_zoo.data.synth import SynthConfig, write_synthetic
from model_zoo.registry import build_model
from model_zoo.synthetic import PlantedConfig
from model_zoo.training import TrainConfig, evaluate, fit_in_memory, minibatches
from rayjobs.cli import main
from rayjobs.tune import load_splits


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("analyze") / "planted"
    config = PlantedConfig(context_fields=3, item_fields=3, vocab_size=20, structure="dplr", rank=2, seed=5)
    write_synthetic(path, SynthConfig(planted=config, rows=4000, progress=False))
    return path


def trained_bundle(data, directory, kind, **options):
    splits = load_splits(data)
    torch.manual_seed(0)
    model = build_model(splits.schema, kind, 4, sparse=True, **options)
    fit_in_memory(model, TrainConfig(epochs=3), splits.train, splits.valid)
    return save_bundle(directory, model.eval(), name=kind), model


def test_fwfm_bundle_gets_post_hoc_fits_spectra_and_field_drops(planted, tmp_path):
    bundle, fwfm = trained_bundle(planted, tmp_path / "bundle", "fwfm")
    out = tmp_path / "out"
    assert main(["experiment", "analyze", "--bundle", str(bundle), "--data", str(planted), "--out", str(out),
                 "--ranks", "1", "3", "--drop", "2"]) == 0  # fmt: skip
    report = json.loads((out / "analysis.json").read_text())
    test = load_split(planted, "test")
    assert [f["rank"] for f in report["post_hoc_dplr"]] == [1, 3]
    for fit in report["post_hoc_dplr"]:
        dplr, expected = dplr_from_fwfm(fwfm, fit["rank"])
        assert fit["test"]["auc"] == pytest.approx(evaluate(dplr, minibatches(test, 4096))["auc"], abs=1e-6)
        assert fit["error_spectrum"] == pytest.approx(expected.error_spectrum.tolist(), abs=1e-6)
    # A better fit at the higher rank: its largest error is no larger.
    assert report["post_hoc_dplr"][1]["error_spectrum"][0] <= report["post_hoc_dplr"][0]["error_spectrum"][0] + 1e-9
    ranking = [name for name, _ in field_importance(dplr_from_fwfm(fwfm, 3)[0])]
    assert [name for name, _ in report["field_importance"]] == ranking
    assert [d["dropped"] for d in report["field_drop"]] == [[], ranking[-1:], ranking[-2:]]
    assert report["field_drop"][0]["auc"] == pytest.approx(report["post_hoc_dplr"][1]["test"]["auc"], abs=1e-6)
    for picture in ("spectrum.png", "importance.png"):
        assert (out / picture).stat().st_size > 10_000


def test_dplr_bundle_gets_field_importance_only_and_other_kinds_a_clear_error(planted, tmp_path, capsys):
    bundle, _ = trained_bundle(planted, tmp_path / "bundle", "dplr_fwfm", rank=2)
    out = tmp_path / "out"
    assert main(["experiment", "analyze", "--bundle", str(bundle), "--data", str(planted), "--out", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert "post_hoc_dplr" not in report and not (out / "spectrum.png").exists()
    assert len(report["field_importance"]) == 6 and len(report["field_drop"]) == 4
    assert report["field_drop"][0]["auc"] == pytest.approx(report["test"]["auc"], abs=1e-6)
    fm_bundle, _ = trained_bundle(planted, tmp_path / "fm", "fm")
    capsys.readouterr()
    assert main(["experiment", "analyze", "--bundle", str(fm_bundle), "--data", str(planted), "--out", str(out)]) == 2
    assert "error: analyze takes an fwfm, pruned_fwfm or dplr_fwfm bundle, not fm" in capsys.readouterr().err
