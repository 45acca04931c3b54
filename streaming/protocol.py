"""The msgpack wire protocol between producers and the scorer (docs/protocol.md).

Three messages, each a msgpack map carrying ``version``:
- auction request (topic ``auctions``), decoded and checked by ``decode_auction``;
- score reply (topic ``scores`` or the auction's ``reply_to``), ``encode_reply``;
- error reply (topic ``auctions.dlq``), ``encode_error``.

``decode_auction`` checks the envelope (keys, types, sizes, item shapes). Feature
values are checked where they are touched anyway, when ``encode.AuctionEncoder``
maps them through the vocabulary; both raise ``ProtocolError`` with a reason code.
No pickle, no msgpack extension types: only plain maps, arrays, strings, numbers, and
binary for packed integer columns (``pack_column``).
"""

from __future__ import annotations

import re
import reprlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1

ItemId = str | int


class Reason(str, Enum):
    """Machine-readable reasons of error replies (the ``reason`` field)."""

    malformed_msgpack = "malformed_msgpack"  # not decodable (truncated, bad UTF-8, ext types, non-string map keys)
    malformed_json = "malformed_json"  # HTTP only: a JSON request body that does not parse
    not_a_map = "not_a_map"  # decodes, but not to a map
    unsupported_version = "unsupported_version"
    missing_field = "missing_field"  # a required key is absent
    unknown_field = "unknown_field"  # a key the protocol or the model's schema does not know
    wrong_type = "wrong_type"
    invalid_value = "invalid_value"  # right type, value not allowed (top_k < 1, weight <= 0, bad topic name, ...)
    non_finite = "non_finite"  # NaN or infinity
    too_many_items = "too_many_items"
    too_many_values = "too_many_values"  # a multi-valued field's bag over the limit
    message_too_large = "message_too_large"
    empty_items = "empty_items"
    unknown_model = "unknown_model"  # raised by the scorer: no such model loaded
    unknown_catalog_item = "unknown_catalog_item"
    catalog_unavailable = "catalog_unavailable"  # catalog ids sent but the model has no item catalog
    scoring_failed = "scoring_failed"  # the scorer failed on a valid auction
    non_finite_score = "non_finite_score"  # the model gave NaN or infinity (e.g. weights beyond float32's range)
    invalid_reply_to = "invalid_reply_to"  # raised by the Kafka loop: the scorer may not or cannot reply there
    reply_rejected = "reply_rejected"  # raised by the Kafka loop: the broker refused the reply for good


MAX_ERROR_MESSAGE_CHARS = 1_000
# Values quoted in error messages: a few levels, elements and characters, whatever their size.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxdict, _QUOTE.maxlist, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 3, 8, 8, 80, 80, 40


class ProtocolError(ValueError):
    """A message that cannot be scored; ``auction_id`` is set when it could be read.
    The message is cut to ``MAX_ERROR_MESSAGE_CHARS``: dead letters stay small."""

    def __init__(self, reason: Reason, message: str, auction_id: str | None = None) -> None:
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        self.auction_id = auction_id


def unexpected_error(error: BaseException, auction_id: str | None = None) -> ProtocolError:
    """A failure no check foresaw (a bug, or an input nobody thought of), as the
    ``scoring_failed`` error of the one message it happened on."""
    return ProtocolError(Reason.scoring_failed, f"{type(error).__name__}: {error}", auction_id)


class ProtocolLimits(BaseModel):
    """Size limits enforced while decoding and encoding."""

    model_config = ConfigDict(frozen=True)

    max_message_bytes: int = Field(default=1_000_000, ge=64, description="Kafka's default message.max.bytes is about 1 MB")
    max_items: int = Field(default=1_000, ge=1)
    max_bag_values: int = Field(default=256, ge=1, description="values of one multi-valued field")
    max_id_length: int = Field(default=256, ge=1, description="characters of auction and item ids")
    max_value_length: int = Field(default=1_024, ge=1, description="characters of one raw string value")
    # msgpack decoding limits, checked by the C decoder before anything is built; nesting
    # deeper than msgpack's own fixed limit (1,024 levels) is malformed_msgpack too.
    max_string_bytes: int = Field(default=16_384, ge=1, description="bytes of one msgpack string (keys included)")
    max_binary_bytes: int = Field(default=65_536, ge=8, description="bytes of one msgpack binary (a packed column)")
    max_array_length: int = Field(default=65_536, ge=1, description="elements of one msgpack array")
    max_map_length: int = Field(default=65_536, ge=1, description="entries of one msgpack map")
    max_dead_letter_original_bytes: int = Field(
        default=65_536, ge=0, description="bytes of the original message kept in its dead letter"
    )


DEFAULT_LIMITS = ProtocolLimits()

_AUCTION_KEYS = frozenset({"version", "auction_id", "sent_at_ms", "model", "context", "items", "top_k", "reply_to"})
_REQUIRED_KEYS = ("auction_id", "sent_at_ms", "context", "items")
_ITEM_KEYS = frozenset({"item_id", "features"})
_ID_TYPES = frozenset({str, int})
# Kafka's legal topic names.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


@dataclass(frozen=True, slots=True)
class Auction:
    """A decoded auction request whose envelope is valid."""

    auction_id: str
    sent_at_ms: int
    context: dict[str, Any]  # field -> raw value | list of raw values | {raw value: weight}
    item_ids: list[ItemId]  # in item order, for every item form
    item_features: list[dict[str, Any]] | None = None  # rows form: per item, field -> raw value
    item_columns: dict[str, list[Any] | bytes] | None = None  # columns form: field -> one raw value per item, or packed
    model: str | None = None
    top_k: int | None = None
    reply_to: str | None = None
    size_bytes: int = 0

    @property
    def is_catalog(self) -> bool:
        """Items given as catalog ids only (no features)."""
        return self.item_features is None and self.item_columns is None

    def __len__(self) -> int:
        return len(self.item_ids)


# -- auctions ---------------------------------------------------------------------
def encode_auction(
    auction_id: str,
    context: Mapping[str, Any],
    items: Sequence[Mapping[str, Any]] | Sequence[ItemId] | Mapping[str, Any],
    *,
    sent_at_ms: int | None = None,
    model: str | None = None,
    top_k: int | None = None,
    reply_to: str | None = None,
) -> bytes:
    """An auction request. ``items``: a list of ``{"item_id", "features"}`` maps (rows
    form), a list of catalog ids, or ``{"item_id": [...], "features": {field: [...]}}``
    (columns form)."""
    message: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "auction_id": auction_id,
        "sent_at_ms": now_ms() if sent_at_ms is None else sent_at_ms,
        "context": dict(context),
        "items": dict(items) if isinstance(items, Mapping) else list(items),
    }
    for key, value in (("model", model), ("top_k", top_k), ("reply_to", reply_to)):
        if value is not None:
            message[key] = value
    return msgpack.packb(message, use_bin_type=True)


def decode_auction(data: bytes, limits: ProtocolLimits = DEFAULT_LIMITS) -> Auction:
    """Decode and check an auction request's envelope; raises ProtocolError."""
    if len(data) > limits.max_message_bytes:
        raise ProtocolError(Reason.message_too_large, f"{len(data)} bytes, limit {limits.max_message_bytes}")
    message = unpack(data, limits)
    if type(message) is not dict:
        raise ProtocolError(Reason.not_a_map, f"top level is {_type_name(message)}, expected a map")
    auction_id = message.get("auction_id")
    known_id = auction_id if type(auction_id) is str and 0 < len(auction_id) <= limits.max_id_length else None
    try:
        return _check_auction(message, len(data), limits)
    except ProtocolError as error:
        error.auction_id = known_id
        raise


def _check_auction(message: dict[str, Any], size: int, limits: ProtocolLimits) -> Auction:
    _check_version(message)
    unknown = message.keys() - _AUCTION_KEYS
    if unknown:
        raise ProtocolError(Reason.unknown_field, f"unknown keys {quote_keys(unknown)}")
    for key in _REQUIRED_KEYS:
        if key not in message:
            raise ProtocolError(Reason.missing_field, f"{key!r} is required")
    auction_id = _string(message, "auction_id", limits.max_id_length)
    sent_at_ms = message["sent_at_ms"]
    if type(sent_at_ms) is not int:
        raise ProtocolError(Reason.wrong_type, f"'sent_at_ms' is {_type_name(sent_at_ms)}, expected an integer")
    if sent_at_ms < 0:
        raise ProtocolError(Reason.invalid_value, "'sent_at_ms' is negative")
    context = message["context"]
    if type(context) is not dict:
        raise ProtocolError(Reason.wrong_type, f"'context' is {_type_name(context)}, expected a map")
    items = message["items"]
    if type(items) is dict:
        item_ids, item_columns = _check_item_columns(items, limits)
        item_features = None
    else:
        item_ids, item_features = _check_item_rows(items, limits)
        item_columns = None
    model = message.get("model")
    if model is not None:
        model = _string(message, "model", limits.max_id_length)
    top_k = message.get("top_k")
    if top_k is not None:
        if type(top_k) is not int:
            raise ProtocolError(Reason.wrong_type, f"'top_k' is {_type_name(top_k)}, expected an integer")
        if top_k < 1:
            raise ProtocolError(Reason.invalid_value, f"'top_k' is {top_k}, expected at least 1")
    reply_to = message.get("reply_to")
    if reply_to is not None:
        reply_to = _string(message, "reply_to", 249)
        if not _TOPIC_NAME.fullmatch(reply_to) or reply_to in (".", ".."):
            raise ProtocolError(Reason.invalid_reply_to, f"'reply_to' {reply_to!r} is not a legal topic name")
    return Auction(auction_id, sent_at_ms, context, item_ids, item_features, item_columns, model, top_k, reply_to, size)


def _check_item_rows(items: Any, limits: ProtocolLimits) -> tuple[list[ItemId], list[dict[str, Any]] | None]:
    """(item ids, feature maps or None for catalog ids); C-level passes, no per-item Python loop."""
    if type(items) is not list:
        raise ProtocolError(Reason.wrong_type, f"'items' is {_type_name(items)}, expected an array or a map")
    _check_count(len(items), limits)
    types = set(map(type, items))
    if types <= _ID_TYPES:
        _check_ids(items, types, limits)
        return items, None
    if types != {dict}:
        raise ProtocolError(
            Reason.wrong_type, "'items' must be all {item_id, features} maps or all catalog ids (strings or integers)"
        )
    if set(map(len, items)) != {len(_ITEM_KEYS)} or not all(map(_ITEM_KEYS.issuperset, items)):
        for item in items:
            unknown, missing = item.keys() - _ITEM_KEYS, _ITEM_KEYS - item.keys()
            if unknown:
                raise ProtocolError(Reason.unknown_field, f"unknown item keys {quote_keys(unknown)}")
            if missing:
                raise ProtocolError(Reason.missing_field, f"an item lacks {quote_keys(missing)}")
    item_ids = [item["item_id"] for item in items]
    id_types = set(map(type, item_ids))
    if not id_types <= _ID_TYPES:
        raise ProtocolError(Reason.wrong_type, "'item_id' must be a string or an integer")
    _check_ids(item_ids, id_types, limits)
    features = [item["features"] for item in items]
    if set(map(type, features)) != {dict}:
        raise ProtocolError(Reason.wrong_type, "an item's 'features' is not a map")
    return item_ids, features


def _check_item_columns(items: dict[str, Any], limits: ProtocolLimits) -> tuple[list[ItemId], dict[str, list[Any] | bytes]]:
    """The columns form: {"item_id": [ids], "features": {field: [one value per item] or a packed column}}."""
    unknown, missing = items.keys() - _ITEM_KEYS, _ITEM_KEYS - items.keys()
    if unknown:
        raise ProtocolError(Reason.unknown_field, f"unknown keys in 'items' {quote_keys(unknown)}")
    if missing:
        raise ProtocolError(Reason.missing_field, f"'items' lacks {quote_keys(missing)}")
    item_ids, columns = items["item_id"], items["features"]
    if type(item_ids) is not list:
        raise ProtocolError(Reason.wrong_type, f"'item_id' is {_type_name(item_ids)}, expected an array")
    _check_count(len(item_ids), limits)
    id_types = set(map(type, item_ids))
    if not id_types <= _ID_TYPES:
        raise ProtocolError(Reason.wrong_type, "'item_id' must hold strings or integers")
    _check_ids(item_ids, id_types, limits)
    if type(columns) is not dict:
        raise ProtocolError(Reason.wrong_type, f"'features' is {_type_name(columns)}, expected a map")
    count = len(item_ids)
    for name, column in columns.items():
        kind = type(column)
        if kind is list:
            if len(column) != count:
                raise ProtocolError(Reason.invalid_value, f"feature column {name!r} has {len(column)} values for {count} items")
        elif kind is bytes:
            if len(column) not in (4 * count, 8 * count):
                raise ProtocolError(
                    Reason.invalid_value,
                    f"packed column {name!r} has {len(column)} bytes for {count} items (4 or 8 per item)",
                )
        else:
            raise ProtocolError(
                Reason.wrong_type, f"feature column {name!r} is {_type_name(column)}, expected an array or packed binary"
            )
    return item_ids, columns


def pack_column(values: Sequence[int] | np.ndarray) -> bytes:
    """A packed column of the columns form: integer raw values as one msgpack binary,
    little-endian int32 when they all fit, else int64; the scorer reads it without a
    Python object per value."""
    numbers = np.asarray(values, dtype=np.int64)
    fits_32 = numbers.size == 0 or (numbers.min() >= -(1 << 31) and numbers.max() < 1 << 31)
    return numbers.astype("<i4" if fits_32 else "<i8").tobytes()


def unpack_column(column: bytes, count: int) -> np.ndarray:
    """The int64 values of a packed column of ``count`` items (its width is 4 or 8 bytes)."""
    return np.frombuffer(column, dtype="<i4" if len(column) == 4 * count else "<i8").astype(np.int64)


def _check_count(count: int, limits: ProtocolLimits) -> None:
    if count == 0:
        raise ProtocolError(Reason.empty_items, "'items' is empty")
    if count > limits.max_items:
        raise ProtocolError(Reason.too_many_items, f"{count} items, limit {limits.max_items}")


def _check_ids(ids: list[ItemId], types: set[type], limits: ProtocolLimits) -> None:
    """Id lengths; ``types`` is the set of the ids' types, already checked to lie within ``_ID_TYPES``."""
    strings = [i for i in ids if type(i) is str] if int in types else ids
    if strings and max(map(len, strings)) > limits.max_id_length:
        raise ProtocolError(Reason.invalid_value, f"an item id is longer than {limits.max_id_length} characters")


def _check_version(message: dict[str, Any]) -> None:
    if "version" not in message:
        raise ProtocolError(Reason.missing_field, "'version' is required")
    version = message["version"]
    if type(version) is not int:
        raise ProtocolError(Reason.wrong_type, f"'version' is {_type_name(version)}, expected an integer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(Reason.unsupported_version, f"version {version}, this scorer speaks {PROTOCOL_VERSION}")


def _string(message: dict[str, Any], key: str, max_length: int) -> str:
    value = message[key]
    if type(value) is not str:
        raise ProtocolError(Reason.wrong_type, f"{key!r} is {_type_name(value)}, expected a string")
    if not 0 < len(value) <= max_length:
        raise ProtocolError(Reason.invalid_value, f"{key!r} must have 1 to {max_length} characters")
    return value


# -- replies ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ScoreReply:
    auction_id: str
    scores: list[float]  # in the auction's item order
    model: str
    model_version: str
    queue_wait_ms: float
    scoring_ms: float
    served_at_ms: int
    top_k: list[ItemId] | None = None  # best first, when the auction asked for it


def encode_reply(
    auction: Auction,
    scores: Sequence[float] | np.ndarray,
    *,
    model: str,
    model_version: str,
    queue_wait_ms: float,
    scoring_ms: float,
    served_at_ms: int | None = None,
) -> bytes:
    """The score reply to ``auction``, with its top-K item ids when it asked for them."""
    values = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(values) != len(auction.item_ids):
        raise ValueError(f"{len(values)} scores for {len(auction.item_ids)} items")
    message: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "auction_id": auction.auction_id,
        "scores": values.tolist(),
        "model": model,
        "model_version": model_version,
        "timings": {"queue_wait_ms": float(queue_wait_ms), "scoring_ms": float(scoring_ms)},
        "served_at_ms": now_ms() if served_at_ms is None else served_at_ms,
    }
    if auction.top_k is not None:
        message["top_k"] = top_k_ids(auction.item_ids, values, auction.top_k)
    # Scores are float32 in the model: single-precision floats lose nothing and halve the bytes.
    return msgpack.packb(message, use_bin_type=True, use_single_float=True)


def top_k_ids(item_ids: Sequence[ItemId], scores: np.ndarray, k: int) -> list[ItemId]:
    """The ids of the k best scores, best first (ties: earlier item first)."""
    k = min(k, len(scores))
    order = np.argsort(-scores, kind="stable")[:k]
    return [item_ids[i] for i in order.tolist()]


def decode_reply(data: bytes) -> ScoreReply:
    """A score reply (for clients); raises ProtocolError when it is not one."""
    message = _reply_map(data)
    try:
        timings = message["timings"]
        return ScoreReply(
            auction_id=message["auction_id"],
            scores=message["scores"],
            model=message["model"],
            model_version=message["model_version"],
            queue_wait_ms=timings["queue_wait_ms"],
            scoring_ms=timings["scoring_ms"],
            served_at_ms=message["served_at_ms"],
            top_k=message.get("top_k"),
        )
    except (KeyError, TypeError) as error:
        raise ProtocolError(Reason.missing_field, f"not a score reply: {error}", message.get("auction_id")) from None


# -- error replies ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ErrorReply:
    auction_id: str | None
    reason: str
    message: str
    original: bytes
    failed_at_ms: int
    source: dict[str, Any] | None = None  # {"topic", "partition", "offset"} of the original
    original_bytes: int | None = None  # the original's length, when ``original`` holds only its start


def encode_error(
    error: ProtocolError,
    original: bytes,
    *,
    source: Mapping[str, Any] | None = None,
    failed_at_ms: int | None = None,
    max_original_bytes: int = DEFAULT_LIMITS.max_dead_letter_original_bytes,
) -> bytes:
    """The dead-letter record for a message that could not be scored: bounded (the
    message is already cut; the original keeps its first ``max_original_bytes``, and
    ``original_bytes`` then says how long it was), its ``source`` always kept."""
    message: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "auction_id": error.auction_id,
        "reason": error.reason.value,
        "message": error.message,
        "original": bytes(original[:max_original_bytes]),
        "failed_at_ms": now_ms() if failed_at_ms is None else failed_at_ms,
    }
    if len(original) > max_original_bytes:
        message["original_bytes"] = len(original)
    if source is not None:
        message["source"] = dict(source)
    return msgpack.packb(message, use_bin_type=True)


def decode_error(data: bytes) -> ErrorReply:
    message = _reply_map(data)
    try:
        return ErrorReply(
            auction_id=message["auction_id"],
            reason=message["reason"],
            message=message["message"],
            original=message["original"],
            failed_at_ms=message["failed_at_ms"],
            source=message.get("source"),
            original_bytes=message.get("original_bytes"),
        )
    except KeyError as error:
        raise ProtocolError(Reason.missing_field, f"not an error reply: {error}") from None


def _reply_map(data: bytes) -> dict[str, Any]:
    message = unpack(data)
    if type(message) is not dict:
        raise ProtocolError(Reason.not_a_map, f"top level is {_type_name(message)}, expected a map")
    _check_version(message)
    return message


# -- helpers ----------------------------------------------------------------------
def unpack(data: bytes, limits: ProtocolLimits = DEFAULT_LIMITS) -> Any:
    """msgpack decoding without extension types, with string (or binary) map keys only
    and ``limits``' lengths."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_ext_len=0,
            max_str_len=limits.max_string_bytes,
            max_bin_len=limits.max_binary_bytes,
            max_array_len=limits.max_array_length,
            max_map_len=limits.max_map_length,
        )
    except Exception as error:  # msgpack's errors (StackError for deep nesting), UnicodeDecodeError, unhashable keys
        raise ProtocolError(Reason.malformed_msgpack, f"cannot decode msgpack: {error or type(error).__name__}") from None


def quote(value: object) -> str:
    """``value`` for an error message, cut to a few levels and elements."""
    return _QUOTE.repr(value)


def quote_keys(keys: Any) -> str:
    """Map keys for an error message: the first few, in a stable order (keys may mix
    strings and binary, which do not sort together)."""
    names = sorted(map(quote, keys))
    shown = ", ".join(names[:10])
    return f"[{shown}, and {len(names) - 10} more]" if len(names) > 10 else f"[{shown}]"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _type_name(value: object) -> str:
    return {dict: "a map", list: "an array", str: "a string", bytes: "binary", type(None): "nil"}.get(
        type(value), type(value).__name__
    )
