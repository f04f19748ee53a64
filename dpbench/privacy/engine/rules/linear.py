"""``nn.Linear`` (2-D or 3-D inputs) and Hugging Face's ``Conv1D`` (GPT-2: y = x W + b, W is (in, out)).

Per-sample weight gradient for sample i is Gᵢᵀ Aᵢ (T×p by T×d). Two paths, chosen per call by the
shapes (:func:`instantiates`):

- ghost (short sequences, T·(d+p) < d·p): A and G are kept; the squared norm is ⟨AᵢAᵢᵀ, GᵢGᵢᵀ⟩
  (cost ~T²(d+p), the Gram AAᵀ shared by layers reading one input), and the clipped sum is one
  contraction Σᵢ cᵢ GᵢᵀAᵢ — the matrix product a non-private backward makes for the weight gradient.
- instantiated (long sequences): the per-sample gradients Gᵢᵀ Aᵢ (B·d·p values, no more than A and G)
  are formed in the backward hook, as the output gradient arrives, and kept in place of A and G; the
  norm and the clipped sum Σᵢ cᵢ (GᵢᵀAᵢ) then read them, so no second product over tokens is made.

A weight pruned with ``torch.nn.utils.prune`` trains as ``weight_orig`` under the fixed mask M
(weight = weight_orig ⊙ M), so its per-sample gradient is (GᵢᵀAᵢ) ⊙ M. The ghost norm cannot see a
mask, so that norm is taken on instantiated gradients (in batch chunks); the clipped sum is the
dense contraction, and the engine applies M to the released sum (gradient and noise alike).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from dpbench.privacy.engine.rules import LayerRule, PerSample, as_3d, register


def instantiates(t: int, d: int, p: int) -> bool:
    """Whether a layer call with T tokens, input width d and output width p keeps per-sample weight
    gradients: when B·d·p values are no more than the B·T·(d+p) of A and G they replace. Then
    instantiating (cost ~T·d·p, the same product the clipped sum needs anyway) also beats the ghost
    norm (~T²(d+p))."""
    return t > 1 and t * (d + p) >= d * p


def _memoised(memo: dict | None, key: tuple, x: Tensor, make) -> Tensor:
    """``make()`` once per (key, tensor storage and layout) within one micro-batch's ``memo``. The
    memo holds ``x`` itself, so its address cannot be reused by another tensor while the memo lives."""
    if memo is None:
        return make()
    full = (*key, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
    if full not in memo:
        memo[full] = (x, make())
    return memo[full][1]


def weight_norms_sq(a: Tensor, g: Tensor, memo: dict | None = None) -> Tensor:
    """‖Gᵢᵀ Aᵢ‖²_F per sample, for a (B, T, d), g (B, T, p), by the ghost norm (the path of calls that
    do not instantiate); AAᵀ is shared by layers reading the same input (q, k, v)."""
    if a.shape[1] == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    aat = _memoised(memo, ("gram",), a, lambda: torch.bmm(a, a.transpose(1, 2)))
    return (aat * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


MASKED_CHUNK_ELEMS = 1 << 22  # 16 MB of float32: a chunk stays in a 32 MB L3 while it is squared, masked, summed


def masked_weight_norms_sq(a: Tensor, g: Tensor, mask: Tensor, max_elems: int | None = None) -> Tensor:
    """‖(Gᵢᵀ Aᵢ) ⊙ M‖²_F per sample for a (p, d) mask M, instantiating at most ``max_elems`` values at once
    (default: the module's ``MASKED_CHUNK_ELEMS``, read at call time).

    The product is memory-bound (B·p·d values for ~T·p·d flops), so chunks small enough to stay in cache
    matter: on MiniLM (50% masks, B=128, T=24) a DP step took 1.79× the dense DP step with 2²² values
    per chunk against 2.61× with 2²⁵ (docs/compression.md)."""
    p, d = mask.shape
    m = mask.to(a.dtype)
    per = max(1, (MASKED_CHUNK_ELEMS if max_elems is None else max_elems) // (p * d))
    return torch.cat([(torch.bmm(g[i:i + per].transpose(1, 2), a[i:i + per]).pow_(2) * m).sum((1, 2))
                      for i in range(0, a.shape[0], per)])


def add_weighted_gt_a(out: Tensor, a: Tensor, g: Tensor, c: Tensor, transpose: bool, memo: dict | None = None) -> None:
    """out += Σᵢ cᵢ Gᵢᵀ Aᵢ (a (p, d) matrix; its transpose for ``transpose``), one matmul in place.

    cᵢ scales the narrower of A and G (a scaled input is shared by layers reading the same input
    with the same factors ``c``, which must stay alive while ``memo`` does)."""
    cc = c.view(-1, 1, 1)
    if a.shape[-1] <= g.shape[-1]:  # keyed by the factors too: clipping groups scale differently
        a = _memoised(memo, ("scaled", c.data_ptr(), c.stride()), a, lambda: a * cc.to(a.dtype))
    else:
        g = g * cc.to(g.dtype)
    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    if transpose:
        out.addmm_(a2.T, g2)
    else:
        out.addmm_(g2.T, a2)


def weight_name(names: frozenset[str]) -> str | None:
    """The trainable weight's name: ``weight``, ``weight_orig`` (pruned, masked) or None (frozen)."""
    return "weight" if "weight" in names else "weight_orig" if "weight_orig" in names else None


@register(nn.Linear)
class LinearRule(LayerRule):
    transpose = False  # Conv1D stores the weight as (in, out)
    param_names = ("weight", "bias", "weight_orig")

    def capture(self, module: nn.Module, names: frozenset[str], x: Tensor) -> Tensor | None:
        return x.detach() if weight_name(names) else None

    def on_grad(self, module: nn.Module, names: frozenset[str], a: Tensor | None, g: Tensor
                ) -> tuple[Tensor | None, Tensor | PerSample]:
        w = weight_name(names)
        if w is None:
            return None, as_3d(g).sum(1, keepdim=True)  # bias only: Σₜ gₜ is all that is needed
        a3, g3 = as_3d(a), as_3d(g)
        if w == "weight" and instantiates(a3.shape[1], a3.shape[2], g3.shape[2]):
            return None, PerSample(self.per_sample_grads(module, names, a3, g3))  # A and G are freed
        return a, g

    def _mask(self, module: nn.Module) -> Tensor:
        """The pruning mask in (out, in) layout, matching Gᵢᵀ Aᵢ."""
        return module.weight_mask.T if self.transpose else module.weight_mask

    def norms_sq(self, module: nn.Module, names: frozenset[str], a: Tensor | None, g: Tensor | PerSample,
                 memo: dict | None = None) -> dict[str, Tensor]:
        if isinstance(g, PerSample):
            return super().norms_sq(module, names, a, g)
        g3 = as_3d(g)
        out = {}
        w = weight_name(names)
        if w == "weight":
            out[w] = weight_norms_sq(as_3d(a), g3, memo)
        elif w == "weight_orig":
            out[w] = masked_weight_norms_sq(as_3d(a), g3, self._mask(module))
        if "bias" in names:
            out["bias"] = g3.sum(1).pow(2).sum(1)
        return out

    def add_clipped(self, module: nn.Module, names: frozenset[str], a: Tensor | None, g: Tensor | PerSample,
                    c: Tensor, out: dict[str, Tensor], memo: dict | None = None) -> None:
        if isinstance(g, PerSample):
            return super().add_clipped(module, names, a, g, c, out)
        g3 = as_3d(g)
        w = weight_name(names)
        if w in out:  # for weight_orig the engine masks the released sum
            add_weighted_gt_a(out[w], as_3d(a), g3, c, self.transpose, memo)
        if "bias" in out:
            out["bias"].add_(c.to(g3.dtype) @ g3.sum(1))

    def per_sample_grads(self, module: nn.Module, names: frozenset[str], a: Tensor | None, g: Tensor | PerSample
                         ) -> dict[str, Tensor]:
        if isinstance(g, PerSample):
            return g
        g3 = as_3d(g)
        out = {}
        w = weight_name(names)
        if w:  # in the parameter's own layout: (B, p, d) for Linear, (B, d, p) for Conv1D
            a3 = as_3d(a)
            grads = torch.bmm(a3.transpose(1, 2), g3) if self.transpose else torch.bmm(g3.transpose(1, 2), a3)
            out[w] = grads * module.weight_mask.to(grads.dtype) if w == "weight_orig" else grads
        if "bias" in names:
            out["bias"] = g3.sum(1)
        return out


@register(Conv1D)
class Conv1DRule(LinearRule):
    transpose = True
