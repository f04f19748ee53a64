"""Each run's own peak memory, also inside a Hydra sweep.

A sweep runs each job in a forked child process (``dpbench/cli.py``), which starts from the sweep
process's memory (imports and configs, as a run alone). At the start of a job, :func:`start_job_peak` collects garbage, hands the freed heap pages back to
the kernel (glibc ``malloc_trim``; runs otherwise keep freed memory for reuse, see
:mod:`dpbench.allocator`) and resets the kernel's high-water mark of the process (``VmHWM``, by
writing 5 to ``/proc/self/clear_refs``). ``VmHWM`` at the end is then the peak of this job alone,
on top of what the process still holds (the imported libraries, which a job run alone holds too).
Where that is not possible (not Linux, or a kernel that refuses), the record falls back to the
process's ``ru_maxrss`` and says so in ``memory.measured``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from typing import Any

JOB_PEAK = "VmHWM since job start (gc, malloc_trim, then /proc/self/clear_refs reset)"
PROCESS_PEAK = "ru_maxrss of the process (includes earlier jobs of a sweep)"

_job_start_mb: float | None = None


def status_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back
        pass


def start_job_peak() -> bool:
    """Make the next :func:`memory_record` this job's own peak; True if the kernel's mark was reset."""
    global _job_start_mb
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        _job_start_mb = None
        return False
    _job_start_mb = status_mb("VmRSS")
    return _job_start_mb is not None


def memory_record() -> dict[str, Any]:
    """``memory`` of a record: ``peak_rss_mb`` (since :func:`start_job_peak` if it took effect, else the
    process's), how it was measured, and the RSS the job started from."""
    peak = status_mb("VmHWM") if _job_start_mb is not None else None
    if peak is not None:
        return {"peak_rss_mb": round(peak, 1), "measured": JOB_PEAK, "start_rss_mb": round(_job_start_mb, 1)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024
    return {"peak_rss_mb": round(rss_mb, 1), "measured": PROCESS_PEAK}
