"""Keep freed memory in the process for reuse (glibc malloc) instead of handing it back to the OS.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves large requests with fresh
``mmap``'d pages and unmaps them on ``free``, so every training step faults its activations,
gradients and optimizer temporaries back in page by page. Measured here on MiniLM (2 threads):
40–50k minor faults per step at T = 20 (B = 2 × 32) and 0.5–1M at T = 512 (B = 8). With ``mmap``
off and a high trim threshold, freed blocks stay on the heap and the next step reuses them (next to
no faults after the first steps). In ``dpbench-bench`` (docs/benchmarks.md, against ``--system-malloc``)
that took DP full from 1.23× to 1.15× of non-private at T = 128 and cut the T = 512 step by 41%
(non-private) and 44% (DP), for 1–2% (T = 128) to 12–14% (T = 512) more peak RSS growth.

Memory freed after the peak is kept by the process until it exits or more than ``TRIM_BYTES`` are
free at the top of the heap. ``trainer.reuse_freed_memory=false`` (or ``DPBENCH_SYSTEM_MALLOC=1``)
leaves malloc alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
TRIM_BYTES = 2**31 - 1  # the largest value mallopt takes (a C int)

_done = False


def reuse_freed_memory() -> bool:
    """Configure glibc malloc to reuse freed memory; True if it took effect (False off glibc, or
    when ``DPBENCH_SYSTEM_MALLOC`` is set). Idempotent."""
    global _done
    if _done:
        return True
    if os.environ.get("DPBENCH_SYSTEM_MALLOC") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    return _done
