"""``nn.Embedding``: per-sample gradient rows are the output gradients scattered to the token ids.

Squared norm without the dense V×d matrix: the output gradients of each sample are summed per
distinct token id (one sort and one ``index_add``, cost ~B·T·d, never T²) and the row norms added
up: ‖gᵢ‖² = Σᵥ ‖Σ_{t: idₜ = v} gₜ‖². Tokens equal
to ``padding_idx`` get no gradient (as in ``F.embedding``). The clipped sum is one ``index_add`` into the running sum.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dpbench.privacy.engine.rules import LayerRule, register


def _masked(module: nn.Embedding, ids: Tensor, g: Tensor) -> Tensor:
    if module.padding_idx is None:
        return g
    return g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)


@register(nn.Embedding)
class EmbeddingRule(LayerRule):
    def capture(self, module: nn.Module, names: frozenset[str], x: Tensor) -> Tensor | None:
        return x.detach() if "weight" in names else None

    def norms_sq(self, module: nn.Module, names: frozenset[str], ids: Tensor | None, g: Tensor,
                 memo: dict | None = None) -> dict[str, Tensor]:
        if "weight" not in names:
            return {}
        b, d = g.shape[0], g.shape[-1]
        ids2 = ids.reshape(b, -1)
        g2 = _masked(module, ids2, g.reshape(b, -1, d)).reshape(-1, d)
        keys = ids2 + torch.arange(b, device=ids.device).unsqueeze(1) * module.num_embeddings
        uniq, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        rows = torch.zeros((uniq.shape[0], d), dtype=g.dtype, device=g.device).index_add_(0, inverse, g2)
        norms = torch.zeros(b, dtype=g.dtype, device=g.device)
        return {"weight": norms.index_add_(0, uniq // module.num_embeddings, rows.pow(2).sum(1))}

    def add_clipped(self, module: nn.Module, names: frozenset[str], ids: Tensor | None, g: Tensor, c: Tensor,
                    out: dict[str, Tensor], memo: dict | None = None) -> None:
        if "weight" in out:
            g3 = _masked(module, ids, g) * c.view(-1, *[1] * (g.ndim - 1)).to(g.dtype)
            out["weight"].index_add_(0, ids.reshape(-1), g3.reshape(-1, g.shape[-1]))

    def per_sample_grads(self, module: nn.Module, names: frozenset[str], ids: Tensor | None, g: Tensor) -> dict[str, Tensor]:
        if "weight" not in names:
            return {}
        b = g.shape[0]
        g3 = _masked(module, ids, g).reshape(b, -1, g.shape[-1])
        out = torch.zeros((b, *module.weight.shape), dtype=g.dtype, device=g.device)
        out.scatter_add_(1, ids.reshape(b, -1, 1).expand_as(g3), g3)
        return {"weight": out}
