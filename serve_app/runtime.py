"""One loaded model and everything scoring needs beside it; no Ray, no Kafka here.

``ScoringRuntime.score_messages`` turns a batch of raw auction messages into one
reply per message: decode and validate each, map raw values through the bundle's
vocabulary, encode each distinct context once (or take it from the LRU cache) and
score every item of every auction in one call — the paper's Algorithm 1, batched.
A runtime never changes after construction: hot reload builds a new one and swaps it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from model_zoo.bundle import Bundle, load_bundle
from model_zoo.catalog import ItemCatalog
from model_zoo.context_cache import ContextCache
from model_zoo.models.base import ContextState
from serve_app.config import ModelConfig
from streaming.encode import AuctionEncoder, EncodedBatch
from streaming.protocol import (
    DEFAULT_LIMITS,
    Auction,
    ProtocolError,
    ProtocolLimits,
    Reason,
    decode_auction,
    encode_error,
    encode_reply,
    now_ms,
    unexpected_error,
)

CATALOG_ID_COLUMN = "item_id"


@dataclass(frozen=True)
class Reply:
    """The answer to one input message: a score reply, or an error for the dead-letter topic."""

    value: bytes
    auction_id: str | None
    reply_to: str | None = None  # the auction's own reply topic, if it named one
    reason: Reason | None = None  # set for error replies
    items: int = 0
    end_to_end_ms: float | None = None  # reply time - sent_at_ms, for score replies


@dataclass
class BatchReport:
    """What one call scored, for metrics."""

    replies: list[Reply]
    scoring_ms: float = 0.0
    auctions: int = 0
    items: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def load_catalog(path: str | Path, bundle: Bundle, encoder: AuctionEncoder) -> ItemCatalog:
    """The item catalog from a parquet file: an ``item_id`` column and raw item-field columns."""
    table = pq.read_table(path)
    if CATALOG_ID_COLUMN not in table.column_names:
        raise ValueError(f"catalog {path} has no {CATALOG_ID_COLUMN!r} column")
    columns = {name: table.column(name).to_pylist() for name in table.column_names if name != CATALOG_ID_COLUMN}
    try:
        items = encoder.encode_item_columns(columns, table.num_rows)
    except ProtocolError as error:
        raise ValueError(f"catalog {path}: {error}") from None
    try:
        return ItemCatalog(bundle.model, table.column(CATALOG_ID_COLUMN).to_pylist(), items)
    except NotImplementedError as error:
        raise ValueError(f"catalog {path}: {error}") from None


class ScoringRuntime:
    def __init__(
        self, config: ModelConfig, limits: ProtocolLimits = DEFAULT_LIMITS, context_cache_size: int = 10_000
    ) -> None:
        self.config = config
        self.limits = limits
        self.bundle = load_bundle(config.bundle)
        self.encoder = AuctionEncoder(self.bundle.schema, self.bundle.vocabulary, limits=limits)
        self.encoder.prepare_packed_columns()
        self.catalog = load_catalog(config.catalog, self.bundle, self.encoder) if config.catalog else None
        self.context_cache = ContextCache(context_cache_size)
        self._names = {self.bundle.name, self.bundle.model_version}

    @property
    def model_name(self) -> str:
        return self.bundle.name

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    def score_messages(
        self,
        messages: Sequence[bytes],
        received_at_ms: int | None = None,
        sources: Sequence[dict[str, object]] | None = None,
    ) -> BatchReport:
        """One reply per message, in input order; never raises for a bad message.
        ``sources`` (per message, e.g. its topic/partition/offset) go into error replies.
        Whatever fails on one message (its decoding, mapping, scoring or reply) is that
        message's error reply; the batch's other messages are scored as usual."""
        received_at_ms = now_ms() if received_at_ms is None else received_at_ms
        replies: list[Reply | None] = [None] * len(messages)
        accepted: list[tuple[int, Auction]] = []
        for position, message in enumerate(messages):
            try:
                auction = decode_auction(message, self.limits)
                if auction.model is not None and auction.model not in self._names:
                    raise ProtocolError(
                        Reason.unknown_model,
                        f"model {auction.model!r} is not loaded (serving {self.bundle.name!r} "
                        f"version {self.bundle.model_version})",
                        auction.auction_id,
                    )
                accepted.append((position, auction))
            except ProtocolError as error:
                replies[position] = self._error_reply(error, messages, position, sources)
            except Exception as error:
                replies[position] = self._error_reply(unexpected_error(error), messages, position, sources)
        report = BatchReport(replies=[])
        if accepted:
            self._score_accepted(accepted, messages, sources, replies, received_at_ms, report)
        report.replies = [r for r in replies if r is not None]
        for reply in report.replies:
            if reply.reason is not None:
                report.errors[reply.reason.value] = report.errors.get(reply.reason.value, 0) + 1
        return report

    def _score_accepted(
        self,
        accepted: list[tuple[int, Auction]],
        messages: Sequence[bytes],
        sources: Sequence[dict[str, object]] | None,
        replies: list[Reply | None],
        received_at_ms: int,
        report: BatchReport,
    ) -> None:
        started = time.perf_counter()
        encoded = self.encoder.encode_many([a for _, a in accepted], self.catalog.position if self.catalog else None)
        for index, error in encoded.errors:
            position = accepted[index][0]
            replies[position] = self._error_reply(error, messages, position, sources)
        rejected = {index for index, _ in encoded.errors}
        positions = [p for i, (p, _) in enumerate(accepted) if i not in rejected]
        scores: list[np.ndarray | Exception]
        try:
            scores = self._score(encoded)
            finite = not scores or bool(np.isfinite(np.concatenate(scores)).all())  # one pass for the batch
        except Exception:  # one auction the model fails on must not fail the others: score each alone
            scores, finite = [self._score_alone(auction) for auction in encoded.auctions], False
        scoring_ms = (time.perf_counter() - started) * 1000.0
        queue_wait = [max(0, received_at_ms - a.sent_at_ms) for a in encoded.auctions]
        served_at = now_ms()
        for position, auction, auction_scores, wait in zip(positions, encoded.auctions, scores, queue_wait):
            try:
                if not finite:
                    _check_scores(auction_scores)
                value = encode_reply(
                    auction,
                    auction_scores,
                    model=self.bundle.name,
                    model_version=self.bundle.model_version,
                    queue_wait_ms=wait,
                    scoring_ms=scoring_ms,
                    served_at_ms=served_at,
                )
            except Exception as error:
                failure = error if isinstance(error, ProtocolError) else unexpected_error(error)
                failure.auction_id = auction.auction_id
                replies[position] = self._error_reply(failure, messages, position, sources)
                continue
            replies[position] = Reply(
                value,
                auction.auction_id,
                auction.reply_to,
                items=len(auction),
                end_to_end_ms=float(max(0, served_at - auction.sent_at_ms)),
            )
            report.auctions += 1
            report.items += len(auction)
        report.scoring_ms = scoring_ms

    def _score_alone(self, auction: Auction) -> np.ndarray | Exception:
        """One auction's scores, or what scoring it raised."""
        try:
            encoded = self.encoder.encode_many([auction], self.catalog.position if self.catalog else None)
            if encoded.errors:
                return encoded.errors[0][1]
            return self._score(encoded)[0]
        except Exception as error:
            return error

    def _score(self, encoded: EncodedBatch) -> list[np.ndarray]:
        if not encoded.auctions:
            return []
        model = self.bundle.model
        with torch.inference_mode():
            state, row_of_context = self.context_state(encoded)
            item_scores = catalog_scores = None
            if len(encoded.item_context_index):
                item_scores = model.score_items(state, encoded.items, row_of_context[encoded.item_context_index])
            if len(encoded.catalog_positions):
                assert self.catalog is not None  # the encoder refused catalog ids without one
                catalog_scores = self.catalog.score(
                    state, encoded.catalog_positions, row_of_context[encoded.catalog_context_index]
                )
        return [s.numpy() for s in encoded.split_scores(item_scores, catalog_scores)]

    def context_state(self, encoded: EncodedBatch) -> tuple[ContextState, torch.Tensor]:
        """Encoded contexts of the batch (cached ones reused) and each auction's row in them."""
        return self.context_cache.encode(self.bundle.model.encode_context, encoded.context, encoded.context_keys())


    def _error_reply(
        self, error: ProtocolError, messages: Sequence[bytes], position: int, sources: Sequence[dict[str, object]] | None
    ) -> Reply:
        source = sources[position] if sources is not None else None
        value = encode_error(
            error, messages[position], source=source, max_original_bytes=self.limits.max_dead_letter_original_bytes
        )
        return Reply(value, error.auction_id, reason=error.reason)


def _check_scores(scores: np.ndarray | Exception) -> None:
    """Raise what scoring raised, or ``non_finite_score``: NaN is never a score reply."""
    if isinstance(scores, Exception):
        raise scores
    if not np.isfinite(scores).all():
        raise ProtocolError(Reason.non_finite_score, "the model gave a NaN or infinite score")
