"""Evaluation metrics: AUC and logloss for clicks, MSE/RMSE for ratings (never AUC on ratings)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from model_zoo.schema import Task


def binary_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    metrics = {"logloss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1]))}
    # AUC is undefined on a split holding one class only.
    metrics["auc"] = float(roc_auc_score(labels, logits)) if 0 < labels.sum() < len(labels) else float("nan")
    return metrics


def regression_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    error = np.asarray(predictions, dtype=np.float64) - np.asarray(labels, dtype=np.float64)
    mse = float(np.mean(error**2))
    return {"mse": mse, "rmse": float(np.sqrt(mse))}


def task_metrics(task: Task, labels: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    return binary_metrics(labels, outputs) if task == Task.binary else regression_metrics(labels, outputs)


def primary_metric(task: Task) -> tuple[str, bool]:
    """The model-selection metric and whether higher is better."""
    return ("auc", True) if task == Task.binary else ("mse", False)


def constant_baseline(task: Task, train_labels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of predicting the training mean for everyone: what any model must beat."""
    mean = float(np.mean(train_labels))
    if task == Task.binary:
        logit = np.log(np.clip(mean, 1e-7, 1 - 1e-7) / np.clip(1 - mean, 1e-7, 1))
        return binary_metrics(labels, np.full(len(labels), logit))
    return regression_metrics(labels, np.full(len(labels), mean))
