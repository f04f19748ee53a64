"""Per-layer rules for the book-keeping engine, one small file per layer family.

A rule knows, for one module call (``names``: the module's trainable parameters) with captured input ``a`` and output gradient ``g`` (batch
first), how to get each trainable parameter's per-sample squared gradient norms, the clipped sum
Σᵢ cᵢ gᵢ (added in place into the running sum), and (for parameters shared between calls) the per-sample gradients themselves.
Rules are registered by module type (or class-name suffix, for families of custom norms).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from dpbench.privacy.engine.base import add_weighted, squared_norms

_BY_TYPE: dict[type, "LayerRule"] = {}
_BY_SUFFIX: dict[str, "LayerRule"] = {}


class PerSample(dict):
    """Per-sample gradients by parameter name, each (B, *parameter shape): what a rule's ``on_grad``
    may keep in place of (A, G) when they are no larger (e.g. a linear layer on long sequences)."""


class LayerRule:
    """Base class; parameters are addressed by their attribute name in the module ("weight", "bias").

    ``param_names`` lists the parameters a rule knows; the engine refuses a module with any other
    trainable parameter (e.g. ``weight_orig`` after ``torch.nn.utils.prune``), so none is left out.
    ``memo`` (one dict per micro-batch) lets rules share work between calls on the same input
    tensor, e.g. the Gram matrix AAᵀ of the input that the q, k and v projections all read.
    """

    param_names: tuple[str, ...] = ("weight", "bias")

    def capture(self, module: nn.Module, names: frozenset[str], x: Tensor) -> Tensor | None:
        """What to keep from the input for the weight's gradient (None when the weight is frozen)."""
        return x.detach() if "weight" in names else None

    def on_grad(self, module: nn.Module, names: frozenset[str], a: Tensor | None, g: Tensor
                ) -> tuple[Tensor | None, Tensor]:
        """Called when the output gradient arrives: reduce (a, g) to what the rule needs later, so
        that less is kept until the end of the backward (e.g. Σₜ gₜ for a bias). Default: keep both."""
        return a, g

    def norms_sq(self, module: nn.Module, names: frozenset[str], a: Tensor | None, g: Tensor,
                 memo: dict | None = None) -> dict[str, Tensor]:
        """Per-sample squared gradient norm of each trainable parameter, shape (B,)."""
        return {k: squared_norms(v) for k, v in self.per_sample_grads(module, names, a, g).items()}

    def add_clipped(self, module: nn.Module, names: frozenset[str], a: Tensor | None, g: Tensor, c: Tensor,
                    out: dict[str, Tensor], memo: dict | None = None) -> None:
        """out[name] += Σᵢ cᵢ · (per-sample gradient of parameter ``name``), in place, for the names in ``out``."""
        for k, v in self.per_sample_grads(module, names, a, g).items():
            if k in out:
                add_weighted(out[k], v, c)

    def per_sample_grads(self, module: nn.Module, names: frozenset[str], a: Tensor | None, g: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def as_3d(t: Tensor) -> Tensor:
    """(B, p) → (B, 1, p); (B, T, p) unchanged; (B, ..., p) → (B, T', p)."""
    return t.unsqueeze(1) if t.ndim == 2 else t.reshape(t.shape[0], -1, t.shape[-1])


def register(*types: type, suffix: str | None = None) -> Callable[[type[LayerRule]], type[LayerRule]]:
    def deco(cls: type[LayerRule]) -> type[LayerRule]:
        rule = cls()
        for t in types:
            _BY_TYPE[t] = rule
        if suffix:
            _BY_SUFFIX[suffix] = rule
        return cls
    return deco


def rule_for(module: nn.Module) -> LayerRule | None:
    for t in type(module).__mro__:
        if t in _BY_TYPE:
            return _BY_TYPE[t]
    name = type(module).__name__
    return next((r for s, r in _BY_SUFFIX.items() if name.endswith(s)), None)


from dpbench.privacy.engine.rules import embedding, linear, norms  # noqa: E402,F401  (registration)
