"""Public text from disk as an LM corpus: GLUE sentences packed into fixed-length token chunks.

The student repair (:mod:`dpbench.methods.student_repair`) can distil on this instead of on text the
teacher generates: reading it costs no generation time and, because it is not the private task's data,
no privacy. The texts (``text_a`` and, for pair tasks, ``text_b`` of the *train* split) are shuffled by
``seed``, joined with the perplexity evaluation's joiner and cut into chunks of ``chunk_tokens`` ids, the
shape that :func:`dpbench.data.perplexity.perplexity` scores. Each chunk is one document with the empty
control code, so the loss covers every chunk token.
"""
from __future__ import annotations

import hashlib
import random

from transformers import PreTrainedTokenizerBase

from dpbench.data.generation import ControlledCorpus
from dpbench.data.glue import load_glue
from dpbench.data.perplexity import TEXT_JOINER
from dpbench.errors import ConfigError, DataError


def glue_texts(task: str, data_dir: str | None) -> list[str]:
    """Every sentence of GLUE ``task``'s train split (both sides of a pair), in file order."""
    data = load_glue(task, "train", data_dir)
    return list(data.text_a) + list(data.text_b or [])


def packed_corpus(texts: list[str], tokenizer: PreTrainedTokenizerBase, chunk_tokens: int, max_tokens: int,
                  seed: int) -> ControlledCorpus:
    """``texts`` shuffled by ``seed``, joined and cut into chunks of ``chunk_tokens`` token ids, up to
    ``max_tokens`` ids in all (the last partial chunk is dropped)."""
    if chunk_tokens < 2 or max_tokens < chunk_tokens:
        raise ConfigError(f"need chunk_tokens >= 2 and max_tokens >= chunk_tokens (got {chunk_tokens}, "
                          f"{max_tokens}); raise method.student.repair.public.max_tokens")
    order = list(texts)
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    for i, text in enumerate(order):  # tokenise only as much as the budget needs
        if len(ids) >= max_tokens:
            break
        ids.extend(tokenizer((TEXT_JOINER if i else "") + text, add_special_tokens=False)["input_ids"])
    n = min(len(ids), max_tokens) // chunk_tokens
    if n == 0:
        raise DataError(f"the public text gives {len(ids)} tokens, fewer than one chunk of {chunk_tokens}; "
                        "point method.student.repair.public at a larger task")
    chunks = [ids[i * chunk_tokens:(i + 1) * chunk_tokens] for i in range(n)]
    return ControlledCorpus([""] * n, [tokenizer.decode(c) for c in chunks], chunks)


def corpus_digest(corpus: ControlledCorpus) -> str:
    """A hash of a corpus's token ids: what a cache key needs from it, whatever folder it was read from."""
    h = hashlib.sha256()
    for ids in corpus.token_ids or []:
        h.update(b",".join(str(i).encode() for i in ids) + b";")
    return h.hexdigest()[:16]
