"""``rankstream experiment baselines``: well-known peers trained on the very same prepared
split as rankstream's own models and scored on the same test split, in one table.

- a linear model on one-hot features (scikit-learn, always): logistic regression for
  clicks, ridge regression for ratings; its regularisation chosen on validation;
- myfm's Bayesian FM (Gibbs sampling; regression or probit classification) on the same
  one-hot features, every field included (``pip install 'rankstream[baselines]'``);
- for rating data, scikit-surprise's BaselineOnly, SVD and SVD++ on (user, item) alone;
- rankstream's FM, FwFM, DPLR-FwFM and tensorFM (order 2) trained with the default recipe
  (``TrainConfig``'s defaults), the way ``rankstream train`` trains them.

Every model sees the training split only; choices (regularisation, epochs) use the
validation split; the table reports the test split.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from model_zoo.batch import FeatureBatch
from model_zoo.bayes_fm import GibbsConfig, one_hot
from model_zoo.metrics import constant_baseline, primary_metric, task_metrics
from model_zoo.schema import FeatureSchema, Role, Task
from model_zoo.training import TrainConfig, evaluate, fit_in_memory, minibatches, uses_sparse_gradients
from rayjobs.options import FlatCommand, command
from rayjobs.train_gibbs import fit_gibbs_fm
from rayjobs.tune import Splits, TunableKind, architectures, build_trial_model, load_splits, parameter_count

EXTRAS_HINT = "pip install 'rankstream[baselines]'  (myfm, scikit-surprise)"
LINEAR_STRENGTHS = (0.1, 1.0, 10.0, 100.0)  # sklearn's C (logistic) or alpha (ridge), chosen on validation


def labels_of(batch: FeatureBatch) -> np.ndarray:
    return batch.label.numpy().astype(np.float64)


class PeerResult(dict):
    """One table row: model, library, settings, valid and test metrics, seconds."""


def row(model: str, library: str, settings: dict[str, Any], valid: dict, test: dict, seconds: float) -> PeerResult:
    return PeerResult(model=model, library=library, settings=settings, valid=valid, test=test, seconds=seconds)


def linear_model(splits: Splits, features: dict[str, sp.csr_matrix]) -> PeerResult:
    """Logistic (clicks) or ridge (ratings) regression on the one-hot features."""
    from sklearn.linear_model import LogisticRegression, Ridge

    task = splits.schema.task
    metric, higher_is_better = primary_metric(task)
    started = time.perf_counter()
    best = None
    for strength in LINEAR_STRENGTHS:
        if task == Task.binary:
            model = LogisticRegression(C=strength, max_iter=2000).fit(features["train"], labels_of(splits.train))
            predict = model.decision_function
        else:
            model = Ridge(alpha=strength).fit(features["train"], labels_of(splits.train))
            predict = model.predict
        valid = task_metrics(task, labels_of(splits.valid), predict(features["valid"]))
        if best is None or (valid[metric] > best[1][metric] if higher_is_better else valid[metric] < best[1][metric]):
            best = (strength, valid, task_metrics(task, labels_of(splits.test), predict(features["test"])))
    strength, valid, test = best
    name, knob = ("logistic regression", "C") if task == Task.binary else ("ridge regression", "alpha")
    return row(f"{name}, one-hot", "scikit-learn", {knob: strength}, valid, test, time.perf_counter() - started)


def myfm_model(splits: Splits, features: dict[str, sp.csr_matrix], rank: int, iterations: int, seed: int) -> PeerResult:
    """myfm's Bayesian FM (Gibbs sampling, posterior-mean prediction) on every field."""
    import myfm

    task = splits.schema.task
    started = time.perf_counter()
    if task == Task.binary:
        model = myfm.MyFMClassifier(rank=rank, random_seed=seed)
        model.fit(features["train"], labels_of(splits.train).astype(int), n_iter=iterations, callback=_quiet)
        # Probabilities to logits: the metrics take scores on the logit scale.
        predict = lambda x: _logit(model.predict_proba(x))  # noqa: E731
    else:
        model = myfm.MyFMRegressor(rank=rank, random_seed=seed)
        model.fit(features["train"], labels_of(splits.train), n_iter=iterations, callback=_quiet)
        predict = model.predict
    valid = task_metrics(task, labels_of(splits.valid), predict(features["valid"]))
    test = task_metrics(task, labels_of(splits.test), predict(features["test"]))
    kind = "classification (probit)" if task == Task.binary else "regression"
    return row(
        f"Bayesian FM {kind}, one-hot", "myfm", {"rank": rank, "mcmc_iterations": iterations}, valid, test,
        time.perf_counter() - started,
    )  # fmt: skip


def _quiet(*_: Any) -> tuple[bool, None]:
    """A callback in place of myfm's progress bar: never stop early."""
    return False, None


def _logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


SURPRISE_MODELS = ("BaselineOnly", "SVD", "SVD++")


def surprise_models(
    splits: Splits, user_field: str, item_field: str, seed: int, names: tuple[str, ...] = SURPRISE_MODELS
) -> list[PeerResult]:
    """BaselineOnly, SVD and SVD++ (or those named) on (user, item, rating) alone, library defaults."""
    import pandas as pd
    from surprise import SVD, BaselineOnly, Dataset, Reader, SVDpp

    columns = [splits.schema.fields[splits.schema.index[n]] for n in (user_field, item_field)]
    positions = [splits.train.single_fields.index(c.name) for c in columns]

    def triples(batch: FeatureBatch) -> list[tuple[int, int, float]]:
        ids = batch.single[:, positions].numpy()
        return list(zip(ids[:, 0].tolist(), ids[:, 1].tolist(), labels_of(batch).tolist()))

    train_labels = labels_of(splits.train)
    reader = Reader(rating_scale=(float(train_labels.min()), float(train_labels.max())))
    frame = pd.DataFrame(triples(splits.train), columns=["user", "item", "rating"])
    trainset = Dataset.load_from_df(frame, reader).build_full_trainset()
    results = []
    algorithms = {"BaselineOnly": BaselineOnly, "SVD": SVD, "SVD++": SVDpp}
    for name, make in ((name, algorithms[name]) for name in names):
        started = time.perf_counter()
        options = {} if make is BaselineOnly else {"random_state": seed}
        algorithm = make(**options)
        algorithm.fit(trainset)
        scores = {}
        for split, batch in (("valid", splits.valid), ("test", splits.test)):
            predictions = algorithm.test(triples(batch))
            scores[split] = task_metrics(Task.regression, labels_of(batch), np.array([p.est for p in predictions]))
        results.append(
            row(f"{name} ({user_field}, {item_field})", "scikit-surprise", {}, scores["valid"], scores["test"],
                time.perf_counter() - started)
        )  # fmt: skip
    return results


def rankstream_model(splits: Splits, arch: dict[str, Any], config: TrainConfig) -> PeerResult:
    """One of rankstream's models (a model configuration, as ``architectures`` gives it)
    with the default recipe, as ``rankstream train`` runs it."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_trial_model(splits.schema, arch, sparse=uses_sparse_gradients(config.optimizer))
    result = fit_in_memory(model, config, splits.train, splits.valid)
    test = evaluate(model, minibatches(splits.test, config.eval_batch_size))
    options = {k: v for k, v in arch.items() if k not in ("model", "dim")}
    settings = {"dim": arch["dim"], **options, "epochs_run": len(result.history), "best_epoch": result.best_epoch + 1,
                "parameters": parameter_count(model)}  # fmt: skip
    return row(model_name(arch), "rankstream", settings, result.best_valid, test, time.perf_counter() - started)


def gibbs_fm_model(splits: Splits, config: GibbsConfig) -> PeerResult:
    """rankstream's Bayesian FM (Gibbs sampling), scored as the FM it exports (as train-gibbs)."""
    _, metrics = fit_gibbs_fm(splits, config)
    settings = {**config.model_dump(exclude={"seed"}), "exported_dim": metrics["dim"]}
    return row("Bayesian FM (Gibbs), served as an FM", "rankstream", settings, metrics["valid"], metrics["test"], metrics["seconds"])


def model_name(arch: dict[str, Any]) -> str:
    kind = arch["model"]
    if kind == "dplr_fwfm":
        return f"DPLR-FwFM rank {arch['rank']}"
    if kind == "tensorfm":
        orders, ranks = "+".join(map(str, arch["orders"])), "+".join(map(str, arch["cp_ranks"]))
        return f"tensorFM order {orders}, CP rank {ranks}"
    return {"fm": "FM", "fwfm": "FwFM"}.get(kind, kind)


def default_user_item(schema: FeatureSchema) -> tuple[str, str] | None:
    """The first context and the first item field: (user, movie) for MovieLens."""
    context, items = schema.names_with_role(Role.context), schema.names_with_role(Role.item)
    return (context[0], items[0]) if context and items else None


def markdown(rows: list[PeerResult], task: Task) -> str:
    metrics = ("auc", "logloss") if task == Task.binary else ("rmse", "mse")
    header = ["model", "library", *(f"test {m}" for m in metrics), *(f"valid {m}" for m in metrics), "settings", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        numbers = [f"{r['test'][m]:.4f}" for m in metrics] + [f"{r['valid'][m]:.4f}" for m in metrics]
        lines.append("| " + " | ".join([r["model"], r["library"], *numbers, settings, f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def missing_extras() -> list[str]:
    return [name for name, module in (("myfm", "myfm"), ("scikit-surprise", "surprise")) if find_spec(module) is None]


class BaselinesJob(BaseModel):
    """`rankstream experiment baselines`: the dataset, the peers' settings and rankstream's models."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="a prepared dataset (rankstream prepare / synth)")
    out: Path = Field(description="output directory")
    dim: int = Field(default=8, ge=1, description="embedding size of rankstream's models")
    kinds: list[TunableKind] = Field(default=list(get_args(TunableKind)), min_length=1, description="rankstream models to train")
    ranks: list[PositiveInt] = Field(default=[1, 2, 3], min_length=1, description="DPLR ranks and tensorFM's CP ranks")
    myfm_rank: int = Field(default=8, ge=1, description="myfm's factor size")
    myfm_iterations: int = Field(default=200, ge=1, description="MCMC iterations")
    gibbs: GibbsConfig = Field(default_factory=GibbsConfig, description="rankstream's Bayesian FM")
    surprise: list[Literal[SURPRISE_MODELS]] = Field(  # type: ignore[valid-type]
        default=list(SURPRISE_MODELS), min_length=1, description="scikit-surprise models for rating data (SVD++ takes ~20 min on the MovieLens sample)"
    )
    user_field: str | None = Field(default=None, description="surprise's user column (unset: the first context field)")
    item_field: str | None = Field(default=None, description="surprise's item column (unset: the first item field)")
    seed: int = Field(default=0, description="of every model's training")


FLAGS = FlatCommand(
    "Baselines", BaselinesJob, sections={"gibbs": GibbsConfig}, exclude=["gibbs.seed"],
    renames={f"gibbs.{name}": f"gibbs_{name}" for name in GibbsConfig.model_fields if name != "seed"},
)  # fmt: skip


def run_baselines(args: BaselinesJob) -> int:
    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(args.data)
    schema, task = splits.schema, splits.schema.task
    missing = missing_extras()
    if missing:
        print(f"skipping {', '.join(missing)}: not installed; for the full table run {EXTRAS_HINT}")
    features = {name: one_hot(schema, getattr(splits, name)) for name in ("train", "valid", "test")}
    steps: list[Callable[[], list[PeerResult]]] = [lambda: [linear_model(splits, features)]]
    if "myfm" not in missing:
        steps.append(lambda: [myfm_model(splits, features, args.myfm_rank, args.myfm_iterations, args.seed)])
    default = default_user_item(schema) or (None, None)
    user_item = (args.user_field or default[0], args.item_field or default[1])
    if task == Task.regression and None not in user_item and "scikit-surprise" not in missing:
        steps.append(lambda: surprise_models(splits, *user_item, seed=args.seed, names=tuple(args.surprise)))
    steps.append(lambda: [gibbs_fm_model(splits, args.gibbs.model_copy(update={"seed": args.seed}))])
    config = TrainConfig(seed=args.seed)
    for arch in architectures(args.kinds, [args.dim], args.ranks):
        steps.append(lambda arch=arch: [rankstream_model(splits, arch, config)])
    train_labels = labels_of(splits.train)
    constant = {s: constant_baseline(task, train_labels, labels_of(getattr(splits, s))) for s in ("valid", "test")}
    rows = [row("constant (train mean)", "-", {}, constant["valid"], constant["test"], 0.0)]
    for step in steps:
        for result in step():
            rows.append(result)
            print(f"{result['model']} ({result['library']}): test {result['test']}", flush=True)
    table = markdown(rows, task)
    report = {
        "data": str(args.data.resolve()), "task": task.value, "num_fields": schema.num_fields,
        "rows_per_split": {"train": len(splits.train), "valid": len(splits.valid), "test": len(splits.test)},
        "rankstream_recipe": config.model_dump(), "missing_extras": missing, "rows": rows,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    (out / "baselines.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "baselines.md").write_text(table)
    print(table)
    print(f"wrote {out}/baselines.md and {out}/baselines.json")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("baselines", help="peer libraries beside rankstream's models on the same split")
    command(parser, FLAGS, run_baselines)


if __name__ == "__main__":
    from rayjobs.cli import run_module

    run_module(["experiment", "baselines"])
