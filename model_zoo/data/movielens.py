"""MovieLens-1M: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp) joined with
``users.dat`` (UserID::Gender::Age::Occupation::Zip-code) and ``movies.dat``
(MovieID::Title::Genres, genres ``|``-separated), all Latin-1 with ``::`` separators.

The paper's 11 fields: user_id, gender, age, occupation, zip, movie_id, genres
(multi-valued, averaged), and the rating time (UTC) as year, month, weekday (Monday = 0)
and hour_of_day; the title is dropped; the label is the rating (regression). User and
time fields are context, movie fields item. Ratings whose user or movie is not in the
side files are skipped and counted (an inner join).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from model_zoo.data.csv_stream import DEFAULT_BLOCK_BYTES, check_inputs, stream_csv
from model_zoo.data.source import Malformed, RawChunk, RawField, RawSource
from model_zoo.data.tokens import INTEGER_PATTERN, clean, integer_tokens, split_multi
from model_zoo.schema import Kind, Role, Task

FILES = ("ratings.dat", "users.dat", "movies.dat")
ENCODING = "latin-1"
USER_FIELDS = ("user_id", "gender", "age", "occupation", "zip")
MOVIE_FIELDS = ("movie_id", "genres")
TIME_FIELDS = ("year", "month", "weekday", "hour_of_day")
# ratings.dat read with ":" as the delimiter: "::" leaves an empty column between values.
RATING_COLUMNS = ("user", "sep1", "movie", "sep2", "rating", "sep3", "timestamp")
RATING_PATTERN = r"^[0-9]+(\.[0-9]+)?$"
TIMESTAMP_PATTERN = r"^[0-9]{1,12}$"  # seconds since 1970; longer would overflow date arithmetic


def locate_files(inputs: Sequence[str | Path]) -> dict[str, Path]:
    """The three files from a directory holding them or from the three paths themselves."""
    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir():
        paths = [paths[0] / name for name in FILES]
    by_name = {p.name: p for p in paths}
    missing = [name for name in FILES if name not in by_name]
    if missing:
        raise ValueError(f"MovieLens-1M needs {', '.join(FILES)} (or their directory); missing {missing}")
    checked = check_inputs([by_name[name] for name in FILES])
    return dict(zip(FILES, checked))


@dataclass(frozen=True)
class SideTable:
    """A side file keyed by integer id: ``ids`` and one token column per field."""

    ids: pa.Array
    columns: dict[str, pa.Array]


def read_users(path: Path, malformed: Malformed) -> SideTable:
    ids, columns = [], {name: [] for name in USER_FIELDS[1:]}
    for parts in _side_lines(path, 5, "users", malformed):
        ids.append(int(parts[0]))
        for name, value in zip(USER_FIELDS[1:], parts[1:]):
            columns[name].append(value)
    return SideTable(pa.array(ids, pa.int64()), {n: clean(pa.array(v, pa.string())) for n, v in columns.items()})


def read_movies(path: Path, malformed: Malformed) -> SideTable:
    ids, genres = [], []
    for parts in _side_lines(path, 3, "movies", malformed):
        ids.append(int(parts[0]))
        genres.append(parts[2])
    return SideTable(pa.array(ids, pa.int64()), {"genres": split_multi(clean(pa.array(genres, pa.string())), "|")})


def movie_titles(path: Path) -> dict[str, str]:
    """Movie id (as the vocabulary's token) → title, from ``movies.dat``: what a person
    recognises beside an id."""
    return {parts[0].strip(): parts[1] for parts in _side_lines(path, 3, "movies", Malformed())}


def _side_lines(path: Path, columns: int, kind: str, malformed: Malformed) -> Iterator[list[str]]:
    seen: set[int] = set()
    with path.open(encoding=ENCODING, newline="") as handle:
        for line in handle:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = _split_side_line(line, columns)
            if parts is None or not parts[0].strip().isdigit():
                malformed.add(f"{kind}_bad_line")
                continue
            key = int(parts[0])
            if key in seen:
                malformed.add(f"{kind}_duplicate_id")
                continue
            seen.add(key)
            yield parts


def _split_side_line(line: str, columns: int) -> list[str] | None:
    if columns == 3:  # the title in the middle may itself contain "::"
        head, _, rest = line.partition("::")
        title, separator, genres = rest.rpartition("::")
        return [head, title, genres] if separator else None
    parts = line.split("::")
    return parts if len(parts) == columns else None


class MovieLensSource(RawSource):
    dataset = "movielens1m"
    label = "rating"
    task = Task.regression

    def __init__(self, inputs: Sequence[str | Path], block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        self.files = locate_files(inputs)
        self.inputs = tuple(self.files.values())
        self.block_bytes = block_bytes
        self.fields = (
            *(RawField(name=name, role=Role.context) for name in USER_FIELDS),
            RawField(name="movie_id", role=Role.item),
            RawField(name="genres", role=Role.item, kind=Kind.multi),
            *(RawField(name=name, role=Role.context) for name in TIME_FIELDS),
        )

    def chunks(self, malformed: Malformed, progress: tqdm | None = None) -> Iterator[RawChunk]:
        users = read_users(self.files["users.dat"], malformed)
        movies = read_movies(self.files["movies.dat"], malformed)
        if progress is not None:
            progress.update(self.files["users.dat"].stat().st_size + self.files["movies.dat"].stat().st_size)
        next_row = 0
        for batch in stream_csv(
            self.files["ratings.dat"], RATING_COLUMNS, malformed,
            delimiter=":", encoding=ENCODING, block_bytes=self.block_bytes, progress=progress,
        ):  # fmt: skip
            row_ids = np.arange(next_row, next_row + batch.num_rows, dtype=np.uint64)
            next_row += batch.num_rows
            yield self._tokens(batch, row_ids, users, movies, malformed)

    def _tokens(
        self, batch: pa.RecordBatch, row_ids: np.ndarray, users: SideTable, movies: SideTable, malformed: Malformed
    ) -> RawChunk:
        text = {name: clean(batch.column(name)) for name in RATING_COLUMNS}
        separators_ok = np.logical_and.reduce([_is_null(text[s]) for s in ("sep1", "sep2", "sep3")])
        user_ok = _matches(text["user"], INTEGER_PATTERN)
        movie_ok = _matches(text["movie"], INTEGER_PATTERN)
        user_ids = pc.cast(_where(text["user"], user_ok), pa.int64())
        movie_ids = pc.cast(_where(text["movie"], movie_ok), pa.int64())
        user_rows = pc.index_in(user_ids, value_set=users.ids)
        movie_rows = pc.index_in(movie_ids, value_set=movies.ids)
        checks = {  # the first failing check names the reason
            "bad_separator": separators_ok,
            "bad_user_id": user_ok,
            "bad_movie_id": movie_ok,
            "bad_rating": _matches(text["rating"], RATING_PATTERN),
            "bad_timestamp": _matches(text["timestamp"], TIMESTAMP_PATTERN),
            "unknown_user": ~_is_null(user_rows),
            "unknown_movie": ~_is_null(movie_rows),
        }
        keep = np.ones(batch.num_rows, dtype=bool)
        for reason, ok in checks.items():
            malformed.add(reason, int(np.count_nonzero(keep & ~ok)))
            keep &= ok
        mask = pa.array(keep)
        user_rows, movie_rows = user_rows.filter(mask), movie_rows.filter(mask)
        times = pc.cast(pc.cast(text["timestamp"].filter(mask), pa.int64()), pa.timestamp("s"))
        tokens = {"user_id": integer_tokens(user_ids.filter(mask))}
        tokens.update({name: column.take(user_rows) for name, column in users.columns.items()})
        tokens["movie_id"] = integer_tokens(movie_ids.filter(mask))
        tokens["genres"] = movies.columns["genres"].take(movie_rows)
        tokens["year"] = integer_tokens(pc.year(times))
        tokens["month"] = integer_tokens(pc.month(times))
        tokens["weekday"] = integer_tokens(pc.day_of_week(times))
        tokens["hour_of_day"] = integer_tokens(pc.hour(times))
        label = pc.cast(text["rating"].filter(mask), pa.float32()).to_numpy()
        return RawChunk(tokens, label, row_ids[keep])


def _matches(column: pa.Array, pattern: str) -> np.ndarray:
    """Per row: present and matching ``pattern``."""
    return np.asarray(pc.match_substring_regex(column, pattern).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _is_null(column: pa.Array) -> np.ndarray:
    return np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), dtype=bool)


def _where(column: pa.Array, ok: np.ndarray) -> pa.Array:
    """``column`` with the rows failing ``ok`` set to null (so casts never see bad text)."""
    return pc.if_else(pa.array(ok), column, pa.scalar(None, column.type))
