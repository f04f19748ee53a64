"""The engine proves itself on the run's own model before the first private step.

The book-keeping engine sees a parameter only through a hooked module call and trusts the shapes it captures,
so a model outside the tested families can defeat it silently: a Linear whose output is changed in place, a
weight also used through a functional call, an activation whose first dimension is not the batch, a module
that mixes examples (batch statistics). :func:`check_engine` runs on the first micro-batch of a run and
refuses, in one line naming the module or parameter, when

1. a module in training mode computes batch statistics (BatchNorm, frozen or not): one example's output
   would depend on the others, so no per-sample bound holds;
2. an example's loss computed in the batch differs from the same example's loss computed alone;
3. for ``k`` examples, a fresh engine of the same kind with clipping off gives a per-parameter gradient sum or
   a per-sample norm that differs from plain autograd's, computed one example at a time (relative to each
   parameter's gradient, with a floor of 10⁻⁶ of the whole gradient's norm: a gradient that is zero in theory,
   such as an attention key's bias under softmax, carries float32 roundoff of the size of the others).

Dropout is switched off for the check (eval mode, so both sides see the same function); nothing it does touches
the run's state (the run's engine, its sums, the RNG). Its cost is one extra forward and backward of ``k``
examples together and ``k`` alone (docs/engine.md). Only the ``bk`` engine is checked; opacus' engines have
their own hooks.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from dpbench.errors import PrivacyError

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]  # (module to call, batch) → per-sample losses (B,)


@contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    """Eval mode for the check, so that every dropout is off (``nn.Dropout`` and the attention kernels' own
    ``dropout_p``, which follows ``module.training``); each module's mode is restored after. Batch statistics,
    the one train-mode behaviour that would hide coupling, are refused before this."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _rows(batch: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    return {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def _norm(tensors: list[Tensor]) -> Tensor:
    """The norm of the concatenation, in float64 (one norm per tensor, then combined)."""
    return torch.stack([torch.linalg.vector_norm(t).double() for t in tensors]).pow(2).sum().sqrt()


def check_coupling_modules(model: nn.Module) -> None:
    """Refuse modules that compute statistics over the batch in training mode (trainable or frozen)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise PrivacyError(f"module '{name}' ({type(m).__name__}) uses batch statistics in training mode, so one "
                               "example's output depends on the others and per-sample clipping bounds nothing; "
                               "put it in eval mode or replace it with LayerNorm/GroupNorm")


def check_engine(model: nn.Module, loss_fn: LossFn, batch: dict[str, Tensor], k: int = 2,
                 rtol: float = 1e-3) -> None:
    """Raise :class:`PrivacyError` unless the ``bk`` engine's unclipped per-sample gradients of ``model`` on the
    first ``k`` examples of ``batch`` equal plain autograd's (see the module docstring)."""
    check_coupling_modules(model)
    k = min(k, int(batch["attention_mask"].shape[0]))
    sub = _rows(batch, slice(0, k))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _dropout_off(model):
        alone = []
        for i in range(k):
            loss = loss_fn(model, _rows(sub, slice(i, i + 1)))
            grads = torch.autograd.grad(loss.sum(), [p for _, p in params], allow_unused=True)
            alone.append((loss.detach()[0], [torch.zeros_like(p) if g is None else g for (_, p), g in zip(params, grads)]))
        try:
            together, norms, sums = _unclipped(model, loss_fn, sub)
        except (RuntimeError, ValueError, IndexError) as e:  # shapes or graphs it cannot follow
            where = _culprit(model, loss_fn, sub, params, alone, rtol)
            raise PrivacyError(f"the bk engine cannot follow {where or 'this model'} "
                               f"({str(e).splitlines()[0][:160]}); freeze it or use privacy.engine=opacus") from None
    together = together.detach()
    for i, (loss, _) in enumerate(alone):
        if not torch.isclose(together[i], loss, rtol=rtol, atol=1e-6):
            raise PrivacyError(f"example {i}'s loss is {float(together[i]):.6g} in its batch but {float(loss):.6g} "
                               "alone: a module mixes examples, so per-sample clipping bounds nothing; find the "
                               "module that uses other rows of the batch")
    refs = [sum(g[j] for _, g in alone) for j in range(len(params))]
    floor = 1e-3 * rtol * float(_norm(refs))  # float32 roundoff scales with the whole gradient, not one part of it
    for j, (name, _) in enumerate(params):
        ref = refs[j]
        if float((sums[j] - ref).norm()) > rtol * float(ref.norm()) + floor + 1e-7:
            raise PrivacyError(f"the engine's gradient of '{name}' differs from autograd's (norm {float(sums[j].norm()):.4g} "
                               f"against {float(ref.norm()):.4g}): its module is used in a way the bk engine cannot "
                               "see (an in-place change of its output, a functional use of its weight, a "
                               "non-tensor output); freeze it or use privacy.engine=opacus")
    ref_norms = torch.stack([_norm(g) for _, g in alone])
    bad = ~torch.isclose(norms.double(), ref_norms.to(norms.device), rtol=rtol, atol=1e-7)
    if bad.any():
        i = int(bad.nonzero()[0])
        where = _culprit(model, loss_fn, sub, params, alone, rtol)
        raise PrivacyError(f"the engine's per-sample gradient norm of example {i} is {float(norms[i]):.4g}, autograd's "
                           f"{float(ref_norms[i]):.4g}{f' (in {where})' if where else ''}: its activations do not have "
                           "the batch as their first dimension (e.g. sequence-first inputs), so clipping would bound "
                           "the wrong rows; freeze it or use privacy.engine=opacus")


def _unclipped(model: nn.Module, loss_fn: LossFn, sub: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """A fresh ``bk`` engine with clipping off on ``sub``: the losses, the per-sample norms and the sums."""
    from dpbench.privacy.engine import make_engine

    fresh = make_engine("bk", model, float("inf"), "flat")
    try:
        losses = loss_fn(fresh.module, sub)
        norms = fresh.accumulate(losses)
        return losses, norms, fresh.release()
    finally:
        fresh.close()


def _culprit(model: nn.Module, loss_fn: LossFn, sub: dict[str, Tensor], params: list[tuple[str, nn.Parameter]],
             alone: list, rtol: float) -> str | None:
    """On failure only: the first module whose parameters, alone trainable, make the engine fail or give
    per-sample norms unlike autograd's."""
    modules: dict[str, list[int]] = {}
    for j, (name, _) in enumerate(params):
        modules.setdefault(name.rpartition(".")[0], []).append(j)
    for module, idx in modules.items():
        keep = {id(params[j][1]) for j in idx}
        frozen = [p for _, p in params if id(p) not in keep]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with _dropout_off(model):
                _, norms, _ = _unclipped(model, loss_fn, sub)
        except (RuntimeError, ValueError, IndexError):
            return f"module '{module}'"
        finally:
            for p in frozen:
                p.requires_grad_(True)
        ref = torch.stack([_norm([g[j] for j in idx]) for _, g in alone])
        if not torch.allclose(norms.double(), ref.to(norms.device), rtol=rtol, atol=1e-7):
            return f"module '{module}'"
    return None


def measure_cost(data_dir: str, repeats: int = 4) -> str:
    """The check's cost against one ``bk`` micro-batch of 64 SST-2 sentences on the packaged MiniLM with
    ``dp_full``'s trainable set, interleaved in one process (``python -m dpbench.privacy.engine.selfcheck DIR``)."""
    import statistics
    import time
    from pathlib import Path

    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from dpbench.methods.finetune import freeze_embeddings
    from dpbench.models.registry import load_model
    from dpbench.privacy.engine import make_engine

    conf = Path(__file__).resolve().parents[3] / "conf" / "model" / "minilm.yaml"
    lm = load_model(OmegaConf.to_container(OmegaConf.load(conf)), 2)
    model = lm.model.train()
    freeze_embeddings(model)
    rows = [r.split("\t") for r in (Path(data_dir) / "train.tsv").read_text().splitlines()[1:65]]
    enc = lm.tokenizer([r[0] for r in rows], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([int(r[1]) for r in rows])}

    def loss(m: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(m(**lm.inputs(b)).logits, b["labels"], reduction="none")

    engine = make_engine("bk", model, 1.0)

    def step() -> None:
        engine.accumulate(loss(engine.module, batch))
        engine.release()

    def check() -> None:
        check_engine(model, loss, batch, k=2)

    times: dict[str, list[float]] = {"step": [], "check": []}
    for i in range(repeats + 1):  # the first round warms up
        for name, f in (("step", step), ("check", check)):
            t0 = time.perf_counter()
            f()
            if i:
                times[name].append(time.perf_counter() - t0)
    s, c = (statistics.median(times[k]) for k in ("step", "check"))
    return (f"torch {torch.get_num_threads()} threads; a bk micro-batch of 64 SST-2 sentences (padded to "
            f"{batch['input_ids'].shape[1]}) {s * 1000:.0f} ms; the self-check (k=2) {c * 1000:.0f} ms = "
            f"{c / s:.2f}x one micro-batch, {c / (s * 1000 / 64):.4f}x one logical batch of 1000")


if __name__ == "__main__":
    import sys

    print(measure_cost(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/sst2"))
