"""Each raw format read from small files written here, in the exact public layouts:
tokens per field, labels, empty fields, malformed lines counted (never crashing, never
shifting columns)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from model_zoo.data.avazu import AvazuSource
from model_zoo.data.criteo import CATEGORY_FIELDS, INTEGER_FIELDS, CriteoSource
from model_zoo.data.csv_generic import CsvConfig, CsvSource, config_from_flags
from model_zoo.data.movielens import MovieLensSource
from model_zoo.data.source import Malformed, RawSource
from model_zoo.data.tokens import clean, log_square_tokens, split_multi
from model_zoo.schema import Kind, Role, Task
from model_zoo.vocab import log_square_token, to_token


def read_all(source: RawSource, block_bytes: int | None = None) -> tuple[dict[str, list], list[float], Malformed]:
    if block_bytes is not None:
        source.block_bytes = block_bytes
    malformed = Malformed()
    tokens: dict[str, list] = defaultdict(list)
    labels: list[float] = []
    for chunk in source.chunks(malformed):
        for name, column in chunk.tokens.items():
            tokens[name].extend(column.to_pylist())
        labels.extend(chunk.label.tolist())
    return dict(tokens), labels, malformed


def criteo_line(label: str, integers: list[str], categories: list[str]) -> str:
    return "\t".join([label, *integers, *categories]) + "\n"


# -- token conversions -----------------------------------------------------------
def test_vectorized_log_square_equals_the_serving_function():
    rng = np.random.default_rng(0)
    numbers = np.concatenate([np.arange(-50, 200_000), rng.integers(0, 10**18, size=20_000)])
    text = pa.array([str(n) for n in numbers])
    expected = [log_square_token(str(n)) for n in numbers]
    assert log_square_tokens(clean(text)).to_pylist() == expected


def test_clean_trims_and_turns_empty_into_missing():
    text = pa.array([" a ", "", "   ", None, "b"]).slice(1)  # a sliced column, as chunks can be
    assert clean(text).to_pylist() == [None, None, None, "b"]
    assert [to_token(v) for v in ["", "   ", None, "b"]] == [None, None, None, "b"]


def test_split_multi_drops_empty_values_and_marks_missing_rows():
    lists = split_multi(clean(pa.array(["A| B", "", None, "C||", "|"])), "|")
    assert lists.to_pylist() == [["A", "B"], [None], [None], ["C"], [None]]


# -- Criteo ----------------------------------------------------------------------
def test_criteo_reads_tokens_and_counts_malformed_lines(tmp_path):
    integers = [str(v) for v in (5, 0, -1, 2, 3, 100, 1382, 7, 8, 9, 10, 11, 12)]
    categories = [f"{i:08x}" for i in range(26)]
    empty_ints = ["" if i % 2 else v for i, v in enumerate(integers)]
    empty_cats = ["" if i % 3 == 0 else v for i, v in enumerate(categories)]
    bad_number = list(integers)
    bad_number[4] = "12x"
    lines = [
        criteo_line("1", integers, categories),
        criteo_line("0", integers, categories)[:-1].rsplit("\t", 1)[0] + "\n",  # 39 columns
        criteo_line("0", empty_ints, empty_cats),
        criteo_line("0", integers, [*categories, "extra"]),  # 41 columns
        criteo_line("1", bad_number, categories),
        criteo_line("2", integers, categories),  # a label that is not a click
        criteo_line("0", [" 5 ", *integers[1:]], ["  ", *categories[1:]]),
    ]
    path = tmp_path / "train.txt"
    path.write_text("".join(lines))
    tokens, labels, malformed = read_all(CriteoSource([path]))

    assert malformed.as_dict() == {"bad_label": 1, "non_numeric_integer": 1, "wrong_column_count": 2}
    assert labels == [1.0, 0.0, 0.0]
    assert set(tokens) == {*INTEGER_FIELDS, *CATEGORY_FIELDS}
    # Good rows keep their columns: every value lands in its own field.
    for i, name in enumerate(INTEGER_FIELDS):
        full = log_square_token(integers[i])
        assert tokens[name] == [full, None if i % 2 else full, full]
    for i, name in enumerate(CATEGORY_FIELDS):
        assert tokens[name] == [categories[i], None if i % 3 == 0 else categories[i], None if i == 0 else categories[i]]
    assert tokens["I1"][0] == "b2" and tokens["I2"][0] == "v0" and tokens["I3"][0] == "v-1"


def test_criteo_default_roles_and_override(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(criteo_line("0", ["1"] * 13, ["a"] * 26))
    source = CriteoSource([path])
    roles = {f.name: f.role for f in source.fields}
    assert [n for n, r in roles.items() if r == Role.context] == [*INTEGER_FIELDS, *CATEGORY_FIELDS[:13]]
    assert all(f.transform == ("log_square" if f.name.startswith("I") else "none") for f in source.fields)
    source.set_context_fields(["C1", "I2"])
    assert [f.name for f in source.fields if f.role == Role.context] == ["I2", "C1"]
    with pytest.raises(ValueError, match="unknown context fields"):
        source.set_context_fields(["nope"])


def test_criteo_chunking_does_not_change_rows(tmp_path):
    rng = np.random.default_rng(1)
    lines = [
        criteo_line(str(rng.integers(2)), [str(v) for v in rng.integers(-1, 500, 13)], [f"{v:08x}" for v in rng.integers(0, 50, 26)])
        for _ in range(2000)
    ]
    lines[700] = "garbage line\n"
    path = tmp_path / "train.txt"
    path.write_text("".join(lines))
    whole = read_all(CriteoSource([path]))
    pieces = read_all(CriteoSource([path]), block_bytes=4096)
    assert whole[0] == pieces[0] and whole[1] == pieces[1]
    assert whole[2].as_dict() == pieces[2].as_dict() == {"wrong_column_count": 1}
    assert len(whole[1]) == 1999


# -- Avazu -----------------------------------------------------------------------
AVAZU_HEADER = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
    "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
)


def test_avazu_drops_id_and_splits_hour(tmp_path):
    rest = "1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79"
    rows = [
        f"1000009418151094273,0,14102100,{rest}",  # Tue 2014-10-21 00h
        f"10000169349117863715,1,14102617,{rest.replace('1fbe01fe', '')}",  # Sun 2014-10-26 17h, empty site_id
        f"42,1,14xx2617,{rest}",  # malformed hour
        f"43,0,14102617,{rest},extra",  # wrong column count
    ]
    path = tmp_path / "train.csv"
    path.write_text(AVAZU_HEADER + "\n" + "\n".join(rows) + "\n")
    source = AvazuSource([path])
    tokens, labels, malformed = read_all(source)
    assert malformed.as_dict() == {"bad_hour": 1, "wrong_column_count": 1}
    assert labels == [0.0, 1.0]
    assert "id" not in tokens and "hour" not in tokens and len(tokens) == 23
    assert tokens["weekday"] == ["1", "6"] and tokens["hour_of_day"] == ["0", "17"]
    assert tokens["site_id"] == ["1fbe01fe", None] and tokens["C21"] == ["79", "79"]
    assert tokens["C14"] == ["15706", "15706"] and tokens["device_ip"] == ["ddd2926e", "ddd2926e"]
    items = {f.name for f in source.fields if f.role == Role.item}
    assert items == {"C1", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"}


def test_avazu_without_its_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,click\n1,0\n")
    with pytest.raises(ValueError, match="lacks Avazu columns"):
        read_all(AvazuSource([path]))


# -- MovieLens-1M ------------------------------------------------------------------
def write_movielens(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.dat").write_bytes(
        b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117-1234\nbroken line\n"
    )
    (folder / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Café Society: A Story (1995)::Drama\n"  # Latin-1 é, a ':' inside the title
        "3::Untitled (2000)::\n".encode("latin-1")  # no genres
    )
    (folder / "ratings.dat").write_bytes(
        b"1::1::5::978300760\n"  # Sun 2000-12-31 22h UTC
        b"2::2::3::978824291\n"  # Sat 2001-01-06 23h
        b"3::3::4::1046454590\n"  # Fri 2003-02-28 17h
        b"9::1::4::978300760\n"  # unknown user
        b"1::2::x::978300760\n"  # bad rating
        b"1::2::4\n"  # too few columns
    )
    return folder


def test_movielens_joins_the_three_files(tmp_path):
    source = MovieLensSource([write_movielens(tmp_path / "ml")])
    tokens, labels, malformed = read_all(source)
    assert [f.name for f in source.fields] == [
        "user_id", "gender", "age", "occupation", "zip", "movie_id", "genres", "year", "month", "weekday", "hour_of_day",
    ]  # fmt: skip
    assert source.task == Task.regression and source.label == "rating"
    assert {f.name for f in source.fields if f.role == Role.item} == {"movie_id", "genres"}
    assert {f.name: f.kind for f in source.fields}["genres"] == Kind.multi
    assert malformed.as_dict() == {"bad_rating": 1, "unknown_user": 1, "users_bad_line": 1, "wrong_column_count": 1}
    assert labels == [5.0, 3.0, 4.0]
    assert tokens["user_id"] == ["1", "2", "3"] and tokens["movie_id"] == ["1", "2", "3"]
    assert tokens["gender"] == ["F", "M", "M"] and tokens["zip"] == ["48067", "70072", "55117-1234"]
    assert tokens["genres"] == [["Animation", "Children's", "Comedy"], ["Drama"], [None]]
    assert tokens["year"] == ["2000", "2001", "2003"] and tokens["month"] == ["12", "1", "2"]
    assert tokens["weekday"] == ["6", "5", "4"] and tokens["hour_of_day"] == ["22", "23", "17"]


def test_movielens_accepts_the_three_files_and_names_a_missing_one(tmp_path):
    folder = write_movielens(tmp_path / "ml")
    files = [folder / "movies.dat", folder / "ratings.dat", folder / "users.dat"]
    assert read_all(MovieLensSource(files))[1] == [5.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="missing \\['movies.dat'\\]"):
        MovieLensSource(files[1:])


# -- generic CSV -------------------------------------------------------------------
def test_csv_from_a_yaml_config(tmp_path):
    config_path = tmp_path / "columns.yaml"
    config_path.write_text(
        "label: clicked\n"
        "delimiter: ';'\n"
        "fields:\n"
        "  - {name: country, role: context}\n"
        "  - {name: topics, role: item, kind: multi, separator: ','}\n"
        "  - {name: price, role: item, transform: log_square}\n"
    )
    data = tmp_path / "log.csv"
    data.write_text(
        'request;clicked;country;topics;price\n'
        'r1;1;DE;"news,sport";100\n'
        'r2;0;;;\n'
        'r3;0;FR;news;cheap\n'  # a non-numeric integer feature
        'r4;yes;FR;news;3\n'  # a label that is not a number
    )
    source = CsvSource([data], CsvConfig.from_yaml(config_path))
    tokens, labels, malformed = read_all(source)
    assert malformed.as_dict() == {"bad_label": 1, "non_numeric_integer": 1}
    assert labels == [1.0, 0.0]
    assert tokens == {"country": ["DE", None], "topics": [["news", "sport"], [None]], "price": ["b21", None]}
    assert [(f.name, f.role, f.kind, f.transform) for f in source.fields] == [
        ("country", Role.context, Kind.single, "none"),
        ("topics", Role.item, Kind.multi, "none"),
        ("price", Role.item, Kind.single, "log_square"),
    ]


def test_csv_from_flags_defaults_items_to_the_other_columns(tmp_path):
    config = config_from_flags(["user", "ad", "label", "tags"], "label", ["user"], multi_fields=["tags"])
    assert [(f.name, f.role.value, f.kind.value) for f in config.fields] == [
        ("user", "context", "single"), ("ad", "item", "single"), ("tags", "item", "multi"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not fields"):
        config_from_flags(["user", "ad", "label"], "label", ["user"], log_square_fields=["price"])


def test_csv_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("label: y\nfields: []\n")
    with pytest.raises(ValueError, match="invalid CSV config") as error:
        CsvConfig.from_yaml(bad)
    assert "\n" not in str(error.value)
