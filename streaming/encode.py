"""Auctions -> FeatureBatch: raw values mapped through the model's vocabulary.

Rules (docs/protocol.md):
- A context key must be one of the schema's context fields and an item key one of
  its item fields, else ``unknown_field``.
- A field absent from a context or an item is a missing value: index 0, the index
  training gave missing values (``missing="error"`` makes it ``missing_field``).
- Single-valued fields take a string, integer or float (nil = missing; booleans are
  the integers 0/1, as in Python). Multi-valued fields also take an array of such
  values (equal weights) or a map {string value: weight > 0}; nil, [] and {} are missing.
- Unseen values map to the field's rare index 1.
- A packed column (columns form; ``protocol.pack_column``) holds integers, each the
  same raw value as that integer sent as a number (one value per item).

Speed: columns are cut out of the feature maps with ``operator.itemgetter`` and
mapped through a per-field dict of values already seen, so a batch costs a few
C-level passes per field; only values not seen before, multi-valued fields and bad
messages take the Python path. Packed columns skip Python objects altogether: a
batch's packed columns of a field are concatenated and looked up in one compiled loop
over a hash table of the field's integer tokens (``_IntegerIndex``); so are columns
of plain integers (contexts sent as maps of integers), all fields in one call.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from operator import itemgetter
from typing import Any, Literal

import numba
import numpy as np
import torch
from torch import Tensor

from model_zoo.batch import Bag, FeatureBatch
from model_zoo.schema import MISSING_INDEX, RARE_INDEX, RESERVED_INDICES, FeatureSchema, Kind
from model_zoo.vocab import FieldVocabulary, Vocabulary
from streaming.protocol import (
    DEFAULT_LIMITS,
    Auction,
    ItemId,
    ProtocolError,
    ProtocolLimits,
    Reason,
    quote,
    quote_keys,
    unexpected_error,
    unpack_column,
)

MissingPolicy = Literal["missing_index", "error"]
# Per field; the cache is cleared when either is reached (bounded memory under floods of
# unseen values, long strings included).
_MAX_CACHED_VALUES = 1 << 16
_MAX_CACHED_BYTES = 8 << 20
# Weights become float32: a larger one is infinity there, and its scores NaN.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def identity_vocabulary(schema: FeatureSchema) -> Vocabulary:
    """Raw value j maps to index j (2 <= j < vocab size): for models trained on index
    data without a vocabulary, such as the planted synthetic data."""
    return Vocabulary(
        FieldVocabulary(f.name, [str(j) for j in range(RESERVED_INDICES, f.vocab_size)]) for f in schema.fields
    )


class _IntegerIndex:
    """Index of every integer raw value of one field, a whole array at a time.

    The field's tokens that are canonical integers (``str(int(t)) == t``: what
    ``to_token`` makes of an integer) sit in an open-addressing hash table with linear
    probing, at most half full; any other integer is not in the vocabulary (rare)."""

    def __init__(self, vocabulary: FieldVocabulary) -> None:
        keys, indices = [], []
        for position, token in enumerate(vocabulary.tokens):
            try:
                number = int(token)
            except ValueError:
                continue
            if str(number) == token and _INT64_MIN <= number <= _INT64_MAX:
                keys.append(number)
                indices.append(RESERVED_INDICES + position)
        bits = max(3, (2 * len(keys)).bit_length())
        self.shift = 64 - bits  # a slot is the top ``bits`` bits of the hash
        self.keys = np.zeros(1 << bits, dtype=np.int64)
        self.indices = np.zeros(1 << bits, dtype=np.int64)  # 0 marks an empty slot: token indices are >= 2
        _hash_insert(self.keys, self.indices, np.array(keys, dtype=np.int64), np.array(indices, dtype=np.int64), self.shift)

    def lookup(self, values: np.ndarray) -> np.ndarray:
        return _hash_lookup(self.keys, self.indices, values, self.shift)


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: multiplicative hashing


@numba.njit(cache=True, nogil=True, inline="always")
def _home_slot(value, shift):  # pragma: no cover - compiled
    return np.int64((np.uint64(value) * _FIBONACCI) >> np.uint64(shift))


@numba.njit(cache=True, nogil=True)
def _hash_insert(table_keys, table_indices, keys, indices, shift):  # pragma: no cover - compiled
    mask = table_keys.shape[0] - 1
    for n in range(keys.shape[0]):
        slot = _home_slot(keys[n], shift)
        while table_indices[slot] != 0:
            slot = (slot + 1) & mask
        table_keys[slot] = keys[n]
        table_indices[slot] = indices[n]


@numba.njit(cache=True, nogil=True, inline="always")
def _probe(table_keys, table_indices, start, mask, value, shift):  # pragma: no cover - compiled
    """The index of ``value`` in the table at ``start`` (``mask + 1`` slots), or rare."""
    slot = _home_slot(value, shift)
    while table_indices[start + slot] != 0:
        if table_keys[start + slot] == value:
            return table_indices[start + slot]
        slot = (slot + 1) & mask
    return RARE_INDEX


@numba.njit(cache=True, nogil=True)
def _hash_lookup(table_keys, table_indices, values, shift):  # pragma: no cover - compiled
    mask = table_keys.shape[0] - 1
    out = np.empty(values.shape[0], dtype=np.int64)
    for n in range(values.shape[0]):
        out[n] = _probe(table_keys, table_indices, 0, mask, values[n], shift)
    return out


class _FieldsIndex:
    """The ``_IntegerIndex`` tables of several fields laid end to end: a (fields, N)
    array of raw values maps to (N, fields) indices in one compiled call."""

    def __init__(self, indexes: Sequence[_IntegerIndex]) -> None:
        self.keys = np.concatenate([index.keys for index in indexes])
        self.indices = np.concatenate([index.indices for index in indexes])
        self.starts = np.cumsum([0] + [len(index.keys) for index in indexes], dtype=np.int64)
        self.shifts = np.array([index.shift for index in indexes], dtype=np.int64)

    def lookup(self, values: np.ndarray) -> np.ndarray:
        out = np.empty((values.shape[1], values.shape[0]), dtype=np.int64)
        _hash_lookup_fields(self.keys, self.indices, self.starts, self.shifts, values, out)
        return out


@numba.njit(cache=True, nogil=True)
def _hash_lookup_fields(table_keys, table_indices, starts, shifts, values, out):  # pragma: no cover - compiled
    fields, count = values.shape
    for f in range(fields):
        start, mask = starts[f], starts[f + 1] - starts[f] - 1
        for n in range(count):
            out[n, f] = _probe(table_keys, table_indices, start, mask, np.int64(values[f, n]), shifts[f])


class _FieldMapper:
    """Raw value -> index for one field, remembering the values it has seen."""

    __slots__ = ("name", "vocabulary", "limits", "cache", "cache_bytes", "_integers")

    def __init__(self, name: str, vocabulary: FieldVocabulary, limits: ProtocolLimits) -> None:
        self.name = name
        self.vocabulary = vocabulary
        self.limits = limits
        self.cache: dict[Any, int] = {}
        self.cache_bytes = 0  # sys.getsizeof of the cached values
        self._integers: _IntegerIndex | None = None  # built on the field's first packed column

    def packed(self, values: np.ndarray) -> np.ndarray:
        """Indices of a packed column (int64 raw values)."""
        if self.vocabulary.transform != "none":  # e.g. Criteo's log binning: the token path
            return self.column(values.tolist())
        return self.integers().lookup(values)

    def integers(self) -> _IntegerIndex:
        """The index of the field's integer tokens (for packed columns), built once."""
        if self._integers is None:
            self._integers = _IntegerIndex(self.vocabulary)
        return self._integers

    def column(self, values: Sequence[Any]) -> np.ndarray:
        """Indices of a column of single values."""
        count = len(values)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        try:
            found = itemgetter(*values)(self.cache)  # every lookup in one C call
        except (KeyError, TypeError):  # an unseen value, or a non-scalar: the checking path
            return np.fromiter(map(self.index, values), dtype=np.int64, count=count)
        return np.fromiter(found if count > 1 else (found,), dtype=np.int64, count=count)

    def index(self, value: Any) -> int:
        try:
            return self.cache[value]
        except KeyError:
            return self._admit(value)
        except TypeError:  # unhashable: an array or a map
            raise ProtocolError(Reason.wrong_type, f"field {self.name!r} takes one value, got {_kind_of(value)}") from None

    def bag(self, value: Any) -> tuple[list[int], list[float]]:
        """(indices, weights) of one multi-valued field value."""
        kind = type(value)
        if kind is list:
            if not value:
                return [MISSING_INDEX], [1.0]
            self._check_bag_length(len(value))
            return [self.index(v) for v in value], [1.0] * len(value)
        if kind is dict:
            if not value:
                return [MISSING_INDEX], [1.0]
            self._check_bag_length(len(value))
            weights = list(value.values())
            for weight in weights:
                if type(weight) not in (int, float):
                    raise ProtocolError(Reason.wrong_type, f"field {self.name!r}: weight {quote(weight)} is not a number")
                if not math.isfinite(weight):
                    raise ProtocolError(Reason.non_finite, f"field {self.name!r}: weight {weight} is not finite")
                if not 0 < weight <= _FLOAT32_MAX:
                    raise ProtocolError(
                        Reason.invalid_value, f"field {self.name!r}: weight {weight} is not in (0, {_FLOAT32_MAX:.4g}]"
                    )
            return [self.index(v) for v in value], [float(w) for w in weights]
        return [self.index(value)], [1.0]

    def _check_bag_length(self, length: int) -> None:
        if length > self.limits.max_bag_values:
            raise ProtocolError(
                Reason.too_many_values, f"field {self.name!r} has {length} values, limit {self.limits.max_bag_values}"
            )

    def _admit(self, value: Any) -> int:
        kind = type(value)
        if kind is str:
            if len(value) > self.limits.max_value_length:
                raise ProtocolError(
                    Reason.invalid_value, f"field {self.name!r}: value longer than {self.limits.max_value_length} characters"
                )
        elif kind is float:
            if not math.isfinite(value):
                raise ProtocolError(Reason.non_finite, f"field {self.name!r}: value {value} is not finite")
        elif kind is bool:
            value = int(value)
        elif kind is not int and value is not None:
            raise ProtocolError(Reason.wrong_type, f"field {self.name!r}: {_kind_of(value)} is not a raw value")
        try:
            index = self.vocabulary.lookup_one(value)
        except ValueError:  # a transform such as Criteo's log binning needs a number
            raise ProtocolError(Reason.invalid_value, f"field {self.name!r}: {value!r} is not a number") from None
        size = sys.getsizeof(value)
        if len(self.cache) >= _MAX_CACHED_VALUES or self.cache_bytes + size > _MAX_CACHED_BYTES:
            self.cache.clear()
            self.cache_bytes = 0
        self.cache[value] = index
        self.cache_bytes += size
        return index


class _Side:
    """The context or the item side: its fields, and raw values -> per-field columns -> batch."""

    def __init__(self, label: str, schema: FeatureSchema, names: tuple[str, ...], mappers: dict[str, _FieldMapper]) -> None:
        self.label = label
        self.names = names
        self.allowed = frozenset(names)
        self.single = tuple(n for n in names if schema.field(n).kind == Kind.single)
        self.multi = tuple(n for n in names if schema.field(n).kind == Kind.multi)
        self.mappers = dict(zip(names, (mappers[n] for n in names)))
        # itemgetter of one key returns the value, of several a tuple: keep one shape.
        getter = itemgetter(*names) if names else (lambda _: ())
        self.get_row = getter if len(names) != 1 else (lambda m, g=getter: (g(m),))
        self._fields_index: _FieldsIndex | None = None  # built on the first all-packed batch

    def packed_batch(self, column_maps: list[Mapping[str, Any]], counts: list[int]) -> FeatureBatch | None:
        """The batch of columns-form items whose every field is a packed column of one
        width, when the side's fields are all single-valued without a token transform:
        one buffer and one compiled lookup for all fields. None for any other batch,
        which takes the general path (same indices, one field at a time)."""
        index = self.fields_index()
        if index is None:
            return None
        total = sum(counts)
        widths = set()
        for columns, count in zip(column_maps, counts):
            if columns.keys() != self.allowed or set(map(type, columns.values())) != {bytes}:
                return None
            widths.update(len(column) // count for column in columns.values())
        if len(widths) != 1:
            return None
        buffer = b"".join([columns[name] for name in self.names for columns in column_maps])  # field-major
        values = np.frombuffer(buffer, dtype="<i4" if widths == {4} else "<i8").reshape(len(self.names), total)
        single = index.lookup(values)
        return FeatureBatch(self.names, self.single, torch.from_numpy(single), (), ())

    def fields_index(self) -> _FieldsIndex | None:
        """The index for ``packed_batch`` (built once), or None where it does not apply."""
        if self._fields_index is None and not self.multi and self.names:
            if all(m.vocabulary.transform == "none" for m in self.mappers.values()):
                self._fields_index = _FieldsIndex([self.mappers[n].integers() for n in self.names])
        return self._fields_index

    def columns_of_maps(self, maps: list[dict[str, Any]], missing: MissingPolicy) -> list[Sequence[Any]]:
        """Per field (``names`` order), its values in the maps (one map per row)."""
        width = len(self.names)
        rows = None
        if set(map(len, maps)) <= {width}:
            try:
                rows = list(map(self.get_row, maps))  # every field present and nothing else
            except KeyError:
                pass
        if rows is None:
            rows = [self._row(values, missing) for values in maps]
        return list(zip(*rows)) if rows else [()] * width

    def columns_of_columns(
        self, columns: Mapping[str, Sequence[Any] | bytes], count: int, missing: MissingPolicy
    ) -> list[Sequence[Any] | bytes]:
        """Per field, its column in a columns-form auction (absent columns are all missing)."""
        self._check_keys(columns, missing)
        absent = [None] * count
        return [columns.get(n, absent) for n in self.names]

    def _row(self, values: dict[str, Any], missing: MissingPolicy) -> tuple[Any, ...]:
        self._check_keys(values, missing)
        return tuple(values.get(n) for n in self.names)

    def _check_keys(self, values: dict[str, Any], missing: MissingPolicy) -> None:
        unknown = values.keys() - self.allowed
        if unknown:
            raise ProtocolError(Reason.unknown_field, f"{quote_keys(unknown)} are not {self.label} fields of this model")
        if missing == "error" and len(values) < len(self.names):
            absent = quote_keys(self.allowed - values.keys())
            raise ProtocolError(Reason.missing_field, f"{self.label} fields {absent} are missing")

    def batch(self, columns: list[Sequence[Any] | np.ndarray], count: int) -> FeatureBatch:
        integers = self.integer_batch(columns, count)
        if integers is not None:
            return integers
        by_name = dict(zip(self.names, columns))
        single = np.empty((count, len(self.single)), dtype=np.int64)
        for position, name in enumerate(self.single):
            values, mapper = by_name[name], self.mappers[name]
            single[:, position] = mapper.packed(values) if type(values) is np.ndarray else mapper.column(values)
        bags = tuple(_bag([self.mappers[n].bag(v) for v in _values(by_name[n])]) for n in self.multi)
        return FeatureBatch(self.names, self.single, torch.from_numpy(single), self.multi, bags)

    def integer_batch(self, columns: list[Sequence[Any] | np.ndarray], count: int) -> FeatureBatch | None:
        """The batch of columns whose values are all integers (a context's usual form),
        through the packed columns' compiled lookup: one call for all fields in place
        of one mapping pass per field; None for anything else."""
        if not count or any(type(column) is np.ndarray for column in columns):
            return None
        if set(map(type, chain.from_iterable(columns))) != {int}:
            return None
        index = self.fields_index()
        if index is None:
            return None
        try:
            values = np.array(columns, dtype=np.int64)  # (fields, count)
        except OverflowError:  # beyond int64: the per-field path maps it
            return None
        return FeatureBatch(self.names, self.single, torch.from_numpy(index.lookup(values)), (), ())


@dataclass(frozen=True)
class EncodedBatch:
    """Many auctions ready for one scoring call.

    Context row a belongs to ``auctions[a]``. Feature items of every non-catalog auction
    are the rows of ``items``, paired with their context row by ``item_context_index``;
    catalog items are catalog rows ``catalog_positions`` paired by ``catalog_context_index``.
    """

    auctions: list[Auction]  # accepted, in input order
    context: FeatureBatch  # (A,) context fields
    items: FeatureBatch  # (N,) item fields
    item_context_index: Tensor  # (N,) int64
    catalog_positions: Tensor  # (M,) int64
    catalog_context_index: Tensor  # (M,) int64
    spans: list[tuple[int, int]]  # per accepted auction: its rows in items, or in the catalog rows when is_catalog
    errors: list[tuple[int, ProtocolError]]  # (position in the input, error) of the rejected auctions

    def context_keys(self) -> list[bytes]:
        """Per context row, bytes that are equal exactly when two contexts encode alike
        (whatever the batch's bag padding): keys for a cache of context states."""
        single = self.context.single.numpy()
        bags = [(bag.values.numpy(), bag.weights.numpy()) for bag in self.context.bags]
        keys = []
        for row in range(len(self.auctions)):
            key = single[row].tobytes()
            for values, weights in bags:
                used = weights[row] > 0
                key += b"|" + values[row][used].tobytes() + weights[row][used].tobytes()
            keys.append(key)
        return keys

    def split_scores(self, item_scores: Tensor | None, catalog_scores: Tensor | None) -> list[Tensor]:
        """Per accepted auction, its scores in item order, from the (N,) item scores and
        the (M,) catalog scores."""
        parts = []
        for auction, (start, stop) in zip(self.auctions, self.spans):
            scores = catalog_scores if auction.is_catalog else item_scores
            if scores is None:
                raise ValueError(f"no {'catalog' if auction.is_catalog else 'item'} scores given")
            parts.append(scores[start:stop])
        return parts


class AuctionEncoder:
    """Maps auctions to FeatureBatch for one model's schema and vocabulary."""

    def __init__(
        self,
        schema: FeatureSchema,
        vocabulary: Vocabulary | None = None,
        *,
        missing: MissingPolicy = "missing_index",
        limits: ProtocolLimits = DEFAULT_LIMITS,
    ) -> None:
        vocabulary = vocabulary or identity_vocabulary(schema)
        lacking = [n for n in schema.names if n not in vocabulary]
        if lacking:
            raise ValueError(f"the vocabulary has no entries for fields {lacking}")
        too_big = [n for n in schema.names if vocabulary[n].size > schema.field(n).vocab_size]
        if too_big:
            raise ValueError(f"vocabularies of {too_big} are larger than the schema's vocab_size")
        self.schema = schema
        self.missing: MissingPolicy = missing
        self.limits = limits
        mappers = {n: _FieldMapper(n, vocabulary[n], limits) for n in schema.names}
        self.context_side = _Side("context", schema, schema.context_fields, mappers)
        self.item_side = _Side("item", schema, schema.item_fields, mappers)

    def prepare_packed_columns(self) -> None:
        """Build the item fields' integer indexes now (and load their compiled lookup), so
        the first packed auction is not the one that waits for it."""
        for mapper in self.item_side.mappers.values():
            mapper.packed(np.zeros(1, dtype=np.int64))
        index = self.item_side.fields_index()
        if index is not None:
            for dtype in (np.int32, np.int64):  # both packed widths
                index.lookup(np.zeros((len(self.item_side.names), 1), dtype=dtype))

    def encode(self, auction: Auction) -> tuple[FeatureBatch, FeatureBatch]:
        """(context batch of 1 row, item batch of one row per item) of a feature-item auction."""
        if auction.is_catalog:
            raise ValueError("a catalog auction has no item features; use encode_many with a catalog")
        batch = self.encode_many([auction])
        if batch.errors:
            raise batch.errors[0][1]
        return batch.context, batch.items

    def encode_many(
        self, auctions: Sequence[Auction], catalog: Mapping[ItemId, int] | None = None
    ) -> EncodedBatch:
        """Encode a batch; auctions that fail are reported in ``errors`` and left out.

        ``catalog`` maps catalog item ids to catalog rows (``ItemCatalog.position``)."""
        try:
            return self._encode_all(list(auctions), catalog)
        except Exception:  # a ProtocolError, or a value no check foresaw
            pass
        # Some auction is bad: find which, one at a time, then encode the others together.
        good, errors = [], []
        for position, auction in enumerate(auctions):
            try:
                self._encode_all([auction], catalog)
                good.append(position)
            except ProtocolError as error:
                error.auction_id = auction.auction_id
                errors.append((position, error))
            except Exception as error:
                errors.append((position, unexpected_error(error, auction.auction_id)))
        return replace(self._encode_all([auctions[p] for p in good], catalog), errors=errors)

    def _encode_all(self, auctions: list[Auction], catalog: Mapping[ItemId, int] | None) -> EncodedBatch:
        contexts = self.context_side.columns_of_maps([a.context for a in auctions], self.missing)
        context = self.context_side.batch(contexts, len(auctions))
        featured = [(row, a) for row, a in enumerate(auctions) if not a.is_catalog]
        items = self._item_batch([a for _, a in featured])
        item_context_index = _repeat_rows([row for row, _ in featured], [len(a) for _, a in featured])
        cataloged = [(row, a) for row, a in enumerate(auctions) if a.is_catalog]
        catalog_positions = _catalog_rows([a for _, a in cataloged], catalog)
        catalog_context_index = _repeat_rows([row for row, _ in cataloged], [len(a) for _, a in cataloged])
        spans, item_start, catalog_start = [], 0, 0
        for auction in auctions:
            if auction.is_catalog:
                spans.append((catalog_start, catalog_start + len(auction)))
                catalog_start += len(auction)
            else:
                spans.append((item_start, item_start + len(auction)))
                item_start += len(auction)
        return EncodedBatch(
            auctions, context, items, item_context_index, catalog_positions, catalog_context_index, spans, []
        )

    def encode_item_columns(self, columns: dict[str, list[Any]], count: int) -> FeatureBatch:
        """Item rows from raw columns (field -> one value per item), e.g. an item catalog
        file; raises ProtocolError on the first bad value."""
        side = self.item_side
        return side.batch(side.columns_of_columns(columns, count, self.missing), count)

    def _item_batch(self, auctions: list[Auction]) -> FeatureBatch:
        """Item rows of feature-item auctions, in auction order."""
        side, parts = self.item_side, []
        if auctions and all(a.item_columns is not None for a in auctions):
            packed = side.packed_batch([a.item_columns for a in auctions], [len(a) for a in auctions])
            if packed is not None:
                return packed
        for auction in auctions:
            if auction.item_features is not None:
                parts.append(side.columns_of_maps(auction.item_features, self.missing))
            else:
                parts.append(side.columns_of_columns(auction.item_columns or {}, len(auction), self.missing))
        counts = [len(a) for a in auctions]
        columns = [_concatenate([p[f] for p in parts], counts) for f in range(len(side.names))]
        return side.batch(columns, sum(counts))


def _concatenate(parts: list[Sequence[Any] | bytes], counts: list[int]) -> Sequence[Any] | np.ndarray:
    """One field's column over several auctions (``counts`` items each): an int64 array
    when every part is packed, else a list of raw values."""
    packed = [type(part) is bytes for part in parts]
    if parts and all(packed):
        if len({len(part) // count for part, count in zip(parts, counts)}) == 1:  # one width: one buffer, one conversion
            return unpack_column(b"".join(parts), sum(counts))
        return np.concatenate([unpack_column(part, count) for part, count in zip(parts, counts)])
    if not any(packed) and len(parts) == 1:
        return parts[0]
    return list(
        chain.from_iterable(
            unpack_column(part, count).tolist() if is_packed else part for part, count, is_packed in zip(parts, counts, packed)
        )
    )


def _values(column: Sequence[Any] | np.ndarray) -> Sequence[Any]:
    """Raw values one at a time (a packed column gives each item of a multi-valued field one value)."""
    return column.tolist() if type(column) is np.ndarray else column


def _catalog_rows(auctions: list[Auction], catalog: Mapping[ItemId, int] | None) -> Tensor:
    if not auctions:
        return torch.zeros(0, dtype=torch.int64)
    if catalog is None:
        raise ProtocolError(Reason.catalog_unavailable, "catalog item ids were sent but this model has no item catalog")
    ids = list(chain.from_iterable(a.item_ids for a in auctions))
    try:
        return torch.from_numpy(np.fromiter(map(catalog.__getitem__, ids), dtype=np.int64, count=len(ids)))
    except KeyError as error:
        raise ProtocolError(Reason.unknown_catalog_item, f"item {error.args[0]!r} is not in the catalog") from None


def _repeat_rows(rows: list[int], counts: list[int]) -> Tensor:
    return torch.from_numpy(np.repeat(np.asarray(rows, dtype=np.int64), np.asarray(counts, dtype=np.int64)))


def _bag(pairs: list[tuple[list[int], list[float]]]) -> Bag:
    length = max([len(values) for values, _ in pairs] + [1])
    values = np.zeros((len(pairs), length), dtype=np.int64)
    weights = np.zeros((len(pairs), length), dtype=np.float32)
    for row, (indices, bag_weights) in enumerate(pairs):
        values[row, : len(indices)] = indices
        weights[row, : len(bag_weights)] = bag_weights
    return Bag(torch.from_numpy(values), torch.from_numpy(weights))


def _kind_of(value: Any) -> str:
    return {dict: "a map", list: "an array", bytes: "binary"}.get(type(value), type(value).__name__)
