"""The scorer application's arguments: what `serve deploy` (cluster/serve_config.yaml),
`rankstream serve up` and a KubeRay RayService pass to ``serve_app.app:build_app``.

The model part (bundle, catalog) is the deployment's ``user_config``: changing it in a
config deploy reloads the model in place (hot reload) instead of restarting replicas.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from streaming.kafka_config import KafkaClientConfig, TopicNames
from streaming.protocol import ProtocolLimits


class ModelConfig(BaseModel):
    """What a replica scores with; the deployment's ``user_config``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bundle: str = Field(description="model bundle directory (written by `rankstream train`)")
    catalog: str | None = Field(
        default=None,
        description="item-features parquet (item_id column + raw item-field columns) for catalog auctions",
    )


class ServiceConfig(BaseModel):
    """Everything a replica is constructed with; a change restarts the replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kafka: KafkaClientConfig | None = Field(default=None, description="None: HTTP only, no Kafka consumer")
    topics: TopicNames = TopicNames()
    group_id: str = "rankstream-scorer"
    max_poll_records: int = Field(default=256, ge=1, description="auctions scored together per batch, at most")
    context_cache_size: int = Field(default=10_000, ge=0, description="LRU entries of encoded contexts per replica")
    limits: ProtocolLimits = ProtocolLimits()


class ScorerArgs(ServiceConfig):
    """Arguments of ``build_app``: the service, and optionally the model.

    The model reaches the replicas as the Scorer deployment's ``user_config``. In a Serve
    config file put it there (``deployments: [{name: Scorer, user_config: {bundle: …}}]``):
    editing only that reloads the model in place, whereas any change to ``args`` makes
    Serve rebuild the application and replace the replicas (still losing nothing)."""

    model: ModelConfig | None = Field(default=None, description="the initial user_config, when the config gives none")
    num_replicas: int = Field(default=1, ge=1, description="at most the auctions topic's partition count")

    def service(self) -> ServiceConfig:
        return ServiceConfig(**{name: getattr(self, name) for name in ServiceConfig.model_fields})
