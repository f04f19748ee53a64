"""Task specs and the in-memory dataset type."""
from __future__ import annotations

import pytest

from dpbench.data.examples import TextClassificationData
from dpbench.data.tasks import TASKS, get_task_spec
from dpbench.errors import ConfigError, DataError


def test_specs() -> None:
    assert get_task_spec("cola").main_metric == "matthews"
    assert get_task_spec("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task_spec("mrpc").metrics == ("accuracy", "f1")
    assert {n for n, t in TASKS.items() if t.is_pair} == {"mrpc", "qqp", "qnli", "rte", "mnli",
                                                          "synthetic_pair"}
    with pytest.raises(ConfigError, match="unknown task 'x'; choose one of: sst2, cola"):
        get_task_spec("x")


def test_subset() -> None:
    data = TextClassificationData([f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)],
                                  list(range(10)))
    assert data.subset(None, seed=0) is data and data.subset(10, seed=0) is data
    sub = data.subset(4, seed=1)
    assert len(sub) == 4 and sub == data.subset(4, seed=1) and sub != data.subset(4, seed=2)
    assert sub.labels == sorted(set(sub.labels))  # without replacement, original order
    assert sub.text_a == [f"a{i}" for i in sub.labels]
    assert sub.text_b == [f"b{i}" for i in sub.labels]
    with pytest.raises(ConfigError, match="subset size must be >= 1"):
        data.subset(0, seed=0)
    with pytest.raises(DataError, match="different lengths"):
        TextClassificationData(["a"], None, [0, 1])
