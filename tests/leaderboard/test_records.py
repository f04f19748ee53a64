"""The tables of record stand on committed run records: each ``docs/records/*.json`` is a submission made by
``dpbench-leaderboard submit`` from the runs behind a table. Every record in it re-verifies (schema, config
hash, ε recomputed by the accountant from its stages), and every mean ± std that its doc prints is the
records' own."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpbench.leaderboard.aggregate import aggregate, lower_is_better
from dpbench.leaderboard.submission import read_submission, validate

ROOT = Path(__file__).resolve().parents[2]
RECORDS = sorted((ROOT / "docs" / "records").glob("*.json"))
DOC_OF = {"recipes_sst2": "recipes.md", "tuning_sst2": "tuning.md", "anadp_sst2": "anadp.md",
          "compression_sst2": "compression.md", "recipes_glue9k": "recipes.md", "anadp_qnli_eps3": "anadp.md",
          "compression_qnli": "compression.md", "tuning_qnli": "compression.md",
          "distildp_yelp": "distildp.md"}  # submission → its table's doc


def test_every_table_has_its_records() -> None:
    assert {p.stem for p in RECORDS} <= set(DOC_OF), "add the doc of a new records file to DOC_OF"
    assert RECORDS, "docs/records/ holds the records of the tables of record"


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.stem)
def test_committed_records_verify_and_match_their_table(path: Path) -> None:
    review = validate(read_submission(path), min_seeds=1)
    assert review.accepted, review.reasons
    doc = (ROOT / "docs" / DOC_OF[path.stem]).read_text(encoding="utf-8")
    rows = aggregate((v.record, v.epsilon_recomputed) for v in review.runs)
    for row in rows:
        scale = 1 if lower_is_better(row.metric) else 100  # perplexity as is, accuracy in %
        shown = f"{scale * row.mean:.1f} ± {scale * row.std:.1f}" if row.n > 1 else f"{scale * row.mean:.1f}"
        assert shown in doc, f"{row.method} at ε={row.eps_label}: {shown} (n={row.n}) is not in {DOC_OF[path.stem]}"
