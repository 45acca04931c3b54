"""What every dataset reader produces: canonical tokens per field, chunk by chunk.

A reader knows its raw format; everything after it (counting, vocabulary, encoding,
parquet) is shared. Tokens are already canonical (``model_zoo.vocab.to_token`` with
the field's transform), so serving that maps raw values through the saved vocabulary
gets the same indices as training.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from model_zoo.schema import Kind, Role, Task
from model_zoo.vocab import Transform


class RawField(BaseModel):
    """A field as a reader produces it: its name, role, kind and raw-value transform."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    role: Role
    kind: Kind = Kind.single
    transform: Transform = "none"


@dataclass(frozen=True)
class RawChunk:
    """Rows of tokens. A single-valued field is a string array (null = missing); a
    multi-valued field is list<string>, a missing value being the one-element list [null].
    ``row_ids`` number the rows in input order; they decide the split."""

    tokens: dict[str, pa.Array]
    label: np.ndarray  # float32
    row_ids: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.label)

    def filter(self, mask: np.ndarray) -> "RawChunk":
        keep = pa.array(mask, pa.bool_())
        return RawChunk(
            {name: column.filter(keep) for name, column in self.tokens.items()},
            self.label[mask],
            self.row_ids[mask],
        )


class Malformed:
    """Skipped input rows counted by reason (thread-safe: pyarrow's CSV reader calls
    its invalid-row handler from its own threads)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, reason: str, count: int = 1) -> None:
        if count:
            with self._lock:
                self._counts[reason] += count

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))


class RawSource(ABC):
    """A dataset reader: fields, label and a fresh pass over the input on every call."""

    dataset: str
    fields: tuple[RawField, ...]
    label: str
    task: Task
    inputs: tuple[Path, ...]

    @abstractmethod
    def chunks(self, malformed: Malformed, progress: tqdm | None = None) -> Iterator[RawChunk]:
        """One pass over the input; rows it cannot read are counted in ``malformed``."""

    @property
    def input_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.inputs)

    def set_context_fields(self, names: Sequence[str]) -> None:
        """Make ``names`` the context fields and every other field an item field."""
        known = {f.name for f in self.fields}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"unknown context fields {unknown}; fields are {[f.name for f in self.fields]}")
        chosen = set(names)
        self.fields = tuple(
            f.model_copy(update={"role": Role.context if f.name in chosen else Role.item}) for f in self.fields
        )
