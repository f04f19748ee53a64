"""Published baselines (``paper_baselines.yaml``, each number with its source) joined to our rows.

A row is either a number (a paper's accuracy, shown on our scale: percent → fraction) or a relative claim
(``relative_to``: the paper says how a method compares with a reference, e.g. "50% sparsity while maintaining
nearly full performance"). A claim is shown beside the change we measured against the same reference among our
own runs (same task, model, ε; dense), in points for accuracy-like metrics."""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from dpbench.errors import ConfigError
from dpbench.leaderboard.aggregate import Row, lower_is_better

ANY = "any"  # ε not readable in the source: the row joins runs at every ε


@dataclass(frozen=True)
class PaperRow:
    task: str
    model: str
    method: str
    epsilon: float | str | None   # None: non-private; "any": not readable
    metric: str
    value: float | None           # as printed in the source (None: not readable)
    source: str
    unit: str = ""
    qualifier: str = "="
    sparsity: float | None = None
    note: str = ""
    relative_to: tuple[str, ...] = ()  # a claim: ``value`` is the change vs the best of these methods

    @property
    def is_claim(self) -> bool:
        return bool(self.relative_to)

    @property
    def fraction(self) -> float | None:
        """The value on our scale (percent → fraction) when it is the same metric as ours."""
        if self.value is None:
            return None
        return self.value / 100 if self.unit == "%" else self.value

    def shown_value(self) -> str:
        """The number in our unit: a fraction for "%" values, points ("pts") for a claimed change in percent."""
        if self.value is None:
            return f"'{self.note}'" if self.is_claim and self.note else "—"
        q = "" if self.qualifier == "=" else self.qualifier
        if self.is_claim:
            return f"{q}{self.value:+g}" + (" pts" if self.unit == "%" else "")
        return f"{q}{self.fraction:.3f}" if self.unit == "%" else f"{q}{self.value:g}"

    def label(self, short: bool = False) -> str:
        """``short``: value, model and source only (tables); else with the metric and the note."""
        source = self.source.split(" (")[0] if short else self.source
        value = self.shown_value()
        if self.is_claim:
            return f"paper {value} [{source}]" if short else \
                f"paper {value} vs {'/'.join(self.relative_to)}, {self.model} ({source})"
        if self.value is None:
            return f"— {self.model} [{source}]" if short else f"— ({self.note or 'not readable'}; {source})"
        if short:
            return f"{value} {self.model} [{source}]"
        extra = f"; {self.note}" if self.note else ""
        return f"{value} {self.metric}, {self.model} ({source}{extra})"


_FIELDS = set(PaperRow.__dataclass_fields__)


def load_baselines(extra: Iterable[Path] = ()) -> list[PaperRow]:
    """The packaged rows plus users' files (same format)."""
    texts = [("paper_baselines.yaml", resources.files("dpbench.leaderboard").joinpath("paper_baselines.yaml")
              .read_text(encoding="utf-8"))]
    for path in extra:
        try:
            texts.append((str(path), Path(path).read_text(encoding="utf-8")))
        except OSError as e:
            raise ConfigError(f"cannot read baselines file '{path}' ({e.strerror}); pass an existing YAML file") from None
    rows = []
    for name, text in texts:
        data = yaml.safe_load(text) or {}
        for i, raw in enumerate(data.get("rows") or []):
            if not isinstance(raw, dict) or not {"task", "model", "method", "metric", "source"} <= set(raw) \
                    or set(raw) - _FIELDS:
                raise ConfigError(f"{name}: row {i} needs task, model, method, metric, source (and only "
                                  f"{', '.join(sorted(_FIELDS))}); fix that row")
            rel = raw.get("relative_to") or ()
            rows.append(PaperRow(**{"epsilon": None, "value": None, **raw,
                                    "relative_to": (rel,) if isinstance(rel, str) else tuple(rel)}))
    return rows


def _eps_match(paper: float | str | None, ours: float | None) -> bool:
    if paper == ANY:
        return True
    if paper is None or ours is None:
        return paper is None and ours is None
    return math.isclose(float(paper), float(ours), rel_tol=1e-9)


def join(rows: list[Row], papers: list[PaperRow]) -> list[PaperRow]:
    """Attach to each row the papers' numbers for its task, method and ε (same-model ones first); returns the
    paper rows that joined none of ours (shown in their own table)."""
    used: set[int] = set()
    for row in rows:
        hits = [(i, p) for i, p in enumerate(papers)
                if p.task == row.task and p.method == row.method and _eps_match(p.epsilon, row.target_epsilon)
                and (p.sparsity is None or row.sparsity is None or math.isclose(p.sparsity, row.sparsity))]
        hits.sort(key=lambda ip: ip[1].model != row.model)
        row.paper = [_as_dict(p, same_model=p.model == row.model, measured=measured_change(row, p, rows))
                     for _, p in hits]
        used.update(i for i, _ in hits)
    return [p for i, p in enumerate(papers) if i not in used]


def reference_row(row: Row, methods: tuple[str, ...], rows: list[Row]) -> Row | None:
    """Our run a claim about ``row`` compares against: one of ``methods`` on the same task, model and ε, dense;
    the same trainable set first (ANADP over LoRA → DP-LoRA), then the best."""
    refs = [r for r in rows if r.method in methods and r.task == row.task and r.model == row.model
            and r.target_epsilon == row.target_epsilon and r.sparsity is None and r.mean is not None
            and r is not row]
    if not refs:
        return None
    sign = 1 if lower_is_better(row.metric) else -1
    return min(refs, key=lambda r: (r.trainable_set != row.trainable_set, sign * r.mean))


def measured_change(row: Row, p: PaperRow, rows: list[Row]) -> dict[str, Any] | None:
    """For a claim: our change against the reference (points when the metric is a fraction), else None."""
    if not p.is_claim or row.mean is None:
        return None
    ref = reference_row(row, p.relative_to, rows)
    if ref is None:
        return None
    points = not lower_is_better(row.metric)  # accuracy, F1, MCC: fractions → points
    change = (row.mean - ref.mean) * (100 if points else 1)
    return {"change": change, "unit": "pts" if points else "", "reference": ref.method,
            "text": f"{change:+.1f}{' pts' if points else ''} vs {ref.method}"}


def _as_dict(p: PaperRow, same_model: bool, measured: dict[str, Any] | None = None) -> dict[str, Any]:
    label, short = p.label(), p.label(short=True)
    if p.is_claim:
        ours = measured["text"] if measured else f"no {'/'.join(p.relative_to)} run to compare"
        label, short = f"measured {ours}; {label}", f"{ours}, {short}"
    return {"model": p.model, "metric": p.metric, "value": p.value, "fraction": None if p.is_claim else p.fraction,
            "source": p.source, "label": label, "short": short, "same_model": same_model, "measured": measured}
