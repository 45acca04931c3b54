"""``rankstream demo``: the main job end to end. For now: train a DPLR-FwFM on planted
synthetic click data, then rank an auction with a cached context and a catalog."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from model_zoo.batch import FeatureBatch
from model_zoo.catalog import ItemCatalog
from model_zoo.metrics import binary_metrics
from model_zoo.models.dplr_fwfm import DPLRFwFM
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.training import EpochReport, TrainConfig, fit_in_memory


def handle(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)  # long report lines stay whole in logs and pipes
    torch.manual_seed(args.seed)
    planted = planted_model(PlantedConfig(structure="dplr", rank=args.rank, multi_fields=1, vocab_size=50, seed=args.seed))
    rng = np.random.default_rng(args.seed)
    console.rule("[bold]1/3 planted synthetic click data")
    splits = {}
    for name, rows in (("train", args.rows), ("valid", args.rows // 8)):
        columns, labels, logits = planted.sample(rows, rng)
        splits[name] = (FeatureBatch.from_columns(planted.schema, columns, labels), logits)
    oracle = binary_metrics(splits["valid"][0].label.numpy(), splits["valid"][1])
    console.print(f"{args.rows} training rows, {planted.schema.num_fields} fields; oracle validation AUC {oracle['auc']:.4f}")

    console.rule(f"[bold]2/3 training DPLR-FwFM rank {args.rank}")
    model = DPLRFwFM(planted.schema, dim=8, rank=args.rank, sparse=True)

    def show(report: EpochReport) -> None:
        console.print(
            f"epoch {report.epoch}: loss {report.train_loss:.4f}  valid AUC {report.valid['auc']:.4f}  "
            f"logloss {report.valid['logloss']:.4f}  {report.samples_per_second:,.0f} samples/s"
        )

    result = fit_in_memory(model, TrainConfig(epochs=args.epochs, batch_size=512), splits["train"][0], splits["valid"][0], show)
    model.eval()

    console.rule("[bold]3/3 ranking an auction (cached context, catalog top-K)")
    columns, _, _ = planted.sample(args.items, rng)
    batch = FeatureBatch.from_columns(planted.schema, columns)
    context = batch.select(planted.schema, planted.schema.context_fields).rows(slice(0, 1))
    items = batch.select(planted.schema, planted.schema.item_fields)
    with torch.inference_mode():
        started = time.perf_counter()
        scores = model.score_items(model.encode_context(context), items)
        scoring_ms = (time.perf_counter() - started) * 1000
        catalog = ItemCatalog(model, [f"ad-{i}" for i in range(args.items)], items)
        top_scores, top_ids = catalog.top_k(model.encode_context(context), 5)
    table = Table("item", "CTR")
    for item_id, score in zip(top_ids[0], top_scores[0].tolist()):
        table.add_row(item_id, f"{1 / (1 + np.exp(-score)):.4f}")
    console.print(table)
    console.print(
        f"best validation AUC {result.best_valid['auc']:.4f} (oracle {oracle['auc']:.4f}); "
        f"scored {args.items} items in {scoring_ms:.2f} ms; top score matches: "
        f"{bool(torch.isclose(scores.max(), top_scores[0, 0], atol=1e-5))}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the main job end to end")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=handle)
