"""Build any model of the zoo by name from its hyperparameters and the schema.

``me_<kind>`` is the multi-embedding version of ``<kind>`` with ``sets`` embedding sets.
"""

from __future__ import annotations

from typing import Any

from model_zoo.models.base import RankingModel
from model_zoo.models.dcnv2 import DCNv2
from model_zoo.models.dnn import DNN
from model_zoo.models.dp_mf import DPMF
from model_zoo.models.dplr_fwfm import DPLRFwFM
from model_zoo.models.fm import FM
from model_zoo.models.fwfm import FwFM
from model_zoo.models.multi_embedding import MultiEmbedding
from model_zoo.models.nfwfm import NFwFM
from model_zoo.models.pruned_fwfm import PrunedFwFM
from model_zoo.models.rafm import RaFM
from model_zoo.models.tensorfm import TensorFM
from model_zoo.schema import FeatureSchema

MODELS: dict[str, type[RankingModel]] = {
    FM.kind: FM,
    FwFM.kind: FwFM,
    PrunedFwFM.kind: PrunedFwFM,
    DPLRFwFM.kind: DPLRFwFM,
    TensorFM.kind: TensorFM,
    RaFM.kind: RaFM,
    DPMF.kind: DPMF,
    DNN.kind: DNN,
    DCNv2.kind: DCNv2,
    NFwFM.kind: NFwFM,
}
MULTI_EMBEDDING_BASES = (FM.kind, FwFM.kind, DPLRFwFM.kind)
# Deep models hold their sets themselves (per-set interaction and first layer, shared rest).
DEEP_MULTI_EMBEDDING_BASES = (DNN.kind, DCNv2.kind, NFwFM.kind)
KINDS = tuple(MODELS) + tuple(f"me_{kind}" for kind in MULTI_EMBEDDING_BASES)
KINDS += tuple(f"me_{kind}" for kind in DEEP_MULTI_EMBEDDING_BASES)


# Models swept over a rank: DPLR's ρ, the pruned FwFM's matched ρ(m+1) kept entries, and
# tensorFM of order 2 at CP rank ρ (W: 2ρm numbers against DPLR's ρ(m+1); R = M + Mᵀ of
# rank ≤ 2ρ, plus its diagonal).
RANKED_KINDS = (DPLRFwFM.kind, PrunedFwFM.kind, TensorFM.kind)


def rank_options(kind: str, rank: int | None) -> dict[str, Any]:
    """The model options that give ``kind`` the interaction rank ``rank`` (none for unranked kinds)."""
    if kind not in RANKED_KINDS or rank is None:
        return {}
    if kind == TensorFM.kind:
        return {"orders": [2], "cp_ranks": [rank]}
    return {"rank": rank}


def build_model(schema: FeatureSchema, kind: str, dim: int, **options: Any) -> RankingModel:
    """A fresh model; ``options`` are the model's own keyword arguments (rank, sparse, sets, …)."""
    if kind.startswith("me_") and kind[3:] in MULTI_EMBEDDING_BASES:
        sets = int(options.pop("sets", 2))
        return MultiEmbedding([MODELS[kind[3:]](schema, dim, **options) for _ in range(sets)])
    if kind.startswith("me_") and kind[3:] in DEEP_MULTI_EMBEDDING_BASES:
        return MODELS[kind[3:]](schema, dim, **{"sets": 2, **options})
    try:
        model_class = MODELS[kind]
    except KeyError:
        raise ValueError(f"unknown model {kind!r}; choose one of {list(KINDS)}") from None
    return model_class(schema, dim, **options)


def model_from_hyperparameters(schema: FeatureSchema, hyperparameters: dict[str, Any]) -> RankingModel:
    """Inverse of ``model.hyperparameters()``."""
    options = dict(hyperparameters)
    return build_model(schema, options.pop("kind"), options.pop("dim"), **options)
