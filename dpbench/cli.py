"""The ``dpbench`` command: one run (or a sweep with ``-m``) from Hydra configs in ``conf/``.

Errors in the user's input print one line that names the fix and exit with status 2; a run that
fails leaves ``results.json`` with ``status: "failed"``, never ``"ok"``; a run stopped by SIGTERM/SIGINT
leaves ``status: "stopped"`` and exits with 128 + the signal (:mod:`dpbench.stopping`). A folder holding a
completed record is never run into again unless ``replace_completed_run=true``; the completed record is then
kept (``results.replaced-<time>.json``), and an attempt that fails or stops writes ``results.failed.json`` /
``results.stopped.json`` beside it.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "task", "method", "privacy", "trainer", "logger", "experiment")
_failures: list[str] = []


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "opacus", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def check_group_choices(argv: list[str]) -> str | None:
    """One-line message for an override naming a config file that does not exist (``model=nope``)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options:
                return f"unknown {key} '{choice}'; choose one of: {', '.join(options)}"
    return None


def compose_config(overrides: list[str], return_hydra_config: bool = False):
    """The config one ``dpbench`` run with ``overrides`` would get (Hydra's compose API over ``conf/``)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)


def check_composes(argv: list[str]) -> str | None:
    """Compose a single run's config up front so that Hydra's errors (unknown keys, bad values)
    come out as one line, and check that its output folder can be written. Sweeps (``-m``) and
    Hydra's own flags are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return None
    overrides = [a for a in argv if "=" in a]
    try:
        cfg = compose_config(overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - any composition failure is the user's to fix
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
        return " ".join(lines) or type(e).__name__
    try:
        run_dir = str(cfg.hydra.run.dir)
    except Exception:  # noqa: BLE001 - interpolations only Hydra's run resolves: it checks the folder itself
        return None
    return check_writable(run_dir)


def check_sweep_dir(argv: list[str]) -> str | None:
    """For a sweep (``-m``), a one-line message if the ``hydra.sweep.dir`` given on the command line
    cannot be written (before Hydra launches any job)."""
    if not {"-m", "--multirun"} & set(argv):
        return None
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "hydra.sweep.dir":
            return check_writable(value.strip("'\""), option="hydra.sweep.dir")
    return None


def check_writable(folder: str, option: str = "hydra.run.dir") -> str | None:
    """One-line message if no folder can be made at ``folder`` (set by ``option``): a temporary folder
    is made (and removed) in its nearest existing ancestor, so a good path is left untouched."""
    probe = Path(folder).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dpbench-probe-", dir=probe))
    except OSError as e:
        return f"cannot write the output folder '{folder}' ({e.strerror}); set {option} to a writable folder"
    return None


def _task(cfg) -> None:
    """Hydra's task function. In a sweep each job runs in a forked child process, so that its memory
    (and its peak, ``memory.peak_rss_mb``), allocator state and RNG state are its own, as if run alone;
    single runs (and data-parallel ones, which start their own processes) run here."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    devices = cfg.get("trainer", {}).get("devices", 1)
    if HydraConfig.get().mode != RunMode.MULTIRUN or not hasattr(os, "fork") or devices not in (1, None):
        return _run_job(cfg)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the job
        os.close(read_end)
        code, message = 0, ""
        try:
            _run_job(cfg)
            message = "\n".join(_failures)
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
            import traceback

            traceback.print_exc()
            code, message = 1, f"{type(e).__name__}: {e}"
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(write_end, message.encode())
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"sweep job {HydraConfig.get().job.num} failed: {message or f'wait status {status}'}")
    _failures.extend(line for line in message.splitlines() if line)


def _run_job(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from dpbench.config import check_devices, check_sources, validate
    from dpbench.errors import DPBenchError
    from dpbench.results.io import RESULTS_FILE, write_json_atomic
    from dpbench.results.memory import start_job_peak
    from dpbench.results.schema import STATUS_FAILED, STATUS_STOPPED

    from dpbench.stopping import RunStopped, install

    _quiet()  # again: Hydra has just configured logging for the job
    install()  # SIGTERM / SIGINT stop the run with a "stopped" record and a non-zero exit
    start_job_peak()  # the record's peak memory is this job's, also in a sweep
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    results = out_dir / RESULTS_FILE
    completed = _holds_completed_run(results)
    if completed and not cfg.get("replace_completed_run"):
        message = (f"'{results}' holds a completed run; use a new hydra.run.dir, or add replace_completed_run=true "
                   "to run again (the completed record is then kept beside the new one)")
        print(f"dpbench: error: {message}", file=sys.stderr)
        _failures.append(message)
        return
    if results.exists() and not completed:
        results.unlink()  # a failed or stopped attempt's record must never stand in for this run

    def attempt(status: str) -> Path:  # where a run that did not complete is recorded: never over a completed one
        return out_dir / f"results.{status}.json" if completed else results

    try:
        validate(cfg)  # before torch is imported: a bad option costs a second, not the imports
        check_sources(cfg)
        check_devices(cfg)
        from dpbench.allocator import reuse_freed_memory
        from dpbench.methods import get_runner

        if cfg.trainer.get("reuse_freed_memory", True):
            reuse_freed_memory()
        threads = cfg.trainer.get("num_threads")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        record = get_runner(cfg.method.get("kind", "finetune"))(cfg, out_dir)
    except RunStopped as e:
        _write_attempt(attempt(STATUS_STOPPED), STATUS_STOPPED, str(e), cfg)
        print(f"dpbench: stopped: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except (DPBenchError, Exception) as e:  # noqa: BLE001 - every failure is recorded, then reported
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        _write_attempt(attempt(STATUS_FAILED), STATUS_FAILED, message, cfg)
        if not isinstance(e, DPBenchError):
            raise
        print(f"dpbench: error: {message}", file=sys.stderr)
        _failures.append(message)
        return
    if cfg.get("audit") and record.privacy.stages:
        from dataclasses import asdict

        from dpbench.privacy.audit import audit_privacy

        record.extra["audit"] = audit_privacy(asdict(record.privacy), engine=cfg.privacy.get("engine", "bk"))
        if not record.extra["audit"]["consistent"]:
            print(f"dpbench: warning: the privacy audit's lower bound {record.extra['audit']['epsilon_lower_bound']:.3f} "
                  f"exceeds the claimed ε={record.privacy.epsilon:.3f}", file=sys.stderr)
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) != 0:
        return  # data parallel: rank 0 writes the record
    if completed:  # the user asked to run again: the completed record is kept, renamed, never destroyed
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        os.replace(results, results.with_name(f"results.replaced-{stamp}.json"))
    write_json_atomic(results, record.to_dict())
    from dpbench.pipeline import publish_record

    publish_record(cfg, record, out_dir)
    eps = record.privacy.epsilon
    privacy = "non-private" if eps is None else f"ε={eps:.3f} (target {record.privacy.target_epsilon})"
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in record.metrics.items())
    print(f"dpbench: {record.method} on {record.task} ({record.model}): {metrics}; {privacy}; "
          f"{record.timing['steps']} steps in {record.timing['train_s']:.1f}s → {results}")


def _holds_completed_run(results: Path) -> bool:
    from dpbench.results.io import read_json

    try:
        return results.is_file() and read_json(results).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _write_attempt(path: Path, status: str, message: str, cfg) -> None:
    """The record of a run that did not complete: its status and why, never the fields of a result."""
    from omegaconf import OmegaConf

    from dpbench.results.io import write_json_atomic

    try:
        write_json_atomic(path, {"status": status, "error": message, "task": cfg.task.get("name"),
                                 "model": cfg.model.get("name"), "method": cfg.method.get("name"),
                                 "seed": cfg.get("seed"), "config": OmegaConf.to_container(cfg)})
    except OSError:
        pass


def main() -> None:
    _quiet()
    argv = sys.argv[1:]
    problem = check_group_choices(argv) or check_sweep_dir(argv) or check_composes(argv)
    if problem:
        print(f"dpbench: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    import hydra

    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_task)
    app()
    if _failures:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
