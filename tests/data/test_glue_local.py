"""Real GLUE files in ../shared/data (or $DPBENCH_SHARED_DATA): counts and labels per its README."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from dpbench.data.glue import load_glue

SHARED = Path(os.environ.get("DPBENCH_SHARED_DATA")
              or Path(__file__).resolve().parents[2].parent / "shared" / "data")

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}"),
]

# (task, split) -> label id -> count, from ../shared/data/README.md
EXPECTED = {
    ("sst2", "train"): {0: 29_780, 1: 37_569},
    ("sst2", "dev"): {0: 428, 1: 444},
    ("cola", "train"): {0: 2_528, 1: 6_023},
    ("cola", "dev"): {0: 322, 1: 721},
    ("mrpc", "train"): {0: 1_194, 1: 2_473},
    ("mrpc", "dev"): {0: 129, 1: 279},
    ("rte", "train"): {0: 1_249, 1: 1_241},  # entailment / not_entailment
    ("rte", "dev"): {0: 146, 1: 131},
    ("qnli", "train"): {0: 4_523, 1: 4_476},
    ("qnli", "dev"): {0: 504, 1: 496},
    ("mnli", "train"): {0: 3_061, 1: 2_980, 2: 2_958},  # entailment / neutral / contradiction
    ("mnli", "dev"): {0: 347, 1: 333, 2: 320},
    ("qqp", "train"): {0: 5_747, 1: 3_252},
    ("qqp", "dev"): {0: 623, 1: 377},
}
PAIR_TASKS = {"mrpc", "rte", "qnli", "mnli", "qqp"}


@pytest.mark.parametrize(("task", "split"), list(EXPECTED))
def test_counts_and_labels(task: str, split: str) -> None:
    data = load_glue(task, split, str(SHARED / task))
    assert dict(Counter(data.labels)) == EXPECTED[task, split]
    assert (data.text_b is not None) == (task in PAIR_TASKS)
    assert all(data.text_a) and (data.text_b is None or all(data.text_b))


def test_sst2_row_count() -> None:
    assert len(load_glue("sst2", "train", str(SHARED / "sst2"))) == 67_349


def test_cola_has_no_header() -> None:
    data = load_glue("cola", "train", str(SHARED / "cola"))
    assert data.text_a[0].startswith("Our friends won't buy this analysis, let alone")
    assert data.labels[0] == 1


def test_mrpc_bom_and_unquoted_quotes() -> None:
    data = load_glue("mrpc", "train", str(SHARED / "mrpc"))
    assert len(data) == 3_667
    assert data.labels[0] == 1
    assert data.text_a[0].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert data.text_b is not None and data.text_b[0].startswith("Referring to him as only")


def test_json_subset_first_record() -> None:
    data = load_glue("mnli", "dev", str(SHARED / "mnli"))
    assert data.text_b is not None
    assert (data.text_a[0], data.text_b[0]) == ("Salt kept the town fed.",
                                                "Salt kept the town thriving.")
    assert len(load_glue("qnli", "train", str(SHARED / "qnli"))) == 8_999
