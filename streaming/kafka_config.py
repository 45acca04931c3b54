"""Kafka client settings shared by every producer, consumer and admin client, so the
same code runs against the embedded broker and a real (SASL/SSL) Kafka cluster.

``KafkaFlags`` and ``TopicNames`` are every Kafka-facing command's flags (``KAFKA_SECTIONS``,
through rayjobs/options.py); without ``--bootstrap-servers`` (or $RANKSTREAM_BOOTSTRAP_SERVERS)
commands use the embedded broker that ``rankstream broker up`` started.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

BOOTSTRAP_ENV = "RANKSTREAM_BOOTSTRAP_SERVERS"
SASL_PASSWORD_ENV = "RANKSTREAM_KAFKA_SASL_PASSWORD"
# Tansu answers a waiting fetch some time after data arrives, the later the longer the
# fetch's max wait (docs/protocol.md): a short one keeps each hop (the scorer's and the
# load generator's consumers) short.
FETCH_MAX_WAIT_MS = 5

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]


class TopicNames(BaseModel):
    model_config = ConfigDict(frozen=True)

    auctions: str = Field(default="auctions", description="the topic the scorer reads auctions from")
    scores: str = Field(default="scores", description="the topic scores are written to")
    dlq: str = Field(default="auctions.dlq", description="the dead-letter topic of auctions that could not be scored")
    reply_to_pattern: str | None = Field(
        default=None,
        description="regular expression (whole name) of the topics an auction's reply_to may name besides the "
        "scores topic; by default none",
    )

    @field_validator("reply_to_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"reply_to_pattern {pattern!r}: {error}") from None
        return pattern

    def all(self) -> list[str]:
        return [self.auctions, self.scores, self.dlq]

    def reply_to_refusal(self, topic: str) -> str | None:
        """Why an auction may not have its reply sent to ``topic``, or None if it may:
        reply_to must not make the scorer a relay into any topic it can write."""
        if topic == self.scores:
            return None
        if topic.startswith("__"):
            return "an internal topic"
        if topic in (self.auctions, self.dlq):
            return "the scorer's own request or dead-letter topic"
        if self.reply_to_pattern is not None and re.fullmatch(self.reply_to_pattern, topic):
            return None
        allowed = f" or match {self.reply_to_pattern!r}" if self.reply_to_pattern is not None else ""
        return f"replies go to {self.scores!r}{allowed}"


class KafkaClientConfig(BaseModel):
    """Connection and security settings: ``librdkafka`` for the project's clients
    (confluent-kafka: the scorer, the load generator, topic admin); ``client_kwargs``
    the same for kafka-python (the tests' independent reader)."""

    model_config = ConfigDict(frozen=True)

    bootstrap_servers: str = Field(min_length=1, description="host:port[,host:port...]")
    client_id: str = "rankstream"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = Field(
        default=None,
        description=f"default: ${SASL_PASSWORD_ENV} (prefer the variable: it keeps the password out of shell history)",
    )
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True

    def client_kwargs(self) -> dict[str, Any]:
        """kafka-python's keyword arguments (KafkaProducer, KafkaConsumer), which ``librdkafka`` translates."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
        if self.sasl_plain_username is not None:
            kwargs["sasl_plain_username"] = self.sasl_plain_username
        if self.sasl_plain_password is not None:
            kwargs["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        elif self.sasl_mechanism is not None and os.environ.get(SASL_PASSWORD_ENV):
            # Deployed services take the password from their environment (a Kubernetes
            # Secret), so it never appears in a Serve config or the dashboard.
            kwargs["sasl_plain_password"] = os.environ[SASL_PASSWORD_ENV]
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_check_hostname"] = self.ssl_check_hostname
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                value = getattr(self, key)
                if value is not None:
                    kwargs[key] = str(value)
        return kwargs

    def librdkafka(self, **overrides: Any) -> dict[str, Any]:
        """The same settings as a confluent-kafka (librdkafka) configuration;
        ``overrides`` use librdkafka's dotted names."""
        kwargs = self.client_kwargs()
        names = {
            "client_id": "client.id",
            "security_protocol": "security.protocol",
            "sasl_mechanism": "sasl.mechanism",
            "sasl_plain_username": "sasl.username",
            "sasl_plain_password": "sasl.password",
            "ssl_cafile": "ssl.ca.location",
            "ssl_certfile": "ssl.certificate.location",
            "ssl_keyfile": "ssl.key.location",
        }
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        config.update({names[key]: value for key, value in kwargs.items() if key in names})
        if kwargs.get("ssl_check_hostname") is False:
            config["ssl.endpoint.identification.algorithm"] = "none"
        return {**config, **overrides}


class KafkaFlags(KafkaClientConfig):
    """A command's Kafka client flags: the client settings, with the address optional."""

    bootstrap_servers: str | None = Field(  # type: ignore[assignment]
        default=None,
        description=f"host:port list (default: ${BOOTSTRAP_ENV}, else the embedded broker of `rankstream broker up`)",
    )
    state_dir: Path | None = Field(default=None, description="embedded broker state (default: ~/.rankstream)")

    def client_config(self) -> KafkaClientConfig:
        """The client config the flags describe; falls back to the running embedded broker."""
        bootstrap = self.bootstrap_servers or os.environ.get(BOOTSTRAP_ENV)
        if not bootstrap:
            from streaming.broker import broker_status

            state = broker_status(self.state_dir)
            if state is None:
                raise ValueError(
                    f"no --bootstrap-servers (or ${BOOTSTRAP_ENV}) and no embedded broker running; "
                    "start one with `rankstream broker up`"
                )
            bootstrap = state.bootstrap_servers
        settings = {name: getattr(self, name) for name in KafkaClientConfig.model_fields}
        return KafkaClientConfig(**{**settings, "bootstrap_servers": bootstrap})


# The sections and flag names of a Kafka-facing command's configuration (rayjobs/options.py).
KAFKA_SECTIONS: dict[str, type[BaseModel]] = {"kafka": KafkaFlags, "topics": TopicNames}
TOPIC_FLAGS = {"auctions": "auctions_topic", "scores": "scores_topic", "dlq": "dlq_topic"}
