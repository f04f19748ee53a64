"""Resumable training stages that never double-spend privacy.

With ``trainer.checkpoint_every_n_steps=N`` each stage writes ``<run>/checkpoints/<stage>.pt`` every N
noised steps and once at its end, atomically (a temporary file, then a rename). A checkpoint holds the
trainable state, the optimizer (with the noise generators, the step count and any ANADP allocation), the
learning-rate schedule, the global RNG states and the privacy *fingerprint* of the stage: σ, q, δ, C, the
planned steps and the sampler seed.

Started again with the same command, a stage resumes from its checkpoint: the Poisson sampler continues
after the consumed batches (batch k depends only on (seed, k)), so the resumed run takes exactly the
remaining steps with the same noise and data, and its record equals an uninterrupted run's. A finished
stage is loaded, not trained again. A checkpoint whose fingerprint differs from the stage the config now
plans (another ε, δ, batch size, step count ...) is refused: its steps have been spent, and a changed
config cannot reset them. Start a new run folder instead.

A stop signal (SIGTERM, SIGINT; :mod:`dpbench.stopping`) during a stage is deferred to the end of its logical
batch by :class:`StopAtBatchEnd`, which saves the checkpoint first, so a preempted run resumes where it stopped.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dpbench.errors import PrivacyError
from dpbench.stopping import RunStopped, State

if TYPE_CHECKING:
    from dpbench.methods.base import DPModule

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1


def checkpoint_path(folder: Path, stage: str) -> Path:
    """Where stage ``stage`` of a run (or of a shared cache folder) keeps its checkpoint."""
    return Path(folder) / CHECKPOINT_DIR / f"{stage}.pt"


def fingerprint(plan: Any, stage: str, seed: int) -> dict[str, Any]:
    """What fixes a stage's privacy cost and its sampling: a checkpoint only resumes the same."""
    return {"stage": stage, "private": plan.private, "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate, "steps": plan.steps, "delta": plan.delta, "clip_norm": plan.clip_norm,
            "batch_size": plan.batch_size, "sampler_seed": seed}


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _module_state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The module's full state (weights, buffers, masks): small models here, and it makes loading exact."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class StageCheckpoint(L.Callback):
    """Saves every ``every`` noised steps and at the end; restores on the next start (see module doc)."""

    def __init__(self, out_dir: Path, stage: str, expected: dict[str, Any], every: int, sampler: Any) -> None:
        self.path = checkpoint_path(out_dir, stage)
        self.expected, self.every, self.sampler = expected, int(every), sampler
        self.state: dict[str, Any] | None = None
        if self.path.exists():
            try:
                self.state = torch.load(self.path, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - a damaged file must not be half-used
                raise PrivacyError(f"checkpoint {self.path} is unreadable ({type(e).__name__}); delete it only if "
                                   "you accept re-spending its steps' privacy in a new run folder") from None
            saved = self.state.get("fingerprint") or {}
            changed = [k for k in expected if saved.get(k) != expected[k]]
            if changed:
                was = ", ".join(f"{k}={saved.get(k)}" for k in changed)
                now = ", ".join(f"{k}={expected[k]}" for k in changed)
                raise PrivacyError(f"checkpoint {self.path} was written for {was}, but the config now plans {now}; "
                                   "its steps are spent: restore the original config or use a new hydra.run.dir")

    @property
    def train_s_before(self) -> float:
        """Training seconds spent before this start (earlier segments of the stage)."""
        return float(self.state.get("train_s", 0.0)) if self.state else 0.0

    @property
    def steps_done(self) -> int:
        return int(self.state["steps_done"]) if self.state else 0

    @property
    def finished(self) -> bool:
        return bool(self.state) and self.steps_done == int(self.expected["steps"])

    def restore_finished(self, module: DPModule) -> None:
        """For a finished stage, loaded instead of retrained (its weights came with :meth:`restore_weights`):
        the ANADP allocation state its last release left (σₖ, bounds), as later stages read them."""
        if module.allocation is not None:
            module.allocation.load_state_dict(self.state["optimizer"]["allocation"])

    def restore_weights(self, module: L.LightningModule) -> None:
        """Before fit: the weights, and the sampler positioned after the consumed batches."""
        if not self.state:
            return
        module.load_state_dict(self.state["module"])
        for k, v in self.state.get("throughput", {}).items():  # what the earlier segments processed
            setattr(module.throughput, k, v)
        if self.sampler is not None:
            self.sampler.load_state_dict({"seed": self.expected["sampler_seed"],
                                          "num_batches_yielded": self.steps_done})

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        if not self.state:
            return
        trainer.optimizers[0].load_state_dict(self.state["optimizer"])
        for config, saved in zip(trainer.lr_scheduler_configs, self.state["schedulers"]):
            config.scheduler.load_state_dict(saved)
        torch.set_rng_state(self.state["rng"])

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        steps = trainer.optimizers[0].steps
        if self.every > 0 and steps % self.every == 0 and steps < int(self.expected["steps"]):
            self.save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.save(trainer, module)

    def save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        _save_atomic({"version": FORMAT_VERSION, "fingerprint": self.expected,
                      "steps_done": trainer.optimizers[0].steps, "module": _module_state(module),
                      "optimizer": trainer.optimizers[0].state_dict(),
                      "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                      "rng": torch.get_rng_state(),
                      "throughput": module.throughput.saved(),
                      "train_s": self.train_s_before + time.perf_counter() - self._t0}, self.path)


class StopAtBatchEnd(L.Callback):
    """Defers a stop signal during ``fit`` to the end of the logical batch; ``save`` (the stage's checkpoint,
    if it has one) runs first. The message says how far the stage got and how to go on."""

    def __init__(self, stage: str, planned_steps: int, save: Callable[[L.Trainer, L.LightningModule], None] | None):
        self.stage, self.planned, self.save = stage, int(planned_steps), save

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        State.deferring = True

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._check(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        State.deferring = False
        self._check(trainer, module)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        State.deferring = False

    def fit(self, trainer: L.Trainer, module: L.LightningModule, data: L.LightningDataModule) -> None:
        """``trainer.fit`` with this callback's stop. Lightning checks the signal itself between hooks (after
        ``on_train_batch_end``, at the epoch's end) and raises ``SIGTERMException``, a bare ``SystemExit``
        that would end the command with exit 0 and no checkpoint; that stop is taken here as ours."""
        try:
            trainer.fit(module, datamodule=data)
        except SIGTERMException:
            State.requested = State.requested or signal.SIGTERM
            self._check(trainer, module)
            raise

    def _check(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        signum = State.requested
        if signum is None:
            return
        State.deferring = False
        steps = int(getattr(trainer.optimizers[0], "steps", trainer.global_step))
        how = "run the same command to resume from its checkpoint"
        if self.save is not None:
            self.save(trainer, module)
        else:
            how = "its steps are spent; set trainer.checkpoint_every_n_steps to make a run resumable"
        raise RunStopped(f"stopped by {signal.Signals(signum).name} after {steps} of {self.planned} steps of stage "
                         f"'{self.stage}'; {how}", signum)
