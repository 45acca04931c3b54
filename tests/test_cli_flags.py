"""The commands' flags come from their typed configurations (rayjobs/options.py): an
unknown or misspelled flag is an error, the generated flags round-trip a configuration,
each flag sets its own option, a violated constraint is an error naming its flag,
and the Serve config file for `serve deploy` holds the defaults `rankstream serve up` has
(ScorerArgs, the Serve application's own arguments, declares them once)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from model_zoo.mf import MFConfig
from model_zoo.schema import Task
from model_zoo.synthetic import PlantedConfig
from model_zoo.bayes_fm import GibbsConfig
from rayjobs import (
    analyze, baselines, bench_mf, bench_scoring, bench_stream, broker, cluster, demo, prepare, produce, serve, synth, train_gibbs,
)
from rayjobs.cli import build_parser, main
from serve_app.config import ModelConfig, ScorerArgs
from streaming.kafka_config import TopicNames
from streaming.protocol import ProtocolLimits

REPO = Path(__file__).resolve().parents[1]
# (the words that choose the command's parser, the arguments a run needs, its FlatCommand)
COMMANDS = [
    (["serve"], ["status"], serve.FLAGS),
    (["broker"], ["status"], broker.FLAGS),
    (["cluster"], ["status"], cluster.FLAGS),
    (["produce"], [], produce.FLAGS),
    (["demo"], [], demo.FLAGS),
    (["down"], [], demo.DOWN_FLAGS),
    (["experiment", "analyze"], ["--bundle", "b", "--data", "d", "--out", "o"], analyze.FLAGS),
    (["synth"], ["--rows", "10", "--out", "o"], synth.FLAGS),
    (["prepare"], ["--dataset", "criteo", "--input", "a", "--out", "o"], prepare.FLAGS),
    (["experiment", "baselines"], ["--data", "d", "--out", "o"], baselines.FLAGS),
    (["train-gibbs"], ["--data", "d", "--out", "o"], train_gibbs.FLAGS),
    (["bench", "scoring"], [], bench_scoring.FLAGS),
    (["bench", "mf"], ["--planted"], bench_mf.FLAGS),
    (["bench", "stream"], [], bench_stream.FLAGS),
]


def parse(words: list[str], flags, *argv: str):
    return flags.parse(build_parser().parse_args([*words, *argv]))


@pytest.mark.parametrize(("words", "needed", "flags"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_an_unknown_flag_is_an_error(words, needed, flags, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*words, *needed, "--replicsa", "2"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --replicsa 2" in capsys.readouterr().err


@pytest.mark.parametrize(("words", "needed", "flags"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_the_defaults_round_trip(words, needed, flags):
    config = parse(words, flags, *needed)
    assert parse(words, flags, *flags.argv(config)) == config


# (command words, flags, the typed configuration they give): each setting reaches its option
TYPED = [
    (["experiment", "analyze"], ["--bundle", "b", "--data", "d", "--out", "o", "--ranks", "2", "4", "--drop", "0"],
     analyze.AnalyzeJob(bundle=Path("b"), data=Path("d"), out=Path("o"), ranks=[2, 4], drop=0)),
    (["synth"], ["--rows", "50", "--out", "o", "--split", "0.6,0.2,0.2", "--no-progress", "--overwrite",
                 "--structure", "sparse", "--sparse-pairs", "4", "--item-fields", "3", "--multi-fields", "2",
                 "--task", "regression", "--noise", "0.5", "--seed", "7"],
     synth.SynthJob(rows=50, out=Path("o"), split=(0.6, 0.2, 0.2), progress=False, overwrite=True,
                    planted=PlantedConfig(structure="sparse", sparse_pairs=4, item_fields=3, multi_fields=2,
                                          task=Task.regression, noise=0.5, seed=7))),
    (["prepare"], ["--dataset", "csv", "--input", "a.csv", "b.csv", "--out", "o", "--min-count", "2", "--seed", "3",
                   "--split", "0.7,0.2,0.1", "--context-fields", "user,country", "ad", "--label", "y", "--task", "regression",
                   "--multi-fields", "tags", "--multi-separator", ";", "--log-square-fields", "price", "--delimiter", "\t"],
     prepare.PrepareJob(dataset="csv", input=[Path("a.csv"), Path("b.csv")], out=Path("o"), min_count=2, seed=3,
                        split=(0.7, 0.2, 0.1), context_fields=["user", "country", "ad"],
                        csv=prepare.CsvFlags(label="y", task=Task.regression, multi_fields=["tags"], multi_separator=";",
                                             log_square_fields=["price"], delimiter="\t"))),
    (["experiment", "baselines"], ["--data", "d", "--out", "o", "--dim", "4", "--kinds", "fm", "tensorfm", "--ranks", "2",
                                   "--myfm-rank", "3", "--myfm-iterations", "9", "--surprise", "SVD", "--user-field", "u",
                                   "--item-field", "i", "--seed", "5", "--gibbs-dim", "3", "--gibbs-export-dim", "6",
                                   "--gibbs-priors", "field"],
     baselines.BaselinesJob(data=Path("d"), out=Path("o"), dim=4, kinds=["fm", "tensorfm"], ranks=[2], myfm_rank=3,
                            myfm_iterations=9, surprise=["SVD"], user_field="u", item_field="i", seed=5,
                            gibbs=GibbsConfig(dim=3, export_dim=6, priors="field"))),
    (["train-gibbs"], ["--data", "d", "--out", "o", "--dim", "4", "--iterations", "30", "--burn-in", "3", "--export-dim", "12",
                       "--init-std", "0.2", "--priors", "field", "--seed", "2", "--no-progress"],
     train_gibbs.GibbsTrainJob(data=Path("d"), out=Path("o"), progress=False,
                               gibbs=GibbsConfig(dim=4, iterations=30, burn_in=3, export_dim=12, init_std=0.2, priors="field", seed=2))),
    (["bench", "scoring"], ["--json", "s.json", "--items", "7", "--context-fields", "2", "3", "--ranks", "2",
                            "--tensorfm-orders", "2+3", "3", "--models", "fm", "tensorfm", "--fields", "6", "--dim", "4",
                            "--vocab-size", "9", "--warmup", "0", "--repeats", "2", "--seed", "1"],
     bench_scoring.BenchScoringJob(json_path=Path("s.json"), items=[7], context_fields=[2, 3], ranks=[2],
                                   tensorfm_orders=["2+3", "3"], models=["fm", "tensorfm"], fields=6, dim=4,
                                   vocab_size=9, warmup=0, repeats=2, seed=1)),
    (["bench", "mf"], ["--data", "ml", "--user-field", "u", "--item-field", "m", "--json", "m.json", "--rates", "0.2",
                       "--rules", "first_small", "--repeats", "1", "--dim", "64", "--epochs", "4", "--lr", "0.02",
                       "--l2", "0.01", "--init-std", "0.2", "--prune-after-epoch", "3", "--seed", "2"],
     bench_mf.BenchMFJob(data=Path("ml"), user_field="u", item_field="m", json_path=Path("m.json"), rates=[0.2],
                         rules=["first_small"], repeats=1,
                         mf=MFConfig(dim=64, epochs=4, learning_rate=0.02, l2=0.01, init_std=0.2, prune_after_epoch=3, seed=2))),
    (["bench", "mf"], ["--planted", "--planted-shape", "10", "20", "3", "500", "--planted-noise", "0.1"],
     bench_mf.BenchMFJob(planted=True, planted_shape=[10, 20, 3, 500], planted_noise=0.1)),
    (["bench", "stream"], ["--json", "s.json", "--rates", "50", "75", "--latency-rates", "--seconds", "2", "--rounds", "1",
                           "--replicas", "2", "--partitions", "3", "--items", "5", "--item-format", "rows",
                           "--context-fields", "2", "--item-fields", "3", "--vocab-size", "20", "--rank", "1", "--dim", "4",
                           "--distinct", "20", "--context-cache-size", "0", "--linger-ms", "0", "--seed", "4"],
     bench_stream.BenchStreamJob(json_path=Path("s.json"), rates=[50, 75], latency_rates=[], seconds=2, rounds=1,
                                 replicas=2, partitions=3, items=5, item_format="rows", context_fields=2, item_fields=3,
                                 vocab_size=20, rank=1, dim=4, distinct=20, context_cache_size=0, linger_ms=0, seed=4)),
]  # fmt: skip


@pytest.mark.parametrize(("words", "argv", "expected"), TYPED, ids=[" ".join(c[0]) for c in TYPED])
def test_flags_give_the_typed_configuration(words, argv, expected):
    flags = next(f for w, _, f in COMMANDS if w == words)
    config = parse(words, flags, *argv)
    assert config == expected
    assert parse(words, flags, *flags.argv(config)) == config


# (command words, flags, the error): a constraint's violation names the flag
INVALID = [
    (["experiment", "analyze"], ["--bundle", "b", "--data", "d", "--out", "o", "--ranks", "1", "0"],
     "--ranks: Input should be greater than 0"),
    (["experiment", "analyze"], ["--bundle", "b", "--data", "d", "--out", "o", "--drop", "-1"],
     "--drop: Input should be greater than or equal to 0"),
    (["synth"], ["--rows", "0", "--out", "o"], "--rows: Input should be greater than or equal to 1"),
    (["synth"], ["--rows", "9", "--out", "o", "--vocab-size", "2"], "--vocab-size: Input should be greater than or equal to 3"),
    (["synth"], ["--rows", "9", "--out", "o", "--structure", "low"], "--structure: Input should be 'dplr', 'sparse' or 'dense'"),
    (["prepare"], ["--dataset", "criteo", "--input", "a", "--out", "o", "--min-count", "0"],
     "--min-count: Input should be greater than or equal to 1"),
    (["prepare"], ["--dataset", "criteo", "--input", "a", "--out", "o", "--split", "0.8,x,0.1"], "--split: Input should be a valid number"),
    (["prepare"], ["--dataset", "csv", "--input", "a", "--out", "o", "--delimiter", ";;"],
     "--delimiter: String should have at most 1 character"),
    (["prepare"], ["--dataset", "tsv", "--input", "a", "--out", "o"], "--dataset: Input should be 'criteo', 'avazu', 'movielens1m' or 'csv'"),
    (["experiment", "baselines"], ["--data", "d", "--out", "o", "--kinds", "pruned_fwfm"],
     "--kinds: Input should be 'fm', 'fwfm', 'dplr_fwfm' or 'tensorfm'"),
    (["experiment", "baselines"], ["--data", "d", "--out", "o", "--myfm-iterations", "0"],
     "--myfm-iterations: Input should be greater than or equal to 1"),
    (["experiment", "baselines"], ["--data", "d", "--out", "o", "--surprise", "KNN"], "--surprise: Input should be 'BaselineOnly', 'SVD' or 'SVD++'"),
    (["train-gibbs"], ["--data", "d", "--out", "o", "--iterations", "5", "--burn-in", "5"],
     "burn_in 5 leaves no sample of 5 iterations"),
    (["train-gibbs"], ["--data", "d", "--out", "o", "--priors", "user"], "--priors: Input should be 'shared' or 'field'"),
    (["bench", "scoring"], ["--tensorfm-orders", "2", "2x3"], "--tensorfm-orders: String should match pattern"),
    (["bench", "scoring"], ["--repeats", "0"], "--repeats: Input should be greater than 0"),
    (["bench", "scoring"], ["--fields", "8", "--context-fields", "8"], "every --context-fields must be below --fields"),
    (["bench", "mf"], ["--planted", "--rates", "0.5", "1"], "--rates: Input should be less than 1"),
    (["bench", "mf"], ["--planted", "--planted-shape", "10", "20", "3"], "--planted-shape: List should have at least 4 items"),
    (["bench", "mf"], ["--planted", "--rules", "top"], "--rules: Input should be 'count' or 'first_small'"),
    (["bench", "mf"], ["--planted", "--data", "d"], "give exactly one of --data and --planted"),
    (["bench", "mf"], ["--planted", "--dim", "0"], "--dim: Input should be greater than or equal to 1"),
    (["bench", "stream"], ["--rates", "100", "-5"], "--rates: Input should be greater than 0"),
    (["bench", "stream"], ["--linger-ms", "-1"], "--linger-ms: Input should be greater than or equal to 0"),
    (["bench", "stream"], ["--item-format", "json"], "--item-format: Input should be 'rows', 'columns' or 'packed'"),
]  # fmt: skip


@pytest.mark.parametrize(("words", "argv", "error"), INVALID, ids=[f"{' '.join(c[0])} {c[2].split(':')[0]}" for c in INVALID])
def test_a_violated_constraint_names_its_flag(words, argv, error):
    flags = next(f for w, _, f in COMMANDS if w == words)
    with pytest.raises(ValueError, match=re.escape(error)):  # never runs the command (`main` prints this line)
        parse(words, flags, *argv)


def test_a_bad_flag_value_is_one_error_line(capsys):
    assert main(["bench", "scoring", "--repeats", "0"]) == 2
    assert capsys.readouterr().err == "rankstream bench: error: --repeats: Input should be greater than 0\n"


def test_serve_flags_are_the_scorer_args():
    config = parse(["serve", "up"], serve.FLAGS, "--bundle", "b", "--replicas", "3", "--auctions-topic", "bids",
                   "--reply-to-pattern", "replies-.*", "--max-items", "7", "--group-id", "g", "--no-kafka", "--json")  # fmt: skip
    assert config.model == ModelConfig(bundle="b")
    assert config.scorer == ScorerArgs(
        num_replicas=3, group_id="g", topics=TopicNames(auctions="bids", reply_to_pattern="replies-.*"),
        limits=ProtocolLimits(max_items=7),
    )  # fmt: skip
    assert (config.kafka, config.json_status) == (False, True)
    assert parse(["serve"], serve.FLAGS, *serve.FLAGS.argv(config)) == config
    assert parse(["serve", "status"], serve.FLAGS).model is None  # the model is up's alone
    with pytest.raises(ValueError, match="--bundle: Field required"):
        parse(["serve", "up"], serve.FLAGS, "--catalog", "c.parquet")
    with pytest.raises(ValueError, match="--replicas: Input should be greater than or equal to 1"):
        parse(["serve", "up"], serve.FLAGS, "--bundle", "b", "--replicas", "0")


def test_produce_and_broker_flags():
    job = parse(["produce"], produce.FLAGS, "--count", "5", "--json", "r.json", "--no-progress", "--dlq-topic", "dead")
    assert (job.count, job.json_path, job.progress, job.topics.dlq) == (5, Path("r.json"), False, "dead")
    assert parse(["produce"], produce.FLAGS, *produce.FLAGS.argv(job)) == job
    up = parse(["broker", "up"], broker.FLAGS, "--partitions", "2", "--scores-topic", "s")
    assert (up.broker_command, up.partitions, up.topics) == ("up", 2, TopicNames(scores="s"))
    with pytest.raises(SystemExit):  # the scorer's reply-to pattern is no broker setting
        build_parser().parse_args(["broker", "up", "--reply-to-pattern", "x"])


def test_the_serve_config_file_has_serve_ups_defaults():
    """cluster/serve_config.yaml is what `serve up` deploys with the flags its comments
    name: every setting it spells out equals ScorerArgs' default unless a flag sets it.
    (The file stays hand-annotated for `serve deploy` users; this keeps it in step.)"""
    config = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    (deployment,) = application["deployments"]
    flags = parse(["serve", "up"], serve.FLAGS, "--bundle", deployment["user_config"]["bundle"],
                  "--replicas", str(deployment["num_replicas"]),
                  "--http-host", config["http_options"]["host"], "--http-port", str(config["http_options"]["port"]))  # fmt: skip
    kafka = application["args"]["kafka"]
    expected = flags.scorer.model_copy(update={"kafka": flags.client.model_copy(update=kafka).client_config()})
    assert ScorerArgs.model_validate(application["args"]) == expected
    assert ModelConfig.model_validate(deployment["user_config"]) == flags.model
    deployed = serve.serve_config(expected, flags.model, flags.http_host, flags.http_port)
    written = {**config, "applications": [{**application, "args": deployed["applications"][0]["args"]}]}
    assert deployed == written  # apart from args (num_replicas there too), the file is serve up's config
