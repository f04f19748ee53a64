"""Per-sample gradients from opacus' ``GradSampleModule`` (hooks, one backward per micro-batch).

Opacus only records activations of modules in training mode; disable dropout through the model
config, not with ``.eval()``. HF BERT needs explicit ``position_ids``/``token_type_ids`` so that
its embeddings see a (B, T) input rather than a broadcast buffer (the model registry passes them).
"""
from __future__ import annotations

import torch
from opacus import GradSampleModule
from torch import Tensor, nn

from dpbench.errors import PrivacyError
from dpbench.privacy.engine.base import GradientEngine, add_weighted, clip_factors, squared_norms


class OpacusEngine(GradientEngine):
    name = "opacus"

    def __init__(self, model: nn.Module, clip_norm: float, clipping: str = "flat") -> None:
        super().__init__(model, clip_norm, clipping)
        try:
            self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        except NotImplementedError as e:  # opacus lists the modules it cannot handle
            modules = sorted({type(m).__name__ for n, m in model.named_modules()
                              if any(p.requires_grad for p in m.parameters(recurse=False))
                              and m.__class__.__name__ in str(e)})
            raise PrivacyError(f"per-sample clipping cannot handle trainable module(s) {', '.join(modules) or e}; "
                               "freeze them or replace them (e.g. BatchNorm → GroupNorm)") from None

    @property
    def module(self) -> nn.Module:
        return self._gsm

    def _add_clipped(self, per_sample_losses: Tensor, sums: list[Tensor]) -> Tensor:
        batch = per_sample_losses.shape[0]
        per_sample_losses.sum().backward()
        samples = []
        for name, p in self.named_params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                if p.grad is not None:  # it received a gradient that no per-sample rule covered
                    raise PrivacyError(f"trainable parameter '{name}' has no per-sample gradient; "
                                       "freeze it or use a supported module")
                gs = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device)
            samples.append(gs)
            p.grad_sample, p.grad = None, None
        norms = torch.stack([squared_norms(g) for g in samples]).sum(0).sqrt()
        factors = clip_factors(norms, self.clip_norm, self.clipping)
        for s, g in zip(sums, samples):
            add_weighted(s, g, factors)
        return norms

    def close(self) -> None:
        self._gsm._close()
