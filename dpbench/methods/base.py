"""The Lightning modules every method trains with; the DP step lives here once (:class:`DPModule`),
and subclasses only give a per-sample loss and an evaluation (classification here; causal LMs in
``language_model.py``).

A training step receives one logical batch, cuts it into physical micro-batches by length
(:mod:`dpbench.data.batching`: the logical batch and its clipped sum are unchanged), and hands each
micro-batch's per-sample losses to the gradient engine (which clips and sums). Lightning then calls
``optimizer.step(closure)``; :class:`~dpbench.privacy.optimizer.PrivateOptimizer` runs the closure,
adds the noise once for the logical batch and steps. ``backward`` is a no-op because the engine has
already done the backward passes inside the closure.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpbench.data.batching import MicroBatching, microbatches
from dpbench.data.metrics import make_metrics
from dpbench.data.tasks import TaskSpec
from dpbench.models.registry import LoadedModel
from dpbench.errors import ConfigError
from dpbench.privacy.adam_bc import AdamBC
from dpbench.privacy.allocation import AllocationConfig, NoiseAllocation, group_names
from dpbench.privacy.engine import make_engine
from dpbench.privacy.engine.selfcheck import check_engine
from dpbench.privacy.optimizer import PrivateOptimizer


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"          # adam (AdamW, decoupled weight decay) | adam_bc (DP-AdamBC) | sgd
    lr: float = 5e-4
    weight_decay: float = 0.0
    momentum: float = 0.0       # sgd only
    gamma: float = 1e-8         # adam_bc only: floor of the noise-corrected second moment
    schedule: str = "linear"    # linear decay to 0 | constant
    warmup_steps: int = 0


@dataclass(frozen=True)
class DPConfig:
    """What the step needs to be private; ``None`` in its place means non-private training."""

    noise_multiplier: float
    clip_norm: float
    expected_batch_size: float
    engine: str = "bk"
    clipping: str = "flat"
    noise_seed: int = 0
    allocation: AllocationConfig | None = None  # ANADP: per-group clipping and noise allocation
    self_check: bool = True  # the bk engine proves itself on the first micro-batch (engine/selfcheck.py)


def upcast(logits: Tensor) -> Tensor:
    """Logits in at least float32 for the loss (half precision is raised; float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@dataclass
class Throughput:
    """What training processed: examples, real tokens, tokens computed (with padding), and the wall
    time between :meth:`start` and :meth:`stop` (summed over resumed fits)."""

    examples: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    elapsed_s: float = 0.0
    _since: float | None = field(default=None, repr=False)

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.elapsed_s += time.perf_counter() - self._since
            self._since = None

    def seconds(self) -> float:
        return self.elapsed_s + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def __add__(self, other: "Throughput") -> "Throughput":
        return Throughput(self.examples + other.examples, self.tokens + other.tokens,
                          self.computed_tokens + other.computed_tokens, self.seconds() + other.seconds())

    def saved(self) -> dict[str, float]:
        """The counts and seconds so far (a checkpoint keeps them; a resumed fit adds to them)."""
        return {"examples": self.examples, "tokens": self.tokens, "computed_tokens": self.computed_tokens,
                "elapsed_s": self.seconds()}

    def rates(self, seconds: float) -> dict[str, float]:
        """The ``timing`` fields of a record, for ``seconds`` of training."""
        s = max(seconds, 1e-9)
        return {"examples": self.examples, "tokens": self.tokens, "computed_tokens": self.computed_tokens,
                "examples_per_s": round(self.examples / s, 3), "tokens_per_s": round(self.tokens / s, 1)}


class DPModule(L.LightningModule):
    """The DP training step for ``lm.model``'s trainable parameters; subclasses give the per-sample
    loss and the evaluation."""

    def __init__(self, lm: LoadedModel, optim: OptimConfig, dp: DPConfig | None,
                 batching: MicroBatching, total_steps: int) -> None:
        super().__init__()
        self.lm, self.optim_cfg, self.dp = lm, optim, dp
        self.model = lm.model
        self.batching = batching
        self.total_steps = total_steps
        self.throughput = Throughput()
        self.epsilon_spent: Callable[[int, float], float] | None = None  # (steps, σ) → ε so far, set by the pipeline
        self.engine = make_engine(dp.engine if dp else "none", self.model, dp.clip_norm if dp else None,
                                  dp.clipping if dp else "flat")
        self.allocation: NoiseAllocation | None = None
        self.group_names: list[str] = []
        if dp is not None and dp.allocation is not None:
            if not hasattr(self.engine, "set_groups"):
                raise ConfigError("noise allocation (anadp) needs per-group clipping; set privacy.engine=bk")
            group_of, self.group_names = group_names([n for n, _ in self.engine.named_params], dp.allocation.groups)
            self.allocation = NoiseAllocation(group_of, [p.numel() for p in self.engine.params],
                                              dp.noise_multiplier, dp.clip_norm, dp.allocation)
            self.engine.set_groups(group_of, self.allocation.clip_norms, count_unclipped=self.allocation.adaptive)
        self.final_metrics: dict[str, float] = {}
        self.automatic_optimization = True
        self._engine_checked = False

    # -- training ------------------------------------------------------------------------------
    def per_sample_loss(self, batch: dict[str, Tensor], model: nn.Module | None = None) -> Tensor:
        """One loss per example, shape (B,), computed through ``model`` (default ``self.engine.module``)."""
        raise NotImplementedError

    def check_engine(self, micro: dict[str, Tensor]) -> None:
        """Once, before the first private step: the engine proves itself on this micro-batch."""
        self._engine_checked = True
        if self.dp is not None and self.dp.self_check and self.dp.engine == "bk":
            check_engine(self.model, lambda m, b: self.per_sample_loss(b, m), micro)

    def accumulate(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-sample losses of one logical batch, micro-batch by micro-batch, into the engine (which
        clips and sums them); returns the mean loss and counts examples and tokens."""
        n = batch["attention_mask"].shape[0]
        total = torch.zeros((), device=self.device)
        for micro in microbatches(batch, self.batching):
            if not self._engine_checked:
                self.check_engine(micro)
            losses = self.per_sample_loss(micro)
            self.engine.accumulate(losses)
            total += losses.detach().sum()
            self.throughput.computed_tokens += micro["attention_mask"].numel()
        self.throughput.examples += n
        self.throughput.tokens += int(batch["attention_mask"].sum())
        return total / max(n, 1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.accumulate(batch)
        n = max(batch["attention_mask"].shape[0], 1)
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        seconds = self.throughput.seconds()
        if seconds > 0:
            self.log("examples_per_s", self.throughput.examples / seconds, prog_bar=True, batch_size=1)
            self.log("tokens_per_s", self.throughput.tokens / seconds, batch_size=1)
        if self.epsilon_spent is not None:  # ε of the steps taken so far, this one included
            self.log("epsilon_spent", self.epsilon_spent(self.steps_taken + 1, self.effective_noise_multiplier),
                     prog_bar=True, batch_size=1)
        return loss

    def on_train_start(self) -> None:
        self.throughput.start()

    def on_train_end(self) -> None:
        self.throughput.stop()

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Gradients were accumulated by the engine in ``training_step``; nothing to do."""

    def configure_optimizers(self):
        params = self.engine.params
        c = self.optim_cfg
        if c.name == "adam":
            inner = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        elif c.name == "adam_bc":
            inner = AdamBC(params, self._noise_variances, lr=c.lr, gamma=c.gamma, weight_decay=c.weight_decay)
        elif c.name == "sgd":
            inner = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {c.name!r}")
        generator = None
        if self.dp is not None:
            generator = torch.Generator(device=self.device).manual_seed(self.dp.noise_seed)
        opt = PrivateOptimizer(inner, self.engine,
                               noise_multiplier=self.dp.noise_multiplier if self.dp else None,
                               expected_batch_size=self.dp.expected_batch_size if self.dp else None,
                               generator=generator,
                               noise_streams=torch.get_num_threads() if self.device.type == "cpu" else 1,
                               allocation=self.allocation,
                               max_steps=self.total_steps if self.dp is not None else None)
        self._private_optimizer = opt  # AdamBC reads its noise variances through it
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _noise_variances(self) -> list[float]:
        """Per trainable parameter, the variance of the noise in each coordinate of the released
        (divided-by-B) gradient: (σC/B)², or (σₖCₖ/B)² of its group under an allocation."""
        if self.dp is None:
            return [0.0] * len(self.engine.params)
        return [(s / self.dp.expected_batch_size) ** 2 for s in self._private_optimizer.noise_stds()]

    def _lr_lambda(self, step: int) -> float:
        c = self.optim_cfg
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        remaining = max(self.total_steps - c.warmup_steps, 1)
        return max(0.0, 1.0 - (step - c.warmup_steps) / remaining)

    @property
    def effective_noise_multiplier(self) -> float | None:
        """The σ the accountant must see: σ, or under an allocation the smallest σ_eff of any step."""
        if self.dp is None:
            return None
        if self.allocation is not None and self.allocation.sigma_eff_history:
            return min(self.allocation.sigma_eff_history)
        return self.dp.noise_multiplier

    @property
    def steps_taken(self) -> int:
        """Noised optimizer steps actually run (what the accountant must see)."""
        return self.trainer.optimizers[0].steps if self._trainer is not None and self.trainer.optimizers else 0



class ClassifierModule(DPModule):
    """Fine-tunes ``lm.model``'s trainable parameters on a classification task."""

    def __init__(self, lm: LoadedModel, spec: TaskSpec, optim: OptimConfig, dp: DPConfig | None,
                 batching: MicroBatching, total_steps: int) -> None:
        super().__init__(lm, optim, dp, batching, total_steps)
        self.spec = spec
        self.val_metrics = make_metrics(spec)

    def per_sample_loss(self, batch: dict[str, Tensor], model: nn.Module | None = None) -> Tensor:
        logits = (self.engine.module if model is None else model)(**self.lm.inputs(batch)).logits
        return F.cross_entropy(upcast(logits), batch["labels"], reduction="none")

    # -- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.model(**self.lm.inputs(batch)).logits
        self.val_metrics.update(logits.argmax(-1), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        values = {k: float(v) for k, v in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        self.final_metrics = values
        self.log_dict({f"val_{k}": v for k, v in values.items()}, prog_bar=True)
