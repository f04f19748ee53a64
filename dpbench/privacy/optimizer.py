"""The DP step: release the engine's gradient sum once per logical batch, then step.

For a logical batch L drawn by Poisson sampling with rate q (expected size B = q·n), the update
direction is ``(Σ_{i∈L} clip_C(gᵢ) + N(0, σ²C²·I)) / B``. Dividing by the *expected* size B (not
|L|) keeps the released quantity a Gaussian mechanism on the clipped sum with sensitivity C, which
is what the accountant (Poisson-subsampled Gaussian with σ, q) analyses. Noise is drawn once per
logical batch, also for an empty one: when the batch opens, the engine's (persistent) sum buffers are
filled with it, and the clipped per-sample gradients are then added on top.

Without a noise multiplier (non-private) the update is the plain mean over the batch.

Drawing one Gaussian per trainable parameter is single-threaded in torch's CPU generator (0.1 s per
22.7M values here); with ``noise_streams > 1`` the parameters are split, by a fixed size-balanced
assignment, over that many independent generators (seeded from ``generator``) that draw in parallel
threads. The noise is then a deterministic function of the seed, the stream count and the shapes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from dpbench.errors import PrivacyError
from dpbench.privacy.allocation import NoiseAllocation
from dpbench.privacy.distributed import all_reduce_sum, broadcast, rank_world
from dpbench.privacy.engine.base import GradientEngine


class PrivateOptimizer(Optimizer):
    """Wraps ``optimizer``; works both closure-style (Lightning) and explicit.

    Explicit use: ``engine.accumulate(losses)`` for each micro-batch, then ``opt.step()``.
    Closure use: ``opt.step(closure)`` where the closure does the accumulation.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        engine: GradientEngine,
        *,
        noise_multiplier: float | None,
        expected_batch_size: float | None,
        generator: torch.Generator | None = None,
        noise_streams: int = 1,
        allocation: NoiseAllocation | None = None,
        max_steps: int | None = None,
    ) -> None:
        private = noise_multiplier is not None
        if private and (expected_batch_size is None or expected_batch_size <= 0):
            raise ValueError("a private optimizer needs expected_batch_size > 0")
        self.optimizer = optimizer
        self.engine = engine
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.allocation = allocation  # ANADP: per-group σₖCₖ, updated from each release
        self.max_steps = max_steps  # the budget guard: the calibrated number of noised steps
        self.steps = 0
        self.last_batch_size = 0
        self._streams = self._make_streams(generator, noise_streams) if private else []
        self._pool = ThreadPoolExecutor(len(self._streams)) if len(self._streams) > 1 else None
        if private:
            engine.start_sums = self._fill_noise  # each logical batch's sum starts as its noise

    def _make_streams(self, generator: torch.Generator | None, k: int) -> list[tuple[torch.Generator | None, list[int]]]:
        """k (generator, parameter indices) pairs; sizes balanced greedily, largest first."""
        sizes = [p.numel() for p in self.engine.params]
        if k <= 1 or generator is None:
            return [(generator, list(range(len(sizes))))]
        seeds = torch.randint(0, 2**62, (k,), generator=generator).tolist()
        groups: list[list[int]] = [[] for _ in range(k)]
        load = [0] * k
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            j = load.index(min(load))
            groups[j].append(i)
            load[j] += sizes[i]
        device = self.engine.params[0].device
        return [(torch.Generator(device=device).manual_seed(int(sd)), g) for sd, g in zip(seeds, groups)]

    # -- the torch.optim.Optimizer surface, forwarded to the wrapped optimizer ----------------
    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "generators": [None if g is None else g.get_state() for g, _ in self._streams],
                "allocation": None if self.allocation is None else self.allocation.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
        for (g, _), saved in zip(self._streams, state.get("generators", [])):
            if g is not None and saved is not None:
                g.set_state(saved)
        if self.allocation is not None and state.get("allocation") is not None:
            self.allocation.load_state_dict(state["allocation"])
            if self.allocation.adaptive:
                self.engine.set_group_clips(self.allocation.clip_norms)

    def __repr__(self) -> str:
        return f"PrivateOptimizer(σ={self.noise_multiplier}, B={self.expected_batch_size}, {self.optimizer!r})"

    # -- the step ------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        if self.max_steps is not None and self.steps >= self.max_steps:
            raise PrivacyError(f"refusing noised step {self.steps + 1}: the privacy budget was calibrated for "
                               f"{self.max_steps} steps, and another would push ε past the target")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        count = torch.tensor([float(self.engine.num_examples)])
        sums = self.engine.release()
        all_reduce_sum([*sums, count])  # data parallel: the ranks' clipped sums (noise is on rank 0 only)
        self.last_batch_size = int(count.item())
        if self.noise_multiplier is None:
            for s in sums:
                s.div_(max(self.last_batch_size, 1))
        else:  # the noise N(0, σ²C²) is already in the sums: the engine's start_sums drew it
            for s in sums:
                s.div_(self.expected_batch_size)
            if self.allocation is not None:  # post-processing of the release: the next step's allocation
                self._observe(sums)
        for p, s in zip(self.engine.params, sums):
            p.grad = s
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return loss

    def _observe(self, sums: list[Tensor]) -> None:
        """Hand the released sums (and, with adaptive bounds, the per-group unclipped counts plus their
        noise N(0, σ_b²), drawn here once per logical batch) to the allocation; then set its new bounds."""
        alloc = self.allocation
        noisy = None
        if alloc.adaptive:
            noisy = self.engine.take_unclipped()
            all_reduce_sum([noisy])
            if rank_world()[0] == 0:
                generator = self._streams[0][0]
                device = generator.device if generator is not None else noisy.device
                noise = torch.randn(noisy.shape, dtype=noisy.dtype, device=device, generator=generator)
                noisy += alloc.count_sigma * noise.cpu()
            broadcast(noisy)
        alloc.observe(self.engine.params, sums, unclipped=noisy, expected_batch_size=self.expected_batch_size)
        if alloc.adaptive:
            self.engine.set_group_clips(alloc.clip_norms)

    def noise_stds(self) -> list[float]:
        """Per trainable parameter, the std of the noise added to each coordinate of the clipped sum:
        σC, or σₖCₖ of its group under an allocation; 0 when not private."""
        if self.noise_multiplier is None:
            return [0.0] * len(self.engine.params)
        if self.allocation is not None:
            return self.allocation.param_noise_stds()
        return [float(self.noise_multiplier) * float(self.engine.clip_norm or 0.0)] * len(self.engine.params)

    def _fill_noise(self, sums: list[Tensor]) -> None:
        """sums[i] ← N(0, σ²C²) in place (a logical batch opens; σₖCₖ of its group under an
        allocation), each stream drawing its own parameters."""
        # data parallel: the noise is drawn once, on rank 0
        stds = self.noise_stds() if rank_world()[0] == 0 else [0.0] * len(sums)

        def draw(stream: tuple[torch.Generator | None, list[int]]) -> None:
            generator, indices = stream
            for i in indices:
                if stds[i] > 0:
                    sums[i].normal_(0.0, stds[i], generator=generator)
                else:
                    sums[i].zero_()

        if self._pool is None:
            draw(self._streams[0])
        else:
            list(self._pool.map(draw, self._streams))
