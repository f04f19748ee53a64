"""Run the ``dpbench`` command from tests, as a separate process, without paying its imports each time.

``dpbench(*args)`` forks the test worker, which has imported the command's stack (torch, Lightning,
Transformers, Hydra) once, and runs :func:`dpbench.cli.main` in the child with ``sys.argv`` set: the child
is a process of its own (its memory, module globals, signal handlers, exit status and output are its
own, as for ``python -m dpbench``), but starts in milliseconds instead of the ~10 s of imports. Tests
that need a fresh interpreter (peak memory, signals sent from outside, processes that start others)
use :func:`dpbench_process`, which runs ``python -m dpbench``.
"""
from __future__ import annotations

import atexit
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
_ENV = {"HYDRA_FULL_ERROR": "0"}


def dpbench_process(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m dpbench *args`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "dpbench", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **_ENV}, timeout=TIMEOUT_S)


def _warm() -> None:
    """Import, in the worker, what every run imports, so that forked children inherit it."""
    import dpbench.cli  # noqa: F401
    import dpbench.methods  # noqa: F401
    import hydra  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)  # as the interpreter does for sys.exit("message")
    return 1


def _child(args: tuple[str, ...], cwd: Path, out: int, err: int) -> None:
    """The forked run: never returns to the test's code."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        atexit._clear()  # the worker's exit handlers are not this run's
        os.chdir(cwd)
        os.environ.update(_ENV)
        sys.argv = ["dpbench", *args]
        from dpbench.cli import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except BaseException:  # noqa: BLE001 - reported as the interpreter would, then the exit status
            import traceback

            traceback.print_exc()
            code = 1
        import logging
        import threading

        threading._shutdown()  # as at interpreter exit: wait for the run's non-daemon threads
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def dpbench(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``dpbench *args`` in a forked child of this (pre-imported) worker; its exit status and output.

    Only where forking is safe: a process whose OpenMP has more than one thread may have started its thread
    pool, which a forked child can deadlock on (GNU OpenMP is not fork-safe). ``make test``'s workers run
    one thread (tests/conftest.py); elsewhere this falls back to :func:`dpbench_process`."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") != "1" or torch.get_num_threads() != 1:
        return dpbench_process(*args, cwd=cwd)
    _warm()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(args, cwd, out.fileno(), err.fileno())
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["dpbench", *args], TIMEOUT_S)
            time.sleep(0.02)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return subprocess.CompletedProcess(["dpbench", *args], os.waitstatus_to_exitcode(status), *texts)
