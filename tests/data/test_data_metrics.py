"""Task metrics on hand-made predictions."""
from __future__ import annotations

import pytest
import torch

from dpbench.data.metrics import compute_metrics, make_metrics
from dpbench.data.tasks import get_task_spec


def test_keys_follow_task_spec() -> None:
    assert set(make_metrics(get_task_spec("cola")).keys()) == {"accuracy", "matthews"}
    assert set(make_metrics(get_task_spec("mrpc")).keys()) == {"accuracy", "f1"}
    assert set(make_metrics(get_task_spec("mnli")).keys()) == {"accuracy"}


def test_perfect_and_inverted_binary() -> None:
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    assert compute_metrics(get_task_spec("cola"), y, y) == {"accuracy": 1.0, "matthews": 1.0}
    inv = compute_metrics(get_task_spec("cola"), 1 - y, y)
    assert inv["accuracy"] == 0.0 and inv["matthews"] == pytest.approx(-1.0)


def test_f1_and_accuracy_by_hand() -> None:
    preds, y = torch.tensor([1, 1, 1, 0, 0]), torch.tensor([0, 1, 1, 0, 1])
    out = compute_metrics(get_task_spec("qqp"), preds, y)  # TP=2, FP=1, FN=1
    assert out["accuracy"] == pytest.approx(0.6) and out["f1"] == pytest.approx(2 / 3)


def test_multiclass_accuracy_is_micro_and_logits_are_argmaxed() -> None:
    y = torch.tensor([0, 0, 0, 1, 2])
    preds = torch.tensor([0, 0, 0, 0, 2])  # macro accuracy would be (1 + 0 + 1) / 3
    assert compute_metrics(get_task_spec("mnli"), preds, y)["accuracy"] == pytest.approx(0.8)
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5 - 1
    assert compute_metrics(get_task_spec("mnli"), logits, y)["accuracy"] == pytest.approx(0.8)


def test_collection_accumulates_batches() -> None:
    metrics = make_metrics(get_task_spec("mrpc"))
    metrics.update(torch.tensor([1, 0]), torch.tensor([1, 0]))
    metrics.update(torch.tensor([1, 1]), torch.tensor([0, 1]))
    out = metrics.compute()
    assert float(out["accuracy"]) == pytest.approx(0.75) and float(out["f1"]) == pytest.approx(0.8)
