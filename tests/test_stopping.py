"""A stop signal during a training stage ends it through StopAtBatchEnd (checkpoint first, RunStopped, exit
128 + N) wherever it lands, including between the hooks where Lightning's own check would see it first."""
from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpbench.checkpointing import StopAtBatchEnd
from dpbench.stopping import SIGNALS, RunStopped, install


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, _idx):
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(40, 2)), batch_size=4)


class _SignalAfterOurHook(L.Callback):
    """Sends SIGTERM to this process after StopAtBatchEnd's own batch-end check, at batch 2: the signal is
    pending when Lightning's loop checks ``received_sigterm`` at the end of the batch."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def stop_handlers():
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    install()
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_signal_between_hooks_stops_with_the_checkpoint_not_exit_0(stop_handlers, tmp_path) -> None:
    saved_at: list[int] = []
    stop = StopAtBatchEnd("train", 10, lambda trainer, module: saved_at.append(trainer.global_step))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[stop, _SignalAfterOurHook()])
    with pytest.raises(RunStopped) as stopped:  # not Lightning's SIGTERMException (a SystemExit: exit code 0)
        stop.fit(trainer, _Tiny(), _Data())
    assert stopped.value.exit_code == 128 + signal.SIGTERM and "after 3 of 10 steps of stage 'train'" in str(stopped.value)
    assert saved_at == [3]  # the step in flight completed, then the checkpoint was written
