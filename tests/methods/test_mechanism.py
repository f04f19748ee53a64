"""The DP mechanism as assembled: config → pipeline → Lightning module → private optimizer → sampler.

Unit tests check each block; these check what a run actually does. Each check has a ``broken`` variant
that switches one part off inside the pipeline (noise, clipping bound, clipping mode, Poisson sampling)
and asserts that the same check then fails, so a check that cannot fail would show up here.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import dpbench.pipeline as pipeline
from conftest import CONF
from dpbench.data.datamodule import Collator, EncodedDataset
from dpbench.errors import PrivacyError
from dpbench.methods.finetune import set_trainable
from dpbench.models.registry import load_model
from dpbench.privacy.adam_bc import AdamBC
from dpbench.privacy.sampling import PoissonBatchSampler

N, SIGMA, CLIP = 64, 2.0, 0.5


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["model=tiny_bert", "task=synthetic", f"task.num_train={N}",
                                            "task.num_dev=16", "task.max_length=16", "method=dp_full",
                                            "method.optimizer.name=sgd", "method.optimizer.lr=1.0",
                                            "method.optimizer.schedule=constant", "method.optimizer.warmup_steps=0",
                                            "method.optimizer.momentum=0.0", "privacy.epsilon=null",
                                            f"privacy.noise_multiplier={SIGMA}", f"privacy.clip_norm={CLIP}",
                                            "trainer.progress_bar=false", "logger.name=none", *overrides])


def _break(monkeypatch: pytest.MonkeyPatch, broken: str | None) -> None:
    """Switch one part of the mechanism off where the pipeline hands it to the module."""
    if broken is None:
        return
    real_dp, real_sampler = pipeline.dp_config, pipeline.make_sampler
    changes = {"noise": dict(noise_multiplier=0.0), "clip_norm": dict(clip_norm=CLIP * 10),
               "clipping": dict(clipping="flat")}
    if broken in changes:
        monkeypatch.setattr(pipeline, "dp_config", lambda *a: replace(real_dp(*a), **changes[broken]))
    elif broken == "sampling":  # fixed-size shuffled batches instead of Poisson
        monkeypatch.setattr(pipeline, "make_sampler",
                            lambda plan, n, seed: real_sampler(replace(plan, private=False), n, seed))


def _setup(cfg):
    spec, train, dev = pipeline.load_task(cfg.task, int(cfg.seed))
    plan = pipeline.plan_privacy(cfg, len(train), private=True)
    lm = load_model(cfg.model, spec.num_labels)
    set_trainable(lm, cfg.method)
    return spec, train, dev, plan, lm


def _empty_first_batch_seed(q: float) -> int:
    return next(s for s in range(1000) if PoissonBatchSampler(N, q, 1, s)._batch(0) == [])


@pytest.mark.parametrize("broken", [None, "noise"])
def test_a_step_on_an_empty_poisson_batch_moves_each_weight_by_noise_of_std_sigma_c_over_b(
        broken: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One real training stage (Lightning, the module, the private optimizer) on an empty Poisson batch:
    the update is the noise alone, N(0, (σC/B)²) per coordinate (SGD, lr 1). With the noise switched off
    the check fails."""
    _break(monkeypatch, broken)
    cfg = _cfg("privacy.batch_size=2", "trainer.max_steps=1")
    spec, train, dev, plan, lm = _setup(cfg)
    seed = _empty_first_batch_seed(plan.sample_rate)
    before = torch.cat([p.detach().flatten().clone() for p in lm.model.parameters() if p.requires_grad])
    try:
        pipeline.train_classifier(cfg, lm, spec, train, dev, plan, tmp_path, seed=seed)
    except PrivacyError:  # σ = 0 cannot even be recorded as a stage; the step has run
        assert broken == "noise"
    after = torch.cat([p.detach().flatten() for p in lm.model.parameters() if p.requires_grad])
    std = float((after - before).std())
    ok = std == pytest.approx(SIGMA * CLIP / plan.batch_size, rel=0.02)
    assert ok if broken is None else not ok, std


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("broken", [None, "clip_norm", "clipping"])
def test_the_modules_clipped_gradients_match_a_reference_factor(clipping: str, broken: str | None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Per example, through the module the pipeline builds: the engine's clipped gradient equals the raw
    autograd gradient times the factor computed here (flat: min(1, C/‖g‖); automatic: C/(‖g‖ + 0.01)), and
    its norm is ≤ C. A wrong bound, or flat clipping where automatic was asked, fails."""
    if broken == "clipping" and clipping == "flat":
        pytest.skip("the broken variant turns automatic into flat")
    _break(monkeypatch, broken)
    cfg = _cfg(f"privacy.clipping={clipping}")
    spec, train, dev, plan, lm = _setup(cfg)
    lm.model.train()
    data = EncodedDataset(train, lm.tokenizer, int(cfg.task.max_length))
    collate = Collator(lm.tokenizer.pad_token_id)
    batches = [collate([data[i]]) for i in range(6)]
    params = [p for p in lm.model.parameters() if p.requires_grad]
    raws = [torch.autograd.grad(F.cross_entropy(lm.model(**lm.inputs(b)).logits, b["labels"]), params)
            for b in batches]  # plain autograd, before the engine hooks the model
    module = pipeline.ClassifierModule(lm, spec, pipeline.optim_config(cfg.method), pipeline.dp_config(cfg, plan, 0),
                                       pipeline.batching_config(cfg), plan.steps)
    agree = []
    for batch, raw in zip(batches, raws):
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in raw)))
        factor = min(1.0, CLIP / norm) if clipping == "flat" else CLIP / (norm + 0.01)
        module.accumulate(batch)
        clipped = module.engine.release()
        clipped_norm = float(torch.sqrt(sum(c.pow(2).sum() for c in clipped)))
        agree.append(clipped_norm <= CLIP * (1 + 1e-5)
                     and all(torch.allclose(c, factor * g, rtol=1e-4, atol=1e-7) for c, g in zip(clipped, raw)))
    assert all(agree) if broken is None else not all(agree), agree


@pytest.mark.parametrize("broken", [None, "sampling"])
def test_a_private_stage_samples_poisson_at_the_planned_rate(broken: str | None, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The logical batches a private stage trains on come from the Poisson sampler at q = B/n (what the
    accountant assumes): their sizes vary around B. Fixed-size shuffled batches fail."""
    _break(monkeypatch, broken)
    cfg = _cfg("privacy.batch_size=16", "trainer.max_steps=12", "method.optimizer.lr=1e-3")
    spec, train, dev, plan, lm = _setup(cfg)
    result = pipeline.train_classifier(cfg, lm, spec, train, dev, plan, tmp_path, seed=3)
    sampler = result.module.trainer.datamodule.train_sampler
    sizes = [len(b) for b in PoissonBatchSampler(N, plan.sample_rate, plan.steps, seed=3)]
    ok = (isinstance(sampler, PoissonBatchSampler) and sampler.sample_rate == pytest.approx(16 / N)
          and result.throughput.examples == sum(sizes) and len(set(sizes)) > 1)
    assert ok if broken is None else not ok


@pytest.mark.parametrize("broken", [None, "uniform"])
def test_anadp_draws_each_groups_noise_at_its_allocated_std(broken: str | None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """ANADP through the module the pipeline builds, on an empty logical batch: each group's update is
    N(0, (σₖCₖ/B)²) for an allocation set far from uniform (σₖ spread 4×, Σₖ σₖ⁻² = σ⁻² kept). An optimizer
    that drew uniform noise (σC for every group) fails."""
    import dpbench.privacy.allocation as allocation

    if broken == "uniform":
        monkeypatch.setattr(allocation.NoiseAllocation, "param_noise_stds",
                            lambda self: [self.sigma * self.clip_norm] * len(self.group_of))
    cfg = _cfg("method=anadp", "method.trainable=full", "privacy.batch_size=2", "trainer.max_steps=1")
    spec, train, dev, plan, lm = _setup(cfg)
    module = pipeline.ClassifierModule(lm, spec, pipeline.optim_config(cfg.method), pipeline.dp_config(cfg, plan, 0),
                                       pipeline.batching_config(cfg), plan.steps)
    alloc = module.allocation
    weights = torch.linspace(1.0, 16.0, alloc.k, dtype=torch.float64)  # σₖ ∝ wₖ^(-1/2): a 4× spread
    alloc.weights = weights / weights.sum()
    allocation.check_invariant(alloc)
    group_std = [float(alloc.grad_sigma / alloc.weights[g].sqrt() * alloc.clip_norms[g]) / plan.batch_size
                 for g in range(alloc.k)]  # σₖCₖ/B from the allocation's state
    opt = module.configure_optimizers()["optimizer"]
    before = [p.detach().clone() for p in module.engine.params]
    opt.step(lambda: module.accumulate(Collator(lm.tokenizer.pad_token_id)([])))
    ok = []
    for g in range(alloc.k):
        idx = [i for i, gi in enumerate(alloc.group_of) if gi == g]
        moved = torch.cat([(module.engine.params[i].detach() - before[i]).flatten() for i in idx])
        if moved.numel() >= 500:  # enough coordinates for a 10% check
            ok.append(float(moved.std()) == pytest.approx(group_std[g], rel=0.1))
    assert len(ok) >= 3 and (all(ok) if broken is None else not all(ok)), ok


@pytest.mark.parametrize("broken", [None, "noise"])
def test_a_causal_lm_step_on_an_empty_batch_is_noise_of_std_sigma_c_over_b(broken: str | None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM module (DistilDP's teacher and students) with the pipeline's DP config: the same σC/B."""
    from dpbench.data.generation import LMCollator
    from dpbench.methods.language_model import CausalLMModule
    from dpbench.models.registry import load_causal_lm

    _break(monkeypatch, broken)
    cfg = _cfg("model=tiny_gpt2", "privacy.batch_size=2", "trainer.max_steps=1")
    plan = pipeline.plan_privacy(cfg, N, private=True)
    lm = load_causal_lm(cfg.model)
    module = CausalLMModule(lm, pipeline.optim_config(cfg.method), pipeline.dp_config(cfg, plan, 0),
                            pipeline.batching_config(cfg), plan.steps)
    opt = module.configure_optimizers()["optimizer"]
    before = torch.cat([p.detach().flatten().clone() for p in module.engine.params])
    opt.step(lambda: module.accumulate(LMCollator(lm.tokenizer, 16)([])))
    after = torch.cat([p.detach().flatten() for p in module.engine.params])
    ok = float((after - before).std()) == pytest.approx(SIGMA * CLIP / plan.batch_size, rel=0.02)
    assert ok if broken is None else not ok


@pytest.mark.parametrize("broken", [None, "count_sigma"])
def test_anadp_adaptive_bounds_privatise_counts_with_std_sigma_b(broken: str | None) -> None:
    """With adaptive bounds each group's unclipped count is released with N(0, σ_b²) noise. On empty
    batches the true counts are 0, so the bound update Cₖ' = Cₖ·exp(−η(ñₖ/B − γ)) reveals each noisy
    count ñₖ; over 20 steps their std is σ_b. Halving σ_b after set-up (less noise on the counts than
    accounted) is refused by the allocation's invariant check at the first release."""
    cfg = _cfg("method=anadp", "method.trainable=full", "method.anadp.clip_quantile=0.5", "privacy.batch_size=2",
               "trainer.max_steps=20")
    spec, train, dev, plan, lm = _setup(cfg)
    module = pipeline.ClassifierModule(lm, spec, pipeline.optim_config(cfg.method), pipeline.dp_config(cfg, plan, 0),
                                       pipeline.batching_config(cfg), plan.steps)
    alloc = module.allocation
    sigma_b, eta, gamma = alloc.count_sigma, alloc.cfg.clip_lr, alloc.cfg.clip_quantile
    if broken:
        alloc.count_sigma = sigma_b / 2
    opt = module.configure_optimizers()["optimizer"]
    empty, counts = Collator(lm.tokenizer.pad_token_id)([]), []
    if broken:
        with pytest.raises(AssertionError, match="differs from the calibrated"):
            opt.step(lambda: module.accumulate(empty))
        return
    for _ in range(plan.steps):
        bounds = alloc.clip_norms.clone()
        opt.step(lambda: module.accumulate(empty))
        counts.append(plan.batch_size * (gamma - torch.log(alloc.clip_norms / bounds) / eta))
    std = float(torch.cat(counts).std())
    assert alloc.k * plan.steps >= 100 and std == pytest.approx(sigma_b, rel=0.15), (std, sigma_b)


@pytest.mark.parametrize("anadp", [False, True])
def test_adam_bc_subtracts_the_variance_the_optimizer_actually_adds(anadp: bool, tmp_path: Path) -> None:
    """The module hands DP-AdamBC (σC/B)² per parameter (σₖCₖ/B under ANADP): the variance of the noise
    per coordinate of the release, read from the same numbers the private optimizer draws with."""
    cfg = _cfg("privacy.batch_size=8", "trainer.max_steps=1", "method.optimizer.name=adam_bc",
               *(["method=anadp", "method.optimizer.name=adam_bc"] if anadp else []))
    spec, train, dev, plan, lm = _setup(cfg)
    res = pipeline.train_classifier(cfg, lm, spec, train, dev, plan, tmp_path, seed=0)
    module = res.module
    opt = module.trainer.optimizers[0]
    stds = (module.allocation.param_noise_stds() if anadp
            else [SIGMA * CLIP] * len(module.engine.params))
    want = [(s / opt.expected_batch_size) ** 2 for s in stds]
    assert module._noise_variances() == pytest.approx(want, rel=1e-12)
    assert isinstance(opt.optimizer, AdamBC)
