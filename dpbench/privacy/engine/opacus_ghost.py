"""Opacus' ghost clipping (``GradSampleModuleFastGradientClipping``): a first backward with hooks
gets per-sample norms without per-sample gradients, a second backward of the re-weighted loss
Σᵢ cᵢ ℓᵢ gives the clipped sum. Two backward passes per micro-batch; flat clipping only."""
from __future__ import annotations

from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import Tensor, nn

from dpbench.errors import PrivacyError
from dpbench.privacy.engine.base import GradientEngine


class OpacusGhostEngine(GradientEngine):
    name = "opacus_ghost"

    def __init__(self, model: nn.Module, clip_norm: float, clipping: str = "flat") -> None:
        if clipping != "flat":
            raise PrivacyError("privacy.engine=opacus_ghost supports privacy.clipping=flat only; use engine=bk")
        super().__init__(model, clip_norm, clipping)
        try:
            self._gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum",
                                                             max_grad_norm=clip_norm, use_ghost_clipping=True)
        except NotImplementedError as e:
            raise PrivacyError(f"opacus ghost clipping cannot handle this model ({str(e)[:120]}); "
                               "freeze the module or use privacy.engine=bk") from None

    @property
    def module(self) -> nn.Module:
        return self._gsm

    def _add_clipped(self, per_sample_losses: Tensor, sums: list[Tensor]) -> Tensor:
        self._gsm.enable_hooks()
        per_sample_losses.sum().backward(retain_graph=True)
        norms = self._gsm.get_norm_sample().detach()
        coef = self._gsm.get_clipping_coef().detach()
        for p in self.params:
            p.grad = None
        self._gsm.disable_hooks()
        (per_sample_losses * coef).sum().backward()
        self._gsm.enable_hooks()
        for s, p in zip(sums, self.params):
            if p.grad is not None:
                s.add_(p.grad)
            p.grad = None
        return norms

    def close(self) -> None:
        self._gsm._close()
