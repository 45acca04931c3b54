"""The typed run configuration and the one epoch loop: a misspelled option is an error
(in the config and on the command line), the generated flags round-trip a config,
the early-stopping state serialises and a resumed run equals an uninterrupted one, and
the pruning hook reproduces the pruned FwFM's two phases."""

from pathlib import Path

import numpy as np
import pytest
import torch

from model_zoo.batch import FeatureBatch
from model_zoo.model_config import CONFIG_BY_KIND, MODEL_CONFIG, DPLRFwFMConfig, PrunedFwFMConfig, TensorFMConfig
from model_zoo.registry import KINDS
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.training import (
    EpochHook,
    PruneBeforeEpoch,
    TrainConfig,
    Trainer,
    TrainingState,
    cpu_state,
    evaluate,
    fit_in_memory,
    is_better,
    minibatches,
)
from rayjobs.cli import build_parser, main
from rayjobs.train import FLAGS, TrainJobConfig
from rayjobs.tune import TuneJob, architectures


@pytest.fixture(scope="module")
def planted():
    planted = planted_model(PlantedConfig(context_fields=3, item_fields=3, vocab_size=20, structure="sparse", seed=4))
    rng = np.random.default_rng(1)
    splits = []
    for rows in (3000, 1000):
        columns, labels, _ = planted.sample(rows, rng)
        splits.append(FeatureBatch.from_columns(planted.schema, columns, labels))
    return planted.schema, *splits


def test_every_model_kind_has_one_config_that_builds_it(planted):
    schema = planted[0]
    assert set(CONFIG_BY_KIND) == set(KINDS)
    for kind, config in CONFIG_BY_KIND.items():
        model = config(dim=4).build(schema, sparse=True)
        assert model.hyperparameters()["kind"] == kind


def test_a_misspelled_or_foreign_option_is_an_error():
    with pytest.raises(ValueError, match="rnak"):
        MODEL_CONFIG.validate_python({"model": "dplr_fwfm", "rnak": 3})
    with pytest.raises(ValueError, match="orders"):  # a tensorfm option on an FM
        MODEL_CONFIG.validate_python({"model": "fm", "orders": [2]})
    with pytest.raises(ValueError, match="learnig_rate"):
        TrainConfig(learnig_rate=0.1)
    with pytest.raises(ValueError, match="rank"):  # model options live in the model's config only
        TrainJobConfig(data=Path("d"), out=Path("o"), rank=2)


def test_a_misspelled_or_foreign_flag_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--rnak", "2"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --rnak 2" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--model", "fm", "--rank", "2"]) == 2
    assert capsys.readouterr().err.strip() == "rankstream train: error: --rank: not an option of fm"
    assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--lr-min", "0.5", "--lr-max", "0.1"]) == 2
    assert capsys.readouterr().err.strip() == "rankstream tune: error: need --lr-min <= --lr-max"
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--model", "tensorfm", "--orders", "2", "3",
                 "--cp-ranks", "0", "2"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip() == "rankstream train: error: --cp-ranks: Input should be greater than or equal to 1"
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "rankstream train: error: --epochs: Input should be greater than or equal to 1"
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--model", "tensorfm", "--orders", "2", "3",
                 "--cp-ranks", "2"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip() == (
        "rankstream train: error: give one CP rank per order: orders [2, 3], CP ranks [2]"
    )


@pytest.mark.parametrize("model", [
    TensorFMConfig(dim=4, orders=[2, 3], cp_ranks=[3, 1], factor_init="reference"),
    PrunedFwFMConfig(dim=8, rank=3, prune_epoch=2),
    CONFIG_BY_KIND["me_dplr_fwfm"](sets=3, rank=1),
    CONFIG_BY_KIND["rafm"](dim=8, ranks=[4, 8], thresholds=[10]),
])  # fmt: skip
def test_the_generated_flags_round_trip_a_config(model):
    job = TrainJobConfig(
        data=Path("/data"), out=Path("/out"), model=model, workers=3, progress=False, storage_path=Path("/runs"),
        train=TrainConfig(epochs=7, optimizer="rowwise_adagrad", learning_rate=0.2, l2=0.0, patience=2),
    )  # fmt: skip
    argv = FLAGS.argv(job)
    assert FLAGS.parse(build_parser().parse_args(["train", *argv])) == job
    spelled = ["train", "--data", "/data", "--out", "/out", "--model", "tensorfm", "--orders", "2", "3", "--cp-ranks", "3", "1",
               "--lr", "0.2", "--epochs", "7"]  # fmt: skip
    parsed = FLAGS.parse(build_parser().parse_args(spelled))
    assert parsed.model == TensorFMConfig(orders=[2, 3], cp_ranks=[3, 1])
    assert (parsed.train.learning_rate, parsed.train.epochs, parsed.train.l2) == (0.2, 7, TrainConfig().l2)
    assert FLAGS.parse(build_parser().parse_args(["train", "--data", "d", "--out", "o"])).model == DPLRFwFMConfig()


def test_tune_search_space_holds_tensorfm_orders_and_cp_ranks():
    job = TuneJob(data=Path("d"), out=Path("o"), kinds=["tensorfm", "fm"], orders=["2", "2+3"], ranks=[1, 2], dims=[4])
    spaces = architectures(job.kinds, job.dims, job.ranks, job.order_sets)
    assert [(a["model"], a.get("orders"), a.get("cp_ranks")) for a in spaces] == [
        ("tensorfm", [2], [1]), ("tensorfm", [2], [2]), ("tensorfm", [2, 3], [1, 1]), ("tensorfm", [2, 3], [2, 2]),
        ("fm", None, None),
    ]  # fmt: skip
    assert all(MODEL_CONFIG.validate_python(a).dim == 4 for a in spaces)


def test_the_one_nan_rule():
    nan = float("nan")
    assert is_better(nan, None, True) and not is_better(nan, 0.5, True)
    assert is_better(0.1, nan, True) and is_better(0.1, nan, False)
    assert is_better(0.6, 0.5, True) and not is_better(0.6, 0.5, False)


def test_the_early_stopping_state_serialises_and_a_resumed_run_equals_an_uninterrupted_one(planted):
    schema, train, valid = planted
    config = TrainConfig(epochs=4, batch_size=128, optimizer="sgd", learning_rate=0.5, patience=4)

    def fresh():
        torch.manual_seed(0)
        return DPLRFwFMConfig(dim=4, rank=1).build(schema, sparse=True)

    whole_model = fresh()
    whole = fit_in_memory(whole_model, config, train, valid)

    class KeepLastWeights(EpochHook):  # what a checkpoint holds besides the state
        def after_epoch(self, report, improved, model, state):
            self.weights = cpu_state(model)

    last = KeepLastWeights()
    first = fit_in_memory(fresh(), config.model_copy(update={"epochs": 2}), train, valid, hooks=[last])
    restored = TrainingState.model_validate_json(first.model_dump_json())
    assert restored.stopping.best_weights is None  # the weights travel as their own file
    restored.stopping.best_weights = first.stopping.best_weights
    assert restored.model_dump() == first.model_dump()

    resumed_model = fresh()
    resumed_model.load_state_dict(last.weights)
    resumed = fit_in_memory(resumed_model, config, train, valid, state=restored)
    assert [r.epoch for r in resumed.history] == [0, 1, 2, 3]
    for ours, uninterrupted in zip(resumed.history, whole.history):
        assert ours.valid == pytest.approx(uninterrupted.valid, rel=1e-5)
    assert (resumed.best_epoch, resumed.stopping.stale_epochs) == (whole.best_epoch, whole.stopping.stale_epochs)
    for key, value in cpu_state(whole_model).items():
        torch.testing.assert_close(cpu_state(resumed_model)[key], value, rtol=1e-5, atol=1e-6)


def test_the_pruning_hook_reproduces_the_two_phases(planted):
    """Dense FwFM epochs, the ρ(m+1) largest |R_ij| kept before the prune epoch, kept
    entries fine-tuned; only pruned epochs can be the best."""
    schema, train, valid = planted
    config = TrainConfig(epochs=4, batch_size=128, optimizer="sgd", learning_rate=0.5, patience=4)
    rank, prune_at = 1, 2

    def fresh():
        torch.manual_seed(0)
        return PrunedFwFMConfig(dim=4, rank=rank).build(schema, sparse=True)

    hooked = fresh()
    state = fit_in_memory(hooked, config, train, valid, hooks=[PruneBeforeEpoch(prune_at, rank)])

    # By hand: the same epochs, the mask computed here from R, the best among pruned epochs.
    manual = fresh()
    trainer = Trainer(manual, config)
    torch.manual_seed(config.seed)
    history, weights = [], []
    for epoch in range(config.epochs):
        if epoch == prune_at:
            kept = torch.zeros_like(manual.kept)
            kept[manual.interaction_weights.detach().abs().topk(rank * (schema.num_fields + 1)).indices] = True
            with torch.no_grad():
                manual.kept.copy_(kept)
        trainer.train_epoch(epoch, minibatches(train, config.batch_size, seed=config.seed * 1000 + epoch))
        history.append(evaluate(manual, minibatches(valid, config.eval_batch_size)))
        weights.append(cpu_state(manual))
    assert [r.valid for r in state.history] == history
    best = prune_at + int(np.argmax([h["auc"] for h in history[prune_at:]]))
    assert state.best_epoch == best and state.stopping.first_candidate_epoch == prune_at
    assert int(hooked.kept.sum()) == rank * (schema.num_fields + 1)
    for key, value in weights[best].items():
        torch.testing.assert_close(cpu_state(hooked)[key], value)
