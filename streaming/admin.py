"""Topic administration: create the scorer's topics, idempotently."""

from __future__ import annotations

from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streaming.kafka_config import KafkaClientConfig, TopicNames


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
    admin = config.admin()
    try:
        existing = set(admin.list_topics())
        result = {name: "exists" for name in names if name in existing}
        for name in names:
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, partitions, replication_factor)])
                result[name] = "created"
            except TopicAlreadyExistsError:  # created meanwhile by someone else
                result[name] = "exists"
        return {name: result[name] for name in names}
    finally:
        admin.close()


def partition_counts(config: KafkaClientConfig, names: list[str]) -> dict[str, int]:
    """Partitions per topic (0 for a topic that does not exist)."""
    admin = config.admin()
    try:
        described = admin.describe_topics(names)
    finally:
        admin.close()
    counts = {name: 0 for name in names}
    for topic in described:
        if topic.get("error_code", 0) == 0:
            counts[topic["name"]] = len(topic["partitions"])
    return counts
