"""PNG plots of aggregated rows: privacy–utility per task, sparsity–metric, and speed / memory bars."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

from dpbench.leaderboard.aggregate import Row


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(r: Row) -> str:
    return f"{r.method} ({r.model})" if r.trainable_set in ("", "full") else f"{r.method}/{r.trainable_set} ({r.model})"


def _lines(ax, rows: list[Row], label: Callable[[Row], str], x: Callable[[Row], float], marker: str) -> None:
    """One error-bar line (mean ± std over seeds) per label, points sorted by x."""
    lines: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        lines[label(r)].append(r)
    for name, pts in sorted(lines.items()):
        pts.sort(key=x)
        ax.errorbar([x(r) for r in pts], [r.mean for r in pts], yerr=[r.std or 0 for r in pts],
                    marker=marker, capsize=3, label=name)


def privacy_utility(rows: list[Row], out: Path) -> list[Path]:
    """One plot per task: metric vs ε (log axis), one line per method, non-private runs as dashed lines."""
    plt = _pyplot()
    paths = []
    for task in sorted({r.task for r in rows}):
        mine = [r for r in rows if r.task == task and r.mean is not None and r.sparsity is None]
        private = [r for r in mine if r.target_epsilon is not None]
        if not private:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        _lines(ax, private, _label, lambda r: r.target_epsilon, "o")
        for r in mine:
            if r.target_epsilon is None:
                ax.axhline(r.mean, linestyle="--", color="grey", linewidth=1)
                ax.annotate(f"non-private {_label(r)}", (0.01, r.mean), xycoords=("axes fraction", "data"),
                            fontsize=7, color="grey", va="bottom")
        ax.set_xscale("log")
        ticks = sorted({r.target_epsilon for r in private})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        paths.append(_finish(fig, ax, "ε (target; δ as logged)", private[0].metric,
                             f"{task}: privacy–utility (mean ± std over seeds)", out / f"privacy_utility_{task}.png"))
    return paths


def sparsity_metric(rows: list[Row], out: Path) -> list[Path]:
    """One plot per task with compressed runs: metric vs sparsity, one line per (method, ε)."""
    plt = _pyplot()
    paths = []
    for task in sorted({r.task for r in rows if r.sparsity is not None}):
        fig, ax = plt.subplots(figsize=(6, 4))
        mine = [r for r in rows if r.task == task and r.mean is not None and r.sparsity is not None]
        _lines(ax, mine, lambda r: f"{_label(r)}, ε={r.eps_label}", lambda r: r.sparsity, "s")
        paths.append(_finish(fig, ax, "sparsity (fraction of prunable weights removed)",
                             mine[0].metric if mine else "metric", f"{task}: sparsity vs utility",
                             out / f"sparsity_{task}.png"))
    return paths


def speed_memory(rows: list[Row], out: Path) -> list[Path]:
    """Bars of seconds per training step and peak memory per configuration."""
    plt = _pyplot()
    timed = [r for r in rows if r.step_s is not None]
    if not timed:
        return []
    labels = [f"{r.task} {_label(r)} ε={r.eps_label}" for r in timed]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.35 * len(timed) + 1.5), sharey=True)
    a.barh(labels, [r.step_s for r in timed], color="tab:blue")
    a.set_xlabel("seconds per training step")
    b.barh(labels, [r.peak_rss_mb / 1024 for r in timed], color="tab:orange")
    b.set_xlabel("peak RSS (GiB)")
    a.invert_yaxis()
    a.tick_params(axis="y", labelsize=7)
    fig.suptitle("speed and memory (mean over seeds)")
    return [_save(fig, out / "speed_memory.png")]


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label a line plot, add its legend, and save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def all_plots(rows: list[Row], out: Path) -> list[Path]:
    return privacy_utility(rows, out) + sparsity_metric(rows, out) + speed_memory(rows, out)
