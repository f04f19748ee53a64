"""Evaluation metrics per task, as torchmetrics collections (keys = ``TaskSpec.metrics``)."""
from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)

from dpbench.data.tasks import TaskSpec


def _make_metric(name: str, num_labels: int) -> Metric:
    if num_labels == 2:  # F1 is for the positive class 1 (equivalent / duplicate)
        return {"accuracy": BinaryAccuracy, "f1": BinaryF1Score,
                "matthews": BinaryMatthewsCorrCoef}[name]()
    return {"accuracy": lambda: MulticlassAccuracy(num_labels, average="micro"),
            "f1": lambda: MulticlassF1Score(num_labels, average="macro"),
            "matthews": lambda: MulticlassMatthewsCorrCoef(num_labels)}[name]()


def make_metrics(spec: TaskSpec) -> MetricCollection:
    """Metrics named as in ``spec.metrics`` ("accuracy", "f1", "matthews").

    Call ``update(pred_ids, labels)`` with predicted class ids (``logits.argmax(-1)``), not
    logits: binary torchmetrics read float inputs as probabilities of class 1. Accuracy is
    plain (micro) accuracy for every task, including 3-class MNLI.
    """
    return MetricCollection({name: _make_metric(name, spec.num_labels) for name in spec.metrics})


def compute_metrics(spec: TaskSpec, preds: Tensor, labels: Tensor) -> dict[str, float]:
    """One-shot metrics for class ids, or (N, num_labels) logits (arg-maxed), against labels."""
    if preds.ndim == labels.ndim + 1:
        preds = preds.argmax(dim=-1)
    metrics = make_metrics(spec)
    metrics.update(preds.long(), labels.long())
    return {name: float(value) for name, value in metrics.compute().items()}
