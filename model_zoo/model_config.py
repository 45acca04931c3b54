"""One typed configuration per model kind: a pydantic union discriminated on ``model``.

Each class lists only its kind's options with their defaults (declared here once); an
unknown or misspelled option is an error. ``build`` makes the model through the
registry. The CLI flags of `rankstream train`, the Tune search spaces and the
bundle's training config all come from these classes.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from model_zoo.models.base import RankingModel
from model_zoo.models.deep import DEFAULT_HIDDEN
from model_zoo.models.dplr_fwfm import FactorInit
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema

Rank = Annotated[int, Field(ge=1, description="DPLR rank ρ (pruned_fwfm: keep the matched ρ(m+1) entries of R)")]
Sets = Annotated[int, Field(ge=1, description="embedding sets of a multi-embedding model")]
Hidden = Annotated[list[int], Field(min_length=1, description="widths of the hidden layers")]
CrossLayers = Annotated[int, Field(ge=1, description="DCNv2 cross layers")]


class ModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: int = Field(default=16, ge=1, description="embedding size k")
    # Options that steer training, not the model's constructor.
    training_options: ClassVar[frozenset[str]] = frozenset()
    takes_sparse: ClassVar[bool] = True

    @property
    def kind(self) -> str:
        return self.model  # type: ignore[attr-defined]

    def constructor_options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"model", "dim", *self.training_options}, exclude_none=True)

    def build(self, schema: FeatureSchema, sparse: bool = False) -> RankingModel:
        options = self.constructor_options()
        if self.takes_sparse:
            options["sparse"] = sparse
        return build_model(schema, self.kind, self.dim, **options)


class FMConfig(ModelOptions):
    model: Literal["fm"] = "fm"


class FwFMConfig(ModelOptions):
    model: Literal["fwfm"] = "fwfm"


class PrunedFwFMConfig(ModelOptions):
    """Trains as an FwFM, prunes R before ``prune_epoch``, fine-tunes (``PruneBeforeEpoch``)."""

    model: Literal["pruned_fwfm"] = "pruned_fwfm"
    rank: Rank = 2
    prune_epoch: int | None = Field(default=None, ge=1, description="pruned_fwfm: prune before this epoch (default epochs // 2)")
    training_options: ClassVar[frozenset[str]] = frozenset({"prune_epoch"})


class DPLRFwFMConfig(ModelOptions):
    model: Literal["dplr_fwfm"] = "dplr_fwfm"
    rank: Rank = 2
    factor_init: FactorInit = "fm"


class TensorFMConfig(ModelOptions):
    model: Literal["tensorfm"] = "tensorfm"
    orders: list[Annotated[int, Field(ge=2)]] = Field(default=[2, 3], min_length=1, description="tensorfm: interaction orders d_l")
    cp_ranks: list[Annotated[int, Field(ge=1)]] = Field(default=[2, 2], min_length=1, description="tensorfm: CP rank r_l of each order")
    factor_init: FactorInit = "fm"

    @model_validator(mode="after")
    def _one_rank_per_order(self) -> "TensorFMConfig":
        if len(self.orders) != len(self.cp_ranks):
            raise ValueError(f"give one CP rank per order: orders {self.orders}, CP ranks {self.cp_ranks}")
        return self


class RaFMConfig(ModelOptions):
    model: Literal["rafm"] = "rafm"
    ranks: list[int] | None = Field(default=None, description="rafm: embedding size per frequency level (ends with dim)")
    thresholds: list[int] | None = Field(default=None, description="rafm: training-count thresholds between levels")
    distillation: float = Field(default=1.0, ge=0, description="rafm: weight of the distillation loss")


class DPMFConfig(ModelOptions):
    model: Literal["dp_mf"] = "dp_mf"
    user_field: str | None = Field(default=None, description="dp_mf: the user field (default: the first single context field)")
    item_field: str | None = Field(default=None, description="dp_mf: the item field (default: the first single item field)")
    takes_sparse: ClassVar[bool] = False


class DNNConfig(ModelOptions):
    model: Literal["dnn"] = "dnn"
    hidden: Hidden = list(DEFAULT_HIDDEN)


class DCNv2Config(ModelOptions):
    model: Literal["dcnv2"] = "dcnv2"
    hidden: Hidden = list(DEFAULT_HIDDEN)
    cross_layers: CrossLayers = 2


class NFwFMConfig(ModelOptions):
    model: Literal["nfwfm"] = "nfwfm"
    hidden: Hidden = list(DEFAULT_HIDDEN)


class MultiFMConfig(ModelOptions):
    model: Literal["me_fm"] = "me_fm"
    sets: Sets = 2


class MultiFwFMConfig(ModelOptions):
    model: Literal["me_fwfm"] = "me_fwfm"
    sets: Sets = 2


class MultiDPLRFwFMConfig(ModelOptions):
    model: Literal["me_dplr_fwfm"] = "me_dplr_fwfm"
    sets: Sets = 2
    rank: Rank = 2
    factor_init: FactorInit = "fm"


class MultiDNNConfig(ModelOptions):
    model: Literal["me_dnn"] = "me_dnn"
    sets: Sets = 2
    hidden: Hidden = list(DEFAULT_HIDDEN)


class MultiDCNv2Config(ModelOptions):
    model: Literal["me_dcnv2"] = "me_dcnv2"
    sets: Sets = 2
    hidden: Hidden = list(DEFAULT_HIDDEN)
    cross_layers: CrossLayers = 2


class MultiNFwFMConfig(ModelOptions):
    model: Literal["me_nfwfm"] = "me_nfwfm"
    sets: Sets = 2
    hidden: Hidden = list(DEFAULT_HIDDEN)


MODEL_CONFIGS: tuple[type[ModelOptions], ...] = (
    FMConfig, FwFMConfig, PrunedFwFMConfig, DPLRFwFMConfig, TensorFMConfig, RaFMConfig, DPMFConfig,
    DNNConfig, DCNv2Config, NFwFMConfig,
    MultiFMConfig, MultiFwFMConfig, MultiDPLRFwFMConfig, MultiDNNConfig, MultiDCNv2Config, MultiNFwFMConfig,
)  # fmt: skip
ModelConfig = Annotated[Union[MODEL_CONFIGS], Field(discriminator="model")]  # noqa: UP007
CONFIG_BY_KIND: dict[str, type[ModelOptions]] = {c.model_fields["model"].default: c for c in MODEL_CONFIGS}
DEFAULT_KIND = "dplr_fwfm"
MODEL_CONFIG: TypeAdapter[ModelOptions] = TypeAdapter(ModelConfig)  # a dict (e.g. a Tune trial's) to its typed config
