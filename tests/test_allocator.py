"""``dpbench.allocator``: with freed memory kept for reuse, a training-like loop of large tensors
stops page-faulting them back in on every iteration."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

LOOP = """
import resource, sys, torch
from dpbench.allocator import reuse_freed_memory
took = reuse_freed_memory() if sys.argv[1] == "reuse" else False
param = torch.zeros(12 << 20)  # a 48 MiB parameter (MiniLM's word embeddings are 45 MiB)
def step():  # an optimizer-like step: temporaries as large as the parameter, freed at once
    denom = param.sqrt().add_(1e-8)
    torch.randn(256, 4096) @ torch.randn(4096, 256)
    param.sub_(denom.mul_(1e-3))
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_memory_is_reused_instead_of_faulted_back() -> None:
    took, reused = _faults("reuse")
    _, system = _faults("system")
    assert took
    assert system > 10 * 1024  # ≥ 10 × 48 MiB of fresh pages (one fault per 4 KiB page)...
    assert reused < system / 5  # ...and at most a one-off growth of the heap once freed memory is kept


def test_system_malloc_can_be_kept() -> None:
    took, _ = _faults("reuse", DPBENCH_SYSTEM_MALLOC="1")
    assert not took
