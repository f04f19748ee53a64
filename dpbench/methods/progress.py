"""The training bar a DP user reads: logical step k of N, the loss, examples/s and the ε spent so far."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

SHOWN = {"train_loss": ("loss", ".4f"), "examples_per_s": ("ex/s", ".1f"), "epsilon_spent": ("ε", ".3f")}


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar counting noised optimizer steps (also after a resume) of the stage's total, with
    only the metrics in :data:`SHOWN` (no epoch, no ``v_num``)."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        module, bar = trainer.lightning_module, self.train_progress_bar
        bar.set_description(f"{self.stage}: step", refresh=False)
        bar.reset(total=module.total_steps)
        bar.n = module.steps_taken

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is not None:
            bar.n = module.steps_taken
            bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, str]:
        values = super().get_metrics(trainer, module)
        return {label: format(float(values[key]), fmt) for key, (label, fmt) in SHOWN.items() if key in values}
