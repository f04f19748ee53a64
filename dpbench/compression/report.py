"""What a compressed model costs: parameters, size on disk, CPU inference latency against the dense model."""
from __future__ import annotations

import io
import statistics
import time
import warnings

import torch
from torch import nn

from dpbench.compression.sparsity import measure_sparsity, prunable_modules


def size_on_disk_mb(model: nn.Module, sparse: bool = False) -> float:
    """Bytes of ``torch.save(state_dict)`` in MiB; ``sparse`` stores prunable weights in CSR form."""
    state = model.state_dict()
    if sparse:
        names = {f"{n}.weight" for n, _ in prunable_modules(model)}
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            state = {k: v.to_sparse_csr() if k in names and v.ndim == 2 else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes / 2**20


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median wall time of one eval-mode forward on ``inputs`` (after one warm-up), in ms."""
    was_training = model.training
    model.eval()
    model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    model.train(was_training)
    return 1000 * statistics.median(times)


def compression_report(dense: nn.Module, compressed: nn.Module, inputs: dict[str, torch.Tensor],
                       target_sparsity: float | None = None) -> dict:
    """Measured sparsity, parameter counts, sizes and latency (dense reference vs compressed).

    ``sparsity`` is the fraction of the dense model's prunable weights (encoder Linear weights)
    that are gone — zeroed by a mask or removed with their head, neuron or layer — so masked,
    structurally pruned and distilled models are measured alike; ``sparsity_all`` is the same over
    all parameters."""
    sp, ref = measure_sparsity(compressed), measure_sparsity(dense)
    nonzero_prunable = sp["prunable_params"] - sp["prunable_zeros"]
    dense_ms, comp_ms = latency_ms(dense, inputs), latency_ms(compressed, inputs)
    return {
        "target_sparsity": target_sparsity,
        "sparsity": 1 - nonzero_prunable / ref["prunable_params"],
        "sparsity_all": 1 - (sp["params_total"] - sp["prunable_zeros"]) / ref["params_total"],
        "zeros_in_prunable": sp["sparsity"],
        "prunable_params": nonzero_prunable,
        "prunable_params_dense": ref["prunable_params"],
        "params": sp["params_total"] - sp["prunable_zeros"],  # stored minus pruned (masked) weights
        "params_stored": sp["params_total"],
        "params_dense": ref["params_total"],
        "size_mb": round(size_on_disk_mb(compressed), 3),
        "size_mb_sparse": round(size_on_disk_mb(compressed, sparse=True), 3),
        "size_mb_dense": round(size_on_disk_mb(dense), 3),
        "latency_ms": {"dense": round(dense_ms, 2), "compressed": round(comp_ms, 2),
                       "speedup": round(dense_ms / comp_ms, 3),
                       "batch": list(next(iter(inputs.values())).shape)},
    }
