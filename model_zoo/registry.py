"""Build any model of the zoo by name from its hyperparameters and the schema."""

from __future__ import annotations

from typing import Any

from model_zoo.models.base import CTRModel
from model_zoo.models.dplr_fwfm import DPLRFwFM
from model_zoo.models.fm import FM
from model_zoo.models.fwfm import FwFM
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.schema import FeatureSchema

MODELS: dict[str, type[CTRModel]] = {
    FM.kind: FM,
    FwFM.kind: FwFM,
    PrunedFwFM.kind: PrunedFwFM,
    DPLRFwFM.kind: DPLRFwFM,
}


def build_model(schema: FeatureSchema, kind: str, dim: int, **options: Any) -> CTRModel:
    """A fresh model; ``options`` are the model's own keyword arguments (rank, sparse, …)."""
    try:
        model_class = MODELS[kind]
    except KeyError:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(MODELS)}") from None
    return model_class(schema, dim, **options)


def model_from_hyperparameters(schema: FeatureSchema, hyperparameters: dict[str, Any]) -> CTRModel:
    """Inverse of ``model.hyperparameters()``."""
    options = dict(hyperparameters)
    return build_model(schema, options.pop("kind"), options.pop("dim"), **options)
