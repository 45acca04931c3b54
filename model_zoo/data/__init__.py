"""Dataset preparation (raw files -> parquet + schema.json + vocab/ + stats.json) and
the readers that turn prepared parquet back into ``FeatureBatch``es. See docs/data.md."""

from model_zoo.data.avazu import AvazuSource
from model_zoo.data.criteo import CriteoSource
from model_zoo.data.csv_generic import CsvConfig, CsvField, CsvSource, config_from_flags
from model_zoo.data.layout import SPLITS, arrow_schema, load_schema, split_files, weights_column
from model_zoo.data.movielens import MovieLensSource
from model_zoo.data.prepare import PrepareConfig, prepare_dataset
from model_zoo.data.reader import batch_from_numpy, batch_from_table, iter_batches, iter_tables, load_split
from model_zoo.data.source import Malformed, RawChunk, RawField, RawSource
from model_zoo.data.synth import SynthConfig, load_planted, write_synthetic

__all__ = [
    "SPLITS",
    "AvazuSource",
    "CriteoSource",
    "CsvConfig",
    "CsvField",
    "CsvSource",
    "Malformed",
    "MovieLensSource",
    "PrepareConfig",
    "RawChunk",
    "RawField",
    "RawSource",
    "SynthConfig",
    "arrow_schema",
    "batch_from_numpy",
    "batch_from_table",
    "config_from_flags",
    "iter_batches",
    "iter_tables",
    "load_planted",
    "load_schema",
    "load_split",
    "prepare_dataset",
    "split_files",
    "weights_column",
    "write_synthetic",
]
