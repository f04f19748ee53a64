"""``dpbench-leaderboard DIR``: a table of the runs found under a folder (single runs and sweeps)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dpbench.results.io import RESULTS_FILE


def find_records(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``results.json`` under ``root`` with its parsed content (unreadable ones as failures)."""
    out = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        try:
            out.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError) as e:
            out.append((path, {"status": "unreadable", "error": str(e)}))
    return out


def main_metric(record: dict[str, Any]) -> tuple[str, float | None]:
    from dpbench.data.tasks import TASKS

    spec = TASKS.get(record.get("task", ""))
    name = spec.main_metric if spec else "accuracy"
    return name, (record.get("metrics") or {}).get(name)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def render(records: list[tuple[Path, dict[str, Any]]], console: Console) -> None:
    ok = [r for _, r in records if r.get("status") == "ok"]
    ok.sort(key=lambda r: (r.get("task", ""), r.get("model", ""),
                           (r.get("privacy") or {}).get("target_epsilon") or float("inf"),
                           -(main_metric(r)[1] or 0.0)))
    table = Table(title=f"dpbench leaderboard ({len(ok)} runs)")
    compressed = any(r.get("compression") for r in ok)
    cols = ("task", "model", "method", "ε (target)", "δ", "metric", "value", "trainable", "steps", "train s")
    cols += ("sparsity", "params", "latency ×") if compressed else ()
    for col in cols:
        table.add_column(col, justify="left" if col in cols[:6] else "right")
    for r in ok:
        priv = r.get("privacy") or {}
        eps = priv.get("epsilon")
        eps_s = "∞ (non-private)" if eps is None else f"{eps:.2f} ({priv.get('target_epsilon')})"
        metric, value = main_metric(r)
        params = r.get("params") or {}
        timing = r.get("timing") or {}
        row = [r.get("task", "?"), r.get("model", "?"), r.get("method", "?"), eps_s,
               "—" if priv.get("delta") is None else f"{priv['delta']:.1e}", metric, _fmt(value),
               f"{params.get('trainable', 0):,}", str(timing.get("steps", "")), _fmt(timing.get("train_s"), 1)]
        if compressed:
            c = r.get("compression") or {}
            row += [_fmt(c.get("sparsity"), 2), f"{c.get('params', params.get('total', 0)):,}",
                    _fmt((c.get("latency_ms") or {}).get("speedup"), 2)]
        table.add_row(*row)
    console.print(table)
    bad = [(p, r) for p, r in records if r.get("status") != "ok"]
    for path, r in bad:
        console.print(f"[red]not listed[/red] {path}: status={r.get('status')} {r.get('error', '')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpbench-leaderboard", description=__doc__)
    parser.add_argument("dir", type=Path, help="folder holding run folders (searched recursively)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"dpbench-leaderboard: error: '{args.dir}' is not a folder; pass the folder of your runs "
              "(e.g. outputs/)", file=sys.stderr)
        raise SystemExit(2)
    records = find_records(args.dir)
    if not records:
        print(f"dpbench-leaderboard: error: no {RESULTS_FILE} under '{args.dir}'; run `dpbench` first",
              file=sys.stderr)
        raise SystemExit(2)
    console = Console()
    render(records, console if console.is_terminal else Console(width=160))


if __name__ == "__main__":
    main()
