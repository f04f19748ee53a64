"""Data-parallel DP-SGD on 2 CPU processes (gloo) equals one process: per-sample clipping per rank,
sums all-reduced, noise drawn once with std σC per logical step, Poisson batches over the whole dataset."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dpbench.privacy.engine import make_engine
from dpbench.privacy.optimizer import PrivateOptimizer
from dpbench.privacy.sampling import PoissonBatchSampler

N, Q, STEPS, CLIP, LR = 48, 0.25, 4, 0.5, 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(sigma: float | None, steps: int = STEPS, width: int = 5) -> dict[str, torch.Tensor]:
    """The DP loop with the real engine, optimizer and sampler; under a process group each rank takes its
    slice of every logical batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3)).double()
    x, y = torch.randn(N, 6, dtype=torch.float64), torch.randint(0, 3, (N,))
    engine = make_engine("bk", model, CLIP)
    opt = PrivateOptimizer(torch.optim.SGD(engine.params, lr=LR), engine, noise_multiplier=sigma,
                           expected_batch_size=Q * N, generator=torch.Generator().manual_seed(1))
    for batch in PoissonBatchSampler(N, Q, steps, seed=3):
        if batch:
            engine.accumulate(F.cross_entropy(engine.module(x[batch]), y[batch], reduction="none"))
        opt.step()
    engine.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, port: int, sigma: float | None, width: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state = _train(sigma, steps, width)
        torch.save(state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _train_on_two(sigma: float | None, tmp_path: Path, width: int = 5, steps: int = STEPS) -> list[dict]:
    out = str(tmp_path / f"state_{sigma}_{width}")
    # fork: the ranks start from this (already imported) process in milliseconds; spawn re-imports torch in each
    mp.start_processes(_worker, args=(2, _free_port(), sigma, width, steps, out), nprocs=2, start_method="fork")
    return [torch.load(f"{out}.{r}") for r in range(2)]


@pytest.mark.parametrize("sigma", [0.0, 1.3], ids=["noiseless", "noised"])
def test_two_processes_equal_one(sigma: float, tmp_path: Path) -> None:
    """Same seed: the same update on both ranks and as in one process, the noise included (drawn once, on
    rank 0, from the same generator)."""
    single = _train(sigma)
    ranks = _train_on_two(sigma, tmp_path)
    for state in ranks:
        for k in single:
            torch.testing.assert_close(state[k], single[k], rtol=1e-10, atol=1e-12)


def test_noise_std_is_sigma_c_once_per_step(tmp_path: Path) -> None:
    """One step on 2 ranks minus the noiseless step = LR·N(0, σ²C²)/B per coordinate: std σC (not √2·σC)."""
    sigma, width = 2.0, 400
    noised = _train_on_two(sigma, tmp_path, width=width, steps=1)[0]
    clean = _train_on_two(0.0, tmp_path, width=width, steps=1)[0]
    diff = torch.cat([(noised[k] - clean[k]).flatten() for k in clean])
    std = float(diff.std()) * (Q * N) / LR
    assert diff.numel() > 4000 and std == pytest.approx(sigma * CLIP, rel=0.05)

