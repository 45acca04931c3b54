"""Raw value -> per-field index mapping, written by ``prepare`` and read by serving,
so a producer's business values map exactly as the training data did.

On disk: ``DIR/vocab/<field>.json`` = {"field", "transform", "tokens"}; token i has
index RESERVED_INDICES + i. A missing value (None or "") maps to MISSING_INDEX, a
value not in the vocabulary to RARE_INDEX.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from model_zoo.schema import MISSING_INDEX, RARE_INDEX, RESERVED_INDICES

Transform = Literal["none", "log_square"]


def to_token(value: object, transform: Transform = "none") -> str | None:
    """The canonical token of a raw value, or None when it is missing."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if text == "":
        return None
    if transform == "log_square":
        return log_square_token(text)
    return text


def log_square_token(text: str) -> str:
    """Criteo integer binning from the competition winners: x -> floor(ln(x)^2) for x > 2,
    small values (x <= 2, negatives included) kept as their own tokens."""
    number = int(text)  # raises ValueError on non-numeric input, which callers count as malformed
    if number > 2:
        return f"b{int(math.floor(math.log(number) ** 2))}"
    return f"v{number}"


class FieldVocabulary:
    def __init__(self, field: str, tokens: Sequence[str], transform: Transform = "none") -> None:
        self.field = field
        self.transform: Transform = transform
        self.tokens = list(tokens)
        self._index = {token: RESERVED_INDICES + i for i, token in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError(f"vocabulary of {field!r} has duplicate tokens")

    @property
    def size(self) -> int:
        """Number of indices including the reserved missing and rare ones."""
        return RESERVED_INDICES + len(self.tokens)

    def lookup_one(self, value: object) -> int:
        token = to_token(value, self.transform)
        if token is None:
            return MISSING_INDEX
        return self._index.get(token, RARE_INDEX)

    def lookup(self, values: Iterable[object]) -> np.ndarray:
        return np.fromiter((self.lookup_one(v) for v in values), dtype=np.int64)

    def lookup_tokens(self, tokens: Iterable[str | None]) -> np.ndarray:
        """Map already-canonical tokens (None = missing)."""
        index = self._index
        return np.fromiter(
            (MISSING_INDEX if t is None else index.get(t, RARE_INDEX) for t in tokens),
            dtype=np.int64,
        )

    def to_dict(self) -> dict:
        return {"field": self.field, "transform": self.transform, "tokens": self.tokens}


class Vocabulary:
    """All fields' vocabularies."""

    def __init__(self, fields: Iterable[FieldVocabulary]) -> None:
        self.fields = {f.field: f for f in fields}

    def __getitem__(self, field: str) -> FieldVocabulary:
        return self.fields[field]

    def __contains__(self, field: str) -> bool:
        return field in self.fields

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for vocabulary in self.fields.values():
            path = directory / f"{vocabulary.field}.json"
            path.write_text(json.dumps(vocabulary.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> "Vocabulary":
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no vocabulary directory at {directory}")
        fields = []
        for path in sorted(directory.glob("*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            fields.append(FieldVocabulary(data["field"], data["tokens"], data.get("transform", "none")))
        return cls(fields)
