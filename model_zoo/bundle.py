"""The model bundle: a self-contained directory that training writes and serving loads.

    config.json          format, model hyperparameters, training config, code version, model version
    schema.json          the feature schema
    vocab/               raw value -> index mapping (when the data came from `prepare`)
    weights.safetensors  the model's state dict (no pickle: loading runs no code from the bundle)
    metrics.json         validation and test metrics
    *.png                training curves and other plots

See docs/bundle.md for every tensor's name and shape.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model_zoo.models.base import RankingModel
from model_zoo.registry import model_from_hyperparameters
from model_zoo.schema import FeatureSchema
from model_zoo.vocab import Vocabulary

BUNDLE_FORMAT = "rankstream-bundle"
BUNDLE_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"


def code_version() -> str:
    try:
        return version("rankstream")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Bundle:
    path: Path
    model: RankingModel
    schema: FeatureSchema
    vocabulary: Vocabulary | None
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def model_version(self) -> str:
        """Content hash of the weights: the same weights always give the same version."""
        return str(self.config["model_version"])

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)


def save_bundle(
    directory: str | Path,
    model: RankingModel,
    *,
    name: str | None = None,
    vocabulary_dir: str | Path | None = None,
    metrics: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle; returns its path. Existing files of the same names are replaced."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    weights_path = directory / WEIGHTS_FILE
    save_file(state, str(weights_path))
    model.schema.save(directory / "schema.json")
    if vocabulary_dir is not None:
        target = directory / "vocab"
        if Path(vocabulary_dir).resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(vocabulary_dir, target)
    config = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": name or directory.name,
        "model": model.hyperparameters(),
        "train": train_config or {},
        "code_version": code_version(),
        "model_version": hashlib.sha256(weights_path.read_bytes()).hexdigest()[:16],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "metrics.json").write_text(json.dumps(metrics or {}, indent=2) + "\n")
    return directory


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle written by ``save_bundle``; any mismatch is a ValueError."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no model bundle at {directory} (config.json missing)")
    config = json.loads(config_path.read_text())
    if config.get("format") != BUNDLE_FORMAT or config.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise ValueError(
            f"{directory} is not a {BUNDLE_FORMAT} v{BUNDLE_FORMAT_VERSION} bundle "
            f"(format {config.get('format')!r} v{config.get('format_version')!r})"
        )
    schema = FeatureSchema.load(directory / "schema.json")
    model = model_from_hyperparameters(schema, config["model"])
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"weights in {directory} do not match its config: {error}") from None
    model.to(device).eval()
    vocabulary = Vocabulary.load(directory / "vocab") if (directory / "vocab").is_dir() else None
    metrics_path = directory / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return Bundle(directory, model, schema, vocabulary, config, metrics)
