"""Shared fixtures. Tests run single-threaded torch: CI has 2 cores and Ray/broker
processes share them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    """The real data samples beside the repository; tests using them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def planted_clicks(tmp_path_factory):
    """Planted DPLR click data (6 fields of 20 values, 12,000 rows) as loaded splits,
    with the planted model's own test AUC."""
    from model_zoo.data.synth import SynthConfig, write_synthetic
    from model_zoo.synthetic import PlantedConfig
    from rayjobs.tune import load_splits

    path = tmp_path_factory.mktemp("planted-clicks") / "data"
    config = PlantedConfig(context_fields=3, item_fields=3, vocab_size=20, structure="dplr", rank=2, seed=7)
    write_synthetic(path, SynthConfig(planted=config, rows=12000, progress=False))
    return load_splits(path), json.loads((path / "stats.json").read_text())["oracle"]["test"]["auc"]
