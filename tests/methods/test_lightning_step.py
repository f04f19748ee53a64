"""Lightning's closure-style ``optimizer.step`` gives the same update as an explicit
accumulate-then-step loop over the same logical batches (same noise stream)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import tiny_model
from dpbench.data.batching import MicroBatching
from dpbench.data.datamodule import TextDataModule
from dpbench.data.synthetic import make_synthetic
from dpbench.data.tasks import get_task_spec
from dpbench.methods.base import ClassifierModule, DPConfig, OptimConfig
from dpbench.methods.finetune import select_trainable


class FixedBatches(torch.utils.data.Sampler):
    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


BATCHES = [[0, 3, 5, 6, 9], [], [1, 2, 4, 7, 8, 10, 11]]  # includes an empty Poisson draw


def _module(mode: str, engine: str) -> tuple[ClassifierModule, TextDataModule]:
    lm = tiny_model("bert", dtype=torch.float32)
    select_trainable(lm.model, mode)
    dp = DPConfig(noise_multiplier=0.7, clip_norm=0.5, expected_batch_size=6.0, engine=engine, noise_seed=5)
    module = ClassifierModule(lm, get_task_spec("synthetic"), OptimConfig(lr=1e-2), dp,
                              MicroBatching(3), total_steps=len(BATCHES))
    data = make_synthetic(12, pair=False, seed=0)
    dm = TextDataModule(data, data, lm.tokenizer, 24, FixedBatches(BATCHES))
    return module, dm


@pytest.mark.parametrize("engine", ["bk", "opacus"])
@pytest.mark.parametrize("mode", ["full", "bitfit"])
def test_lightning_closure_step_equals_explicit(engine: str, mode: str) -> None:
    module, dm = _module(mode, engine)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    via_lightning = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    assert module.steps_taken == len(BATCHES)

    module2, dm2 = _module(mode, engine)
    opt_cfg = module2.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    module2.model.train()
    for i, batch in enumerate(dm2.train_dataloader()):
        module2.training_step.__func__(_NoLog(module2), batch, i)  # accumulate the micro-batches
        opt.step()
        sched.step()
    for n, p in module2.model.named_parameters():
        torch.testing.assert_close(p.detach(), via_lightning[n], rtol=1e-6, atol=1e-7, msg=n)
    assert any(not torch.equal(p, q) for p, q in zip(via_lightning.values(),
                                                    _module(mode, engine)[0].model.parameters()))


class _NoLog:
    """The module, with ``log`` a no-op (it is not attached to a Trainer here)."""

    def __init__(self, module: ClassifierModule) -> None:
        self._m = module

    def __getattr__(self, name: str):
        return (lambda *a, **k: None) if name == "log" else getattr(self._m, name)
