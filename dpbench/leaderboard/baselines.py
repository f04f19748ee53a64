"""Published baselines (``paper_baselines.yaml``, each number with its source) joined to our rows."""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from dpbench.errors import ConfigError
from dpbench.leaderboard.aggregate import Row

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

    @property
    def fraction(self) -> float | None:
        """The value on our scale (percent → fraction) when it is the same metric as ours."""
        if self.value is None:
            return None
        return self.value / 100 if self.unit == "%" else self.value

    def label(self, short: bool = False) -> str:
        """``short``: value, model and source only (tables); else with the metric and the note."""
        source = self.source.split(" (")[0] if short else self.source
        if self.value is None:
            return f"— {self.model} [{source}]" if short else f"— ({self.note or 'not readable'}; {source})"
        q = "" if self.qualifier == "=" else self.qualifier
        if short:
            return f"{q}{self.value}{self.unit} {self.model} [{source}]"
        extra = f"; {self.note}" if self.note else ""
        return f"{q}{self.value}{self.unit} {self.metric}, {self.model} ({source}{extra})"


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
            rows.append(PaperRow(**{"epsilon": None, "value": None, **raw}))
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
        row.paper = [_as_dict(p, same_model=p.model == row.model) for _, p in hits]
        used.update(i for i, _ in hits)
    return [p for i, p in enumerate(papers) if i not in used]


def _as_dict(p: PaperRow, same_model: bool) -> dict[str, Any]:
    return {"model": p.model, "metric": p.metric, "value": p.value, "fraction": p.fraction, "source": p.source,
            "label": p.label(), "short": p.label(short=True), "same_model": same_model}
