"""The leaderboard as a terminal table (rich), Markdown, CSV, or one self-contained HTML page."""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from dpbench.leaderboard.aggregate import Row
from dpbench.leaderboard.baselines import PaperRow
from dpbench.leaderboard.verify import Verdict

COLUMNS = ("rank", "task", "model", "method", "trainable set", "ε target", "ε verified", "δ", "metric",
           "mean ± std", "n", "paper", "trainable params", "s / step", "train min", "peak MiB", "sparsity", "latency ×",
           "audit ε ≥", "tuning")


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def cells(r: Row, short: bool = True) -> list[str]:
    paper = "; ".join(p["short" if short else "label"] for p in r.paper) or ""
    return [_num(r.rank, "d") if r.rank else "—", r.task, r.model, r.method, r.trainable_set or "—",
            r.eps_label, _num(r.epsilon, ".3f"), _num(r.delta, ".1e"), r.metric,
            "—" if r.mean is None else f"{r.mean:.4f} ± {r.std:.3f}", str(r.n), paper,
            f"{r.trainable:,.0f}", _num(r.step_s, ".3f"), _num(r.train_s / 60, ".1f"), _num(r.peak_rss_mb, ",.0f"),
            _num(r.sparsity, ".2f"), _num(r.latency_speedup, ".2f"),
            "uninformative" if r.audit_uninformative else _num(r.audit_lower, ".2f"), r.tuning]


def _shown(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """The columns with a value in some row (e.g. no sparsity column without compressed runs), and the cells."""
    table = [cells(r) for r in rows]
    keep = [i for i, col in enumerate(COLUMNS)
            if i < 11 or any(row[i] not in ("", "—") for row in table)]
    return [COLUMNS[i] for i in keep], [[row[i] for i in keep] for row in table]


def _reason_lines(rejected: list[Verdict]) -> list[tuple[str, str]]:
    return [(v.source, "; ".join(v.reasons)) for v in rejected]


def terminal(rows: list[Row], rejected: list[Verdict], console) -> None:
    from rich.table import Table

    table = Table(title=f"dpbench leaderboard: {len(rows)} configurations, "
                        f"{sum(r.n for r in rows)} verified runs", show_lines=False)
    columns, body = _shown(rows)
    for col in columns:
        table.add_column(col, justify="left" if col in COLUMNS[1:5] + ("metric", "paper") else "right",
                         overflow="fold", no_wrap=col != "paper", max_width=30 if col == "paper" else None)
    for row in body:
        table.add_row(*row)
    console.print(table)
    for source, why in _reason_lines(rejected):
        console.print(f"[red]rejected[/red] {source}: {why}")


def markdown(rows: list[Row], rejected: list[Verdict]) -> str:
    columns, body = _shown(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    if rejected:
        lines += ["", "Rejected runs:", ""] + [f"- `{s}`: {why}" for s, why in _reason_lines(rejected)]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "task", "model", "method", "trainable_set", "target_epsilon", "epsilon", "delta", "metric",
                "mean", "std", "n", "seeds", "paper", "trainable", "total", "train_s", "step_s", "peak_rss_mb",
                "sparsity", "latency_speedup", "audit_epsilon_lower_bound", "tuning"])
    for r in rows:
        w.writerow([r.rank, r.task, r.model, r.method, r.trainable_set, r.target_epsilon, r.epsilon, r.delta,
                    r.metric, r.mean, r.std, r.n, " ".join(map(str, r.seeds)),
                    "; ".join(p["label"] for p in r.paper), r.trainable, r.total, r.train_s, r.step_s,
                    r.peak_rss_mb, r.sparsity, r.latency_speedup, r.audit_lower, r.tuning])
    return buf.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px}th{background:#f0f0f0;cursor:pointer;user-select:none}
th:hover{background:#e0e0ff}td.num{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even){background:#fafafa}
.bad{color:#a00}img{max-width:100%;border:1px solid #ddd;margin:6px}.note{color:#666;font-size:12px}"""

_JS = """document.querySelectorAll('table.sortable th').forEach((th,i)=>th.addEventListener('click',()=>{
const tb=th.closest('table').tBodies[0],rows=[...tb.rows],dir=th.dataset.dir==='asc'?-1:1;th.dataset.dir=dir>0?'asc':'desc';
const key=r=>{const t=r.cells[i].innerText.replace(/[,±].*$/,'').trim(),n=parseFloat(t.replace('∞','Infinity'));
return isNaN(n)?t:n};rows.sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*dir});rows.forEach(r=>tb.appendChild(r))}));"""


def page(rows: list[Row], rejected: list[Verdict], unjoined: list[PaperRow], plots: list[Path]) -> str:
    """One HTML file: sortable table (click a header), embedded PNG plots, paper rows, rejected runs."""
    e = html.escape
    numeric = {"rank", "ε target", "ε verified", "δ", "mean ± std", "n", "trainable params", "s / step",
               "peak MiB", "sparsity", "latency ×", "audit ε ≥"}
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td class='{'num' if c in numeric else ''}'>{e(v)}</td>"
                                    for c, v in zip(COLUMNS, cells(r, short=False))) + "</tr>" for r in rows)
    imgs = "".join(f"<figure><img alt='{e(p.stem)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{e(p.stem)}</figcaption></figure>"
                   for p in plots)
    papers = "".join(f"<li>{e(p.task)} · {e(p.method)} · ε={e('∞' if p.epsilon is None else str(p.epsilon))}: "
                     f"{e(p.label())}</li>" for p in unjoined)
    bad = "".join(f"<li class='bad'><code>{e(s)}</code>: {e(why)}</li>" for s, why in _reason_lines(rejected))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dpbench leaderboard</title>
<style>{_CSS}</style></head><body><h1>dpbench leaderboard</h1>
<p class="note">{len(rows)} configurations from {sum(r.n for r in rows)} verified runs. Every ε was recomputed
from the logged mechanism (σ, q, steps, δ of each stage) with the PRV accountant, and for a tuned run
(dpbench-tune) the whole tuning's ε by private selection; "tuning: not accounted" marks a private run whose
hyper-parameters were chosen outside the guarantee. Mean ± std over seeds (n).
Paper numbers are shown on our scale (fractions); a paper's relative claim is shown beside the change we measured
against the same reference run (points). Click a header to sort.</p>
<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Plots</h2>{imgs or '<p>No plots (no private runs with values).</p>'}
<h2>Published baselines without a matching run</h2><ul>{papers or '<li>none</li>'}</ul>
<h2>Rejected runs ({len(rejected)})</h2><ul>{bad or '<li>none</li>'}</ul>
<script>{_JS}</script></body></html>
"""
