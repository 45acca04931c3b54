"""``rankstream experiment analyze``: the DPLR-FwFM paper's analyses on a trained bundle.

- An FwFM (or pruned FwFM): the post-hoc DPLR fit of its R at each ``--ranks`` ρ, the
  singular values of the fit's error beside those of the parameter-matched pruning
  (``spectrum.png``), and the test metric of the DPLR model built from the fit.
- Field importance from U (of a DPLR-FwFM bundle, or of the largest-rank post-hoc fit of
  an FwFM) and the test metric after dropping the 1…``--drop`` least important fields
  (``importance.png``). The maths is ``model_zoo.analysis``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from model_zoo.analysis import dplr_from_fwfm, field_drop_effect, field_importance, pruned_error_spectrum
from model_zoo.bundle import load_bundle
from model_zoo.data.reader import load_split
from model_zoo.metrics import primary_metric
from model_zoo.models.dplr_fwfm import DPLRFwFM
from model_zoo.models.fwfm import FwFM
from model_zoo.training import evaluate, minibatches
from rayjobs.options import FlatCommand, command


class AnalyzeJob(BaseModel):
    """`rankstream experiment analyze`: the bundle, its data and the analyses' sizes."""

    model_config = ConfigDict(extra="forbid")

    bundle: Path = Field(description="a trained fwfm, pruned_fwfm or dplr_fwfm bundle")
    data: Path = Field(description="the prepared dataset it was trained on (its test split is scored)")
    out: Path = Field(description="output directory")
    ranks: list[PositiveInt] = Field(default=[1, 2, 3], min_length=1, description="post-hoc DPLR ranks (FwFM bundles)")
    drop: int = Field(default=3, ge=0, description="drop up to this many least important fields")


FLAGS = FlatCommand("Analyze", AnalyzeJob)


def run_analyze(args: AnalyzeJob) -> int:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(args.bundle)
    model, test = bundle.model, load_split(args.data, "test")
    batches = lambda: minibatches(test, 65536)  # noqa: E731
    metric, _ = primary_metric(bundle.schema.task)
    report: dict = {"bundle": str(args.bundle.resolve()), "kind": model.kind, "test": evaluate(model, batches())}
    if isinstance(model, FwFM):
        fits = []
        for rank in args.ranks:
            dplr, fit = dplr_from_fwfm(model, rank)
            fits.append({
                "rank": rank, "test": evaluate(dplr, batches()), "error_spectrum": fit.error_spectrum.tolist(),
                "pruned_error_spectrum": pruned_error_spectrum(model.interaction_matrix().detach().numpy(), rank).tolist(),
            })  # fmt: skip
        report["post_hoc_dplr"] = fits
        plot_spectra(fits, out / "spectrum.png")
        importance_model = dplr
    elif isinstance(model, DPLRFwFM):
        importance_model = model
    else:
        raise ValueError(f"analyze takes an fwfm, pruned_fwfm or dplr_fwfm bundle, not {model.kind}")
    report["field_importance"] = field_importance(importance_model)
    report["field_drop"] = field_drop_effect(importance_model, batches, args.drop)
    plot_importance(report["field_importance"], report["field_drop"], metric, out / "importance.png")
    (out / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    for row in report.get("post_hoc_dplr", []):
        print(f"post-hoc DPLR rank {row['rank']}: test {metric} {row['test'][metric]:.4f}; largest error singular "
              f"value {row['error_spectrum'][0]:.4f} (pruned: {row['pruned_error_spectrum'][0]:.4f})")  # fmt: skip
    for row in report["field_drop"]:
        print(f"dropping {row['dropped'] or 'no fields'}: test {metric} {row[metric]:.4f}")
    print(f"wrote {out}/analysis.json, importance.png" + (", spectrum.png" if "post_hoc_dplr" in report else ""))
    return 0


def plot_spectra(fits: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for fit in fits:
        line = axis.plot(fit["error_spectrum"], "-o", markersize=3, label=f"DPLR ρ={fit['rank']}")[0]
        axis.plot(fit["pruned_error_spectrum"], "--", color=line.get_color(), label=f"pruned ρ={fit['rank']}")
    axis.set_xlabel("index")
    axis.set_ylabel("singular value of R − approximation")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_importance(importance: list[tuple[str, float]], drops: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    left.barh([name for name, _ in importance][::-1], [score for _, score in importance][::-1])
    left.set_xlabel("importance sqrt(Σ_r |e_r| U_ri²)")
    right.plot([len(d["dropped"]) for d in drops], [d[metric] for d in drops], "-o")
    right.set_xlabel("least important fields dropped")
    right.set_ylabel(f"test {metric}")
    right.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="post-hoc DPLR fit and field importance of a trained bundle")
    command(parser, FLAGS, run_analyze)
