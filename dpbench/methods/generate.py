"""Sampling texts from a causal LM conditioned on public control codes (DistilDP's synthetic corpus,
the student repair's public corpus, the on-policy student's own samples), with tokens/s measured."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from dpbench.data.generation import ControlledCorpus, pad_id, prompt_ids
from dpbench.models.registry import LoadedModel
from dpbench.results.io import read_json, write_json_atomic


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for one use (``"repair"``, ``"onpolicy3"``, …) of a base seed, so that the repair, DistilDP's
    generation and each on-policy round draw independent streams even when their base seeds coincide."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:4], "big")


@dataclass
class Generation:
    """Generated texts and what making them cost: new tokens (each text's tokens up to and including
    its EOS) and wall seconds of ``generate``."""

    corpus: ControlledCorpus
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    device: str = "cpu"

    def record(self) -> dict[str, float | str]:
        return {"num_samples": len(self.corpus), "new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "device": self.device}


def _body(seq: torch.Tensor, eos: int | None) -> tuple[list[int], int]:
    """The sampled ids before the first EOS, and the new tokens generation spent on them (EOS included)."""
    hits = (seq == eos).nonzero() if eos is not None else seq[:0]
    end = int(hits[0, 0]) if len(hits) else int(seq.numel())
    return seq[:end].tolist(), min(end + 1, int(seq.numel()))


@torch.no_grad()
def generate_synthetic(lm: LoadedModel, codes: list[str], g: DictConfig, seed: int) -> Generation:
    """``g.num_samples`` texts from ``lm``, each conditioned on a code drawn uniformly from ``codes``
    (seeded: the same seed gives the same texts). Rows are sorted by prompt length and decoded
    ``g.batch_size`` at a time with the KV cache (top-k / top-p sampling), whatever their codes: shorter
    prompts are left-padded and masked, and ``generate`` numbers positions from the mask, so every row
    is conditioned on exactly its training prefix."""
    rng = torch.Generator().manual_seed(seed)
    drawn = [codes[i] for i in torch.randint(len(codes), (int(g.num_samples),), generator=rng).tolist()]
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prompts = {code: prompt_ids(tok, code) for code in set(drawn)}
    order = sorted(range(len(drawn)), key=lambda i: (len(prompts[drawn[i]]), drawn[i], i))
    texts: list[str] = [""] * len(drawn)
    bodies: list[list[int]] = [[] for _ in drawn]
    batch, pad, new_tokens, start = int(g.get("batch_size", 16)), pad_id(tok), 0, time.perf_counter()
    for k in range(0, len(order), batch):
        chunk = order[k:k + batch]
        width = max(len(prompts[drawn[i]]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(chunk):
            p = prompts[drawn[i]]
            ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
        torch.manual_seed(seed * 100_003 + k)
        out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True, top_k=int(g.top_k),
                             top_p=float(g.top_p), use_cache=True, max_new_tokens=int(g.max_new_tokens),
                             pad_token_id=pad)
        for i, seq in zip(chunk, out[:, width:]):
            bodies[i], spent = _body(seq, tok.eos_token_id)
            texts[i] = tok.decode(bodies[i], skip_special_tokens=True).strip()
            new_tokens += spent
    model.train(was_training)
    return Generation(ControlledCorpus(drawn, texts, bodies), new_tokens, time.perf_counter() - start, str(device))


def cached_generation(cache: Path | None, key: dict, make: Callable[[], Generation]) -> Generation:
    """``make()``'s texts, kept in ``cache`` (JSON): loaded instead of regenerated when the file was
    written under the same ``key`` (generation settings, seed, codes, the generating model's state).
    Regenerating spends no privacy (the generator is public or DP-trained, the codes public); the cache
    saves only time, and the stored cost (tokens, seconds) is the original generation's."""
    if cache is not None and cache.exists():
        saved = read_json(cache)
        if saved.get("key") == key:
            return Generation(ControlledCorpus(saved["codes"], saved["texts"], saved.get("token_ids")),
                              int(saved.get("new_tokens", 0)),
                              float(saved.get("seconds", 0.0)), str(saved.get("device", "cpu")))
    gen = make()
    if cache is not None:
        write_json_atomic(cache, {"key": key, "codes": gen.corpus.codes, "texts": gen.corpus.texts,
                                  "token_ids": gen.corpus.token_ids,
                                  "new_tokens": gen.new_tokens, "seconds": gen.seconds, "device": gen.device})
    return gen
