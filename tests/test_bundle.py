import json

import numpy as np
import pytest
import torch

from model_zoo.batch import FeatureBatch
from model_zoo.bundle import load_bundle, save_bundle
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.registry import build_model
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.vocab import FieldVocabulary, Vocabulary


@pytest.mark.parametrize("kind", ["fm", "fwfm", "pruned_fwfm", "dplr_fwfm", "me_dplr_fwfm"])
def test_bundle_round_trip_gives_identical_scores(tmp_path, kind):
    planted = planted_model(PlantedConfig(multi_fields=1, vocab_size=20, seed=1))
    torch.manual_seed(0)
    if kind == "pruned_fwfm":
        full = build_model(planted.schema, "fwfm", 8)
        with torch.no_grad():
            full.interaction_weights.normal_()
        model = PrunedFwFM.from_fwfm(full, 2)
    else:
        model = build_model(planted.schema, kind, 8, **({"rank": 3} if kind.endswith("dplr_fwfm") else {}))
    vocab_dir = tmp_path / "vocab-src"
    Vocabulary([FieldVocabulary("c0", ["a", "b"])]).save(vocab_dir)
    save_bundle(tmp_path / "bundle", model, vocabulary_dir=vocab_dir, metrics={"valid": {"auc": 0.7}})
    bundle = load_bundle(tmp_path / "bundle")
    columns, _, _ = planted.sample(50, np.random.default_rng(0))
    batch = FeatureBatch.from_columns(planted.schema, columns)
    with torch.no_grad():
        assert torch.equal(bundle.model(batch), model.eval()(batch))
    assert bundle.model.hyperparameters() == model.hyperparameters()
    assert bundle.vocabulary["c0"].lookup(["b"]).tolist() == [3]
    assert bundle.metrics == {"valid": {"auc": 0.7}}
    assert len(bundle.model_version) == 16


def test_model_version_follows_the_weights(tmp_path):
    planted = planted_model(PlantedConfig(vocab_size=10))
    model = build_model(planted.schema, "fm", 4)
    first = load_bundle(save_bundle(tmp_path / "a", model)).model_version
    again = load_bundle(save_bundle(tmp_path / "b", model)).model_version
    with torch.no_grad():
        model.bias.add_(1.0)
    changed = load_bundle(save_bundle(tmp_path / "c", model)).model_version
    assert first == again != changed


def test_bad_bundles_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model bundle"):
        load_bundle(tmp_path / "missing")
    planted = planted_model(PlantedConfig(vocab_size=10))
    path = save_bundle(tmp_path / "b", build_model(planted.schema, "dplr_fwfm", 4, rank=2))
    config = json.loads((path / "config.json").read_text())
    config["model"]["rank"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config"):
        load_bundle(path)
    config["format"] = "pickle"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is not a rankstream-bundle"):
        load_bundle(path)
