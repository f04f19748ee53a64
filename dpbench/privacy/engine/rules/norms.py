"""``nn.LayerNorm`` and RMSNorm (Llama/SmolLM2 ``*RMSNorm``, ``nn.RMSNorm``): elementwise affine maps
of a normalised input x̂, so per-sample gradients are small — weight Σₜ gₜ ⊙ x̂ₜ, bias Σₜ gₜ — and
are formed as soon as the output gradient arrives."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dpbench.privacy.engine.rules import LayerRule, register


def _flat(t: Tensor, d: int) -> Tensor:
    return t.reshape(t.shape[0], -1, d)


class _AffineNormRule(LayerRule):
    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def capture(self, module: nn.Module, names: frozenset[str], x: Tensor) -> Tensor | None:
        if not "weight" in names:
            return None
        with torch.no_grad():
            return self.normalise(module, x)

    def on_grad(self, module: nn.Module, names: frozenset[str], xhat: Tensor | None, g: Tensor
                ) -> tuple[Tensor | None, Tensor]:
        """Reduce at once to the per-sample gradients: (Σₜ gₜ ⊙ x̂ₜ, Σₜ gₜ), each (B, d)."""
        d = g.shape[-1]
        g3 = _flat(g, d)
        weight = (g3 * _flat(xhat, d).to(g3.dtype)).sum(1) if "weight" in names else None
        return weight, g3.sum(1)

    def per_sample_grads(self, module: nn.Module, names: frozenset[str], weight: Tensor | None, bias: Tensor
                         ) -> dict[str, Tensor]:
        out = {}
        if "weight" in names:
            out["weight"] = weight
        if "bias" in names:
            out["bias"] = bias
        return out


@register(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)


@register(*([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []), suffix="RMSNorm")
class RMSNormRule(_AffineNormRule):
    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        hf_style = hasattr(module, "variance_epsilon")  # HF norms compute in float32, then cast back
        eps = module.variance_epsilon if hf_style else (getattr(module, "eps", None) or torch.finfo(x.dtype).eps)
        xf = x.to(torch.float32) if hf_style else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
