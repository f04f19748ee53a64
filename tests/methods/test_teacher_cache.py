"""The shared DP teacher (method.teacher_cache_dir): loaded exactly as trained, keyed by all it depends on."""
from __future__ import annotations

import torch

from dpbench.checkpointing import StopAtBatchEnd
from dpbench.data.generation import make_synthetic_corpus
from dpbench.methods import distildp
from dpbench.methods.teacher_cache import teacher_key
from dpbench.pipeline import plan_privacy
from test_distildp import _smoke


def _teachers(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The DP teacher's weights after each run's teacher stage."""
    seen: list[dict[str, torch.Tensor]] = []
    train_lm = distildp.train_lm

    def recording(cfg, lm, *args, stage_name: str, **kw):
        result = train_lm(cfg, lm, *args, stage_name=stage_name, **kw)
        if stage_name == "teacher":
            seen.append({k: v.detach().clone() for k, v in lm.model.state_dict().items()})
        return result

    monkeypatch.setattr(distildp, "train_lm", recording)
    return seen


def test_pipelines_sharing_a_seed_load_the_teacher_the_first_trained(monkeypatch, tmp_path) -> None:
    teachers = _teachers(monkeypatch)
    fits: list[str] = []
    fit = StopAtBatchEnd.fit
    monkeypatch.setattr(StopAtBatchEnd, "fit", lambda self, *a: (fits.append(self.stage), fit(self, *a))[1])
    cache = f"method.teacher_cache_dir={tmp_path / 'teachers'}"
    fresh = distildp.run(_smoke("method=distildp_synthetic_only"), tmp_path / "fresh")  # no cache
    first = distildp.run(_smoke(cache), tmp_path / "first")
    again = distildp.run(_smoke(cache, "method=distildp_synthetic_only"), tmp_path / "again")
    assert [r.extra["teacher_cache"]["found"] for r in (first, again)] == [False, True]
    assert "teacher_cache" not in fresh.extra
    assert all(torch.equal(teachers[0][k], teachers[2][k]) for k in teachers[0])  # loaded = what training gives
    trained = [f for f in fits if f != "student_repair"]
    assert trained == ["teacher", "student", "teacher", "student", "student"]  # the third run trained no teacher
    assert again.privacy.stages == fresh.privacy.stages == first.privacy.stages  # the same release, the same ε
    assert again.privacy.epsilon == fresh.privacy.epsilon
    assert again.metrics["teacher_perplexity"] == fresh.metrics["teacher_perplexity"]
    assert again.timing["steps"] == fresh.timing["steps"]  # the teacher's steps count, as trained
    # DistilDP's synthetic corpus is kept beside the teacher and read back: same texts, the original cost
    assert again.extra["generation"]["examples"] == first.extra["generation"]["examples"]
    assert again.extra["generation"]["seconds"] == first.extra["generation"]["seconds"]


def test_teacher_key_follows_what_the_teacher_depends_on() -> None:
    def key(*overrides: str, data_seed: int = 0, seed: int = 0) -> str:
        cfg = _smoke(*overrides)
        private = make_synthetic_corpus(64, data_seed)
        return teacher_key(cfg, private, plan_privacy(cfg, len(private), private=True), seed)

    base = key()
    assert key() == base
    assert key("trainer.progress_bar=true", "method.kd.lam=0.0", "method.generation.num_samples=8") == base
    assert key("method=distildp_synthetic_only") == key("method=dp_onpolicy_kd") == base  # the pipelines share it
    changed = [key(seed=1), key(data_seed=1), key("privacy.epsilon=4"), key("method.optimizer.lr=1e-3"),
               key("trainer.max_steps=3"), key("model.config.n_layer=2"), key("method.freeze_embeddings=true")]
    assert base not in changed and len(set(changed)) == len(changed)
