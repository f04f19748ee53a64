"""A run stopped by a signal says so: SIGTERM (what SLURM sends on preemption or at its time limit) or SIGINT.

Outside training the signal stops the run at once. During a training stage it is deferred to the end of the
current logical batch, so that the step it interrupts is either fully taken (clipped sum, noise, update) or
not at all; the stage then saves its checkpoint (with ``trainer.checkpoint_every_n_steps``) and stops. The
command exits with 128 + the signal number and one ``dpbench: stopped:`` line, and the record's status is
``"stopped"``, never ``"ok"``. Started again, the same command resumes from the checkpoint: the resumed steps
repeat the same batches with the same noise (:mod:`dpbench.checkpointing`), so no step's privacy is spent twice.
Torch-free, so that the command installs it before its heavy imports; the training-side callback is
:class:`dpbench.checkpointing.StopAtBatchEnd`.
"""
from __future__ import annotations

import signal
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(BaseException):
    """Raised when a signal stops the run (a BaseException: no ``except Exception`` may swallow it)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class State:
    requested: int | None = None  # the signal received while deferring
    deferring = False


def _handler(signum: int, _frame: Any) -> None:
    if State.deferring:
        State.requested = signum
        return
    raise RunStopped(f"stopped by {signal.Signals(signum).name} (not while training)", signum)


def install() -> None:
    """Route SIGTERM and SIGINT to the stop logic above (main thread only; call once per job)."""
    State.requested, State.deferring = None, False
    for sig in SIGNALS:
        signal.signal(sig, _handler)
