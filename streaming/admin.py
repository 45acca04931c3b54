"""Topic administration: create the scorer's topics, idempotently."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streaming.kafka_config import KafkaClientConfig, TopicNames

ADMIN_TIMEOUT_S = 30.0


def create_topics(
    config: KafkaClientConfig,
    topics: TopicNames | list[str] | None = None,
    partitions: int = 1,
    replication_factor: int = 1,
) -> dict[str, str]:
    """Create the topics that do not exist yet; returns topic -> "created" | "exists".
    Existing topics are left as they are, whatever their partition count."""
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    names = (topics or TopicNames()).all() if not isinstance(topics, list) else topics
    admin = AdminClient(config.librdkafka())
    existing = set(admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics)
    result = {name: "exists" for name in names if name in existing}
    missing = [NewTopic(name, partitions, replication_factor) for name in dict.fromkeys(names) if name not in existing]
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=ADMIN_TIMEOUT_S).items():
            try:
                future.result(timeout=ADMIN_TIMEOUT_S)
                result[name] = "created"
            except KafkaException as error:
                if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # else created meanwhile by someone else
                    raise
                result[name] = "exists"
    return {name: result[name] for name in names}


def partition_counts(config: KafkaClientConfig, names: list[str]) -> dict[str, int]:
    """Partitions per topic (0 for a topic that does not exist)."""
    listed = AdminClient(config.librdkafka()).list_topics(timeout=ADMIN_TIMEOUT_S).topics
    return {name: len(listed[name].partitions) if name in listed and listed[name].error is None else 0 for name in names}
