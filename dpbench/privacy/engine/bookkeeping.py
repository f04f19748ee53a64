"""Our engine: clipped gradient sums in one forward and one backward pass ("book-keeping").

During the forward, trainable parameters are hidden from autograd, so the backward computes
activation gradients only (no weight gradients at all). Hooks keep each trainable layer's input
(only where its weight trains) and its output gradient. After the backward:

1. per-sample squared norms per parameter, from each layer's rule (ghost norm or instantiation);
2. clip factors cᵢ from the total per-sample norm;
3. per parameter, one weighted contraction Σᵢ cᵢ gᵢ from the same kept tensors, added in place
   into the running sum of the logical batch.

Bias-only training (DP-BiTFiT) keeps no activations: a bias's per-sample gradient is the output
gradient summed over tokens. A parameter used by several calls (tied weights, shared modules) is
clipped on the per-sample gradient of the parameter itself: its per-call per-sample gradients are
instantiated and added before taking the norm. A trainable parameter owned by a module without a
rule raises :class:`PrivacyError` naming it; frozen modules get no hooks and cost nothing. Weights
pruned with ``torch.nn.utils.prune`` train as ``weight_orig`` with their masked per-sample norms;
the released sum is masked, so a pruned weight never receives gradient or noise.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from dpbench.errors import PrivacyError
from dpbench.privacy.engine.base import GradientEngine, add_weighted, clip_factors, squared_norms
from dpbench.privacy.engine.rules import LayerRule, rule_for, trainable_names


class _Hidden(nn.Module):
    """Calls the model with its trainable parameters hidden from autograd."""

    def __init__(self, engine: "BookkeepingEngine") -> None:
        super().__init__()
        self._engine = [engine]  # a list, so the engine is not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        engine = self._engine[0]
        with engine.hidden_params():
            return engine.model(*args, **kwargs)


class BookkeepingEngine(GradientEngine):
    name = "bk"

    def __init__(self, model: nn.Module, clip_norm: float, clipping: str = "flat") -> None:
        super().__init__(model, clip_norm, clipping)
        owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        self._layers: list[tuple[nn.Module, LayerRule]] = []
        self._names: dict[nn.Module, frozenset[str]] = {}
        for mod_name, module in model.named_modules():
            names = trainable_names(module)
            if not names:
                continue
            rule = rule_for(module)
            if rule is None:
                raise PrivacyError(f"per-sample clipping has no rule for trainable module '{mod_name}' "
                                   f"({type(module).__name__}); freeze it or use privacy.engine=opacus")
            unknown = [n for n in names if n not in rule.param_names]
            if unknown:
                raise PrivacyError(f"per-sample clipping has no rule for trainable parameter(s) "
                                   f"{', '.join(f'{mod_name}.{n}' for n in unknown)} of {type(module).__name__}; "
                                   "freeze them or use privacy.engine=opacus")
            self._layers.append((module, rule))
            self._names[module] = frozenset(names)
            for n in names:
                owners[id(getattr(module, n))].append((module, n))
        self._owners = owners
        index = {id(p): i for i, p in enumerate(self.params)}
        self._group: dict[int, int] = {id(p): 0 for p in self.params}  # one clipping group unless set_groups
        self._group_clip: Tensor | None = None
        self._n_groups = 1
        self._unclipped: Tensor | None = None  # per-group counts of unclipped examples (adaptive bounds)
        self._masked = [(index[id(m.weight_orig)], m) for m, names in self._names.items() if "weight_orig" in names]
        self._calls: dict[nn.Module, list[list]] = defaultdict(list)  # module → [[a, g], ...]
        self._hidden = False
        self._handles = [m.register_forward_hook(self._forward_hook) for m, _ in self._layers]
        self._wrapper = _Hidden(self)
        self._rules = dict(self._layers)

    @property
    def module(self) -> nn.Module:
        return self._wrapper

    @contextmanager
    def hidden_params(self) -> Iterator[None]:
        for p in self.params:
            p.requires_grad_(False)
        self._hidden = True
        try:
            yield
        finally:
            self._hidden = False
            for p in self.params:
                p.requires_grad_(True)

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if not self._hidden or not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return None
        rule, names = self._rules[module], self._names[module]
        record = [rule.capture(module, names, inputs[0]), None]
        self._calls[module].append(record)
        replaced = None
        if not output.requires_grad:  # e.g. an embedding: make its output the start of the graph
            output = replaced = output.detach().requires_grad_(True)

        def keep_grad(g: Tensor) -> None:
            record[0], record[1] = rule.on_grad(module, names, record[0], g.detach())

        output.register_hook(keep_grad)
        return replaced

    def _add_clipped(self, per_sample_losses: Tensor, sums: list[Tensor]) -> Tensor:
        if not per_sample_losses.requires_grad:
            raise RuntimeError("the losses do not depend on the trainable parameters; "
                               "call the model through engine.module")
        per_sample_losses.sum().backward()
        calls = {m: [(a, g) for a, g in recs if g is not None] for m, recs in self._calls.items()}
        self._calls.clear()
        batch = per_sample_losses.shape[0]
        shared = {pid for pid, own in self._owners.items()
                  if len(own) > 1 or len(calls.get(own[0][0], [])) > 1}
        groups = self._n_groups
        norms_sq = torch.zeros(batch, groups, dtype=self.params[0].dtype, device=per_sample_losses.device)
        shared_grads: dict[int, Tensor] = {}
        memo: dict = {}
        for module, recs in calls.items():
            rule, names = self._rules[module], self._names[module]
            for a, g in recs:
                for name, v in rule.norms_sq(module, names, a, g, memo).items():
                    pid = id(getattr(module, name))
                    if pid not in shared:
                        norms_sq[:, self._group[pid]] += v
                if any(id(getattr(module, n)) in shared for n in names):
                    for name, v in rule.per_sample_grads(module, names, a, g).items():
                        pid = id(getattr(module, name))
                        if pid in shared:
                            shared_grads[pid] = shared_grads[pid] + v if pid in shared_grads else v
        for pid, v in shared_grads.items():
            norms_sq[:, self._group[pid]] += squared_norms(v)
        clip = float(self.clip_norm) if self._group_clip is None else self._group_clip.to(norms_sq)
        norms = norms_sq.clamp(min=0).sqrt()
        c = clip_factors(norms, clip, self.clipping)  # (B, groups)
        if self._unclipped is not None:
            self._unclipped += (norms <= clip).sum(0).to(self._unclipped)

        memo.clear()  # Gram matrices are not needed any more; scaled inputs depend on c
        per_group = [c[:, k].contiguous() for k in range(groups)]  # one factor tensor per clipping group
        acc = {id(p): s for p, s in zip(self.params, sums)}
        for pid, v in shared_grads.items():
            add_weighted(acc[pid], v, per_group[self._group[pid]])
        for module, recs in calls.items():
            rule, names = self._rules[module], self._names[module]
            out = {n: acc[id(getattr(module, n))] for n in names if id(getattr(module, n)) not in shared}
            cg = per_group[self._module_group(module)]
            for a, g in recs:
                rule.add_clipped(module, names, a, g, cg, out, memo)
        return norms_sq.sum(1).clamp(min=0).sqrt()

    def set_groups(self, group_of: Sequence[int], clip_norms: Tensor, count_unclipped: bool = False) -> None:
        """Clip per group (ANADP): the part of each per-sample gradient in group ``group_of[i]`` (of
        parameter i) is clipped to ``clip_norms[group]`` on its own. A module's parameters share a group.
        ``count_unclipped``: also count, per group, the examples left unclipped (:meth:`take_unclipped`)."""
        self._group = {id(p): int(g) for p, g in zip(self.params, group_of)}
        for module, names in self._names.items():
            if len({self._group[id(getattr(module, n))] for n in names}) > 1:
                raise PrivacyError(f"the parameters of one {type(module).__name__} must share a clipping group")
        self._n_groups = max(self._group.values()) + 1
        self.set_group_clips(clip_norms)
        self._unclipped = torch.zeros(self._n_groups, dtype=torch.float64) if count_unclipped else None

    def set_group_clips(self, clip_norms: Tensor) -> None:
        """New per-group bounds (from released quantities only), used from the next micro-batch on."""
        self._group_clip = torch.as_tensor(clip_norms).clone()

    def take_unclipped(self) -> Tensor:
        """The per-group unclipped counts since the last call (one logical batch), reset to zero. Not
        private by itself: the optimizer adds noise before anyone reads them."""
        if self._unclipped is None:
            raise RuntimeError("set_groups(..., count_unclipped=True) first")
        counts, self._unclipped = self._unclipped, torch.zeros_like(self._unclipped)
        return counts

    def _module_group(self, module: nn.Module) -> int:
        return self._group[id(getattr(module, next(iter(self._names[module]))))]

    def release(self) -> list[Tensor]:
        """The sums, with pruned coordinates (``torch.nn.utils.prune`` masks) zeroed: no gradient and
        no noise reaches a pruned weight."""
        sums = super().release()
        for i, module in self._masked:
            sums[i].mul_(module.weight_mask.to(sums[i].dtype))
        return sums

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
