"""Task specifications: the one place that says what each classification task looks like.

Label ids follow the Hugging Face GLUE order (e.g. MNLI entailment=0, neutral=1,
contradiction=2). ``main_metric`` is what a leaderboard ranks by: Matthews correlation for
CoLA and accuracy for every other task. MRPC and QQP also report F1 (as GLUE does), but rank by
accuracy so that all binary tasks use the same headline metric.
"""
from __future__ import annotations

from dataclasses import dataclass

from dpbench.errors import ConfigError

METRIC_NAMES = ("accuracy", "f1", "matthews")


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a text-classification task."""

    name: str
    num_labels: int
    label_names: tuple[str, ...]  # index = label id
    is_pair: bool
    metrics: tuple[str, ...] = ("accuracy",)  # subset of METRIC_NAMES, always with "accuracy"
    main_metric: str = "accuracy"

    def __post_init__(self) -> None:
        assert len(self.label_names) == self.num_labels, self.name
        assert "accuracy" in self.metrics and set(self.metrics) <= set(METRIC_NAMES), self.name
        assert self.main_metric in self.metrics, self.name


_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("sst2", 2, ("negative", "positive"), is_pair=False),
        TaskSpec("cola", 2, ("unacceptable", "acceptable"), is_pair=False,
                 metrics=("accuracy", "matthews"), main_metric="matthews"),
        TaskSpec("mrpc", 2, ("not_equivalent", "equivalent"), is_pair=True,
                 metrics=("accuracy", "f1")),
        TaskSpec("qqp", 2, ("not_duplicate", "duplicate"), is_pair=True,
                 metrics=("accuracy", "f1")),
        TaskSpec("qnli", 2, _NLI2, is_pair=True),
        TaskSpec("rte", 2, _NLI2, is_pair=True),
        TaskSpec("mnli", 3, ("entailment", "neutral", "contradiction"), is_pair=True),
        # Generated in-process by dpbench.data.synthetic (no files, no network).
        TaskSpec("synthetic", 2, ("negative", "positive"), is_pair=False),
        TaskSpec("synthetic_pair", 2, _NLI2, is_pair=True),
    )
}


def get_task_spec(name: str) -> TaskSpec:
    """Look up a task by name; unknown names raise a one-line ConfigError."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            f"unknown task {name!r}; choose one of: {', '.join(TASKS)}"
        ) from None
