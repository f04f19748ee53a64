"""GLUE loaders: local files (offline, the default here) or the Hugging Face hub.

``data_dir`` is one task's folder laid out like ``../shared/data/<task>/`` (see its README).
One table, ``FORMATS``, says for each task which files hold which split and how their
columns and labels look; a single TSV reader and a single JSON reader do the rest:

* GLUE ``.tsv`` files are unquoted: rows are split on tabs, never parsed as CSV quoting.
* Files are read as ``utf-8-sig``, which strips MRPC's BOM and is a no-op elsewhere.
* CoLA has no header; the other TSVs' headers are checked, to catch a wrong ``data_dir``.
* QNLI, MNLI and QQP use the ``subset_powerfulpromptft/{train,dev}.json`` subsets for both
  splits. QNLI's full official ``dev.tsv`` is deliberately not used, so that train and dev of
  all three large tasks come from the same source and the same distribution.

File labels are mapped to the Hugging Face GLUE label ids (``TaskSpec.label_names`` order).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dpbench.data.examples import TextClassificationData
from dpbench.data.tasks import TaskSpec, get_task_spec
from dpbench.errors import ConfigError, DataError

SPLITS = ("train", "dev")
README_HINT = "see ../shared/data/README.md"
DEFAULT_HUB_NAME = "nyu-mll/glue"


@dataclass(frozen=True)
class FileFormat:
    """Where one task's splits live and how to read them."""

    files: dict[str, str]              # split -> path relative to data_dir (.tsv or .json)
    columns: tuple[str, ...]           # TSV columns in file order; JSON keys for .json
    text_a: str
    text_b: str | None
    label: str
    header: bool = True                # TSV only: first line is a header equal to ``columns``
    numeric_labels: bool = True        # file labels are "0", "1", ...; else label names
    hub_columns: tuple[str, str | None] = ("sentence", None)


_TSV = {"train": "train.tsv", "dev": "dev.tsv"}
_JSON = {s: f"subset_powerfulpromptft/{s}.json" for s in SPLITS}
_JSON_KEYS = dict(columns=("text_a", "text_b", "label"), text_a="text_a", text_b="text_b",
                  label="label")

FORMATS: dict[str, FileFormat] = {
    "sst2": FileFormat(_TSV, ("sentence", "label"), "sentence", None, "label"),
    "cola": FileFormat(_TSV, ("source", "label", "original_label", "sentence"), "sentence",
                       None, "label", header=False),
    "mrpc": FileFormat(_TSV, ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                       "#1 String", "#2 String", "Quality",
                       hub_columns=("sentence1", "sentence2")),
    "rte": FileFormat(_TSV, ("index", "sentence1", "sentence2", "label"), "sentence1",
                      "sentence2", "label", numeric_labels=False,
                      hub_columns=("sentence1", "sentence2")),
    "qnli": FileFormat(_JSON, **_JSON_KEYS, numeric_labels=False,
                       hub_columns=("question", "sentence")),
    "mnli": FileFormat(_JSON, **_JSON_KEYS, numeric_labels=False,
                       hub_columns=("premise", "hypothesis")),
    "qqp": FileFormat(_JSON, **_JSON_KEYS, hub_columns=("question1", "question2")),
}


def load_glue(task: str, split: str, data_dir: str | os.PathLike[str] | None, *,
              hub_name: str | None = None) -> TextClassificationData:
    """Load ``split`` ("train" or "dev") of GLUE ``task``.

    With ``data_dir`` (a folder like ``../shared/data/<task>``) read local files; with None,
    download via ``datasets.load_dataset(hub_name or "nyu-mll/glue", task)`` (needs network).
    All problems raise a one-line DataError/ConfigError saying what to fix.
    """
    spec = get_task_spec(task)
    if task not in FORMATS:
        raise ConfigError(f"task {task!r} is not a GLUE task; choose one of: {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS} (got {split!r})")
    fmt = FORMATS[task]
    if data_dir is None:
        data = _load_hub(spec, fmt, split, hub_name or DEFAULT_HUB_NAME)
        where = f"the hub dataset {hub_name or DEFAULT_HUB_NAME!r}"
    else:
        path = _resolve_file(task, fmt, split, data_dir)
        data = _load_file(spec, fmt, path)
        where = str(path)
    if len(data) == 0:
        raise DataError(f"{where} has no examples for {task} {split}; "
                        f"point task.data_dir at a non-empty copy ({README_HINT})")
    return data


def _resolve_file(task: str, fmt: FileFormat, split: str, data_dir: str | os.PathLike[str]) -> Path:
    root = Path(data_dir)
    expected = " and ".join(fmt.files.values())
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"task.data_dir '{data_dir}' {what}; point task.data_dir at a folder "
                        f"holding {expected} ({README_HINT})")
    path = root / fmt.files[split]
    if not path.is_file():
        hint = ""
        if (root / task / fmt.files[split]).is_file():
            hint = f"; did you mean task.data_dir={str(root / task)!r}?"
        raise DataError(f"{path} not found; task.data_dir for {task} must hold {expected} "
                        f"({README_HINT}){hint}")
    return path


def _load_file(spec: TaskSpec, fmt: FileFormat, path: Path) -> TextClassificationData:
    label_ids = _label_ids(spec, fmt)
    rows = _read_json(path, fmt) if path.suffix == ".json" else _read_tsv(path, fmt)
    text_a: list[str] = []
    text_b: list[str] | None = [] if fmt.text_b else None
    labels: list[int] = []
    try:
        for where, row in rows:
            raw = row[fmt.label]
            if raw not in label_ids:
                raise DataError(f"{path} {where}: unknown label {raw!r}; expected one of "
                                f"{', '.join(map(repr, label_ids))} (fix or remove that row)")
            labels.append(label_ids[raw])
            text_a.append(row[fmt.text_a])
            if text_b is not None:
                text_b.append(row[fmt.text_b])
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                        f"re-save it as UTF-8") from None
    return TextClassificationData(text_a, text_b, labels)


def _label_ids(spec: TaskSpec, fmt: FileFormat) -> dict[str, int]:
    """Raw label string in the file -> label id."""
    if fmt.numeric_labels:
        return {str(i): i for i in range(spec.num_labels)}
    return {name: i for i, name in enumerate(spec.label_names)}


def _read_tsv(path: Path, fmt: FileFormat) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ("line N", row) for each data row of an unquoted GLUE TSV file."""
    n = len(fmt.columns)
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").removesuffix("\r")
            if lineno == 1 and fmt.header:
                if tuple(line.split("\t")) != fmt.columns:
                    header = "<TAB>".join(fmt.columns)
                    raise DataError(f"{path} line 1: expected header {header!r}, got "
                                    f"{line[:80]!r}; is task.data_dir the right task's "
                                    f"folder? ({README_HINT})")
                continue
            if not line:
                continue  # blank lines (e.g. a trailing one) carry no example
            fields = line.split("\t")
            if len(fields) != n:
                raise DataError(f"{path} line {lineno}: expected {n} tab-separated columns "
                                f"({', '.join(fmt.columns)}), got {len(fields)}; fix or remove "
                                f"that row (GLUE .tsv files are unquoted)")
            yield f"line {lineno}", dict(zip(fmt.columns, fields))


def _read_json(path: Path, fmt: FileFormat) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ("entry 'K'", record) for each record of a {"K": {...}, ...} JSON file."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg}); "
                            f"re-create the file ({README_HINT})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected one JSON object {{\"0\": {{...}}, ...}}, got "
                        f"{type(obj).__name__}; re-create the file ({README_HINT})")
    for key, rec in obj.items():
        if not (isinstance(rec, dict) and all(isinstance(rec.get(c), (str, int))
                                              for c in fmt.columns)):
            raise DataError(f"{path} entry {key!r}: expected an object with string fields "
                            f"{', '.join(fmt.columns)}; fix or remove that entry")
        yield f"entry {key!r}", {c: str(rec[c]) for c in fmt.columns}


def _load_hub(spec: TaskSpec, fmt: FileFormat, split: str, hub_name: str) -> TextClassificationData:
    hub_split = "train" if split == "train" else (
        "validation_matched" if spec.name == "mnli" else "validation")
    try:
        import datasets

        ds = datasets.load_dataset(hub_name, spec.name, split=hub_split)
    except Exception as e:  # offline, unknown name, auth... all mean "use local files"
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise DataError(f"could not load {spec.name} from the Hugging Face hub dataset "
                        f"{hub_name!r} ({type(e).__name__}: {msg}); set task.data_dir to a "
                        f"local copy, e.g. ../shared/data/{spec.name}") from None
    col_a, col_b = fmt.hub_columns
    return TextClassificationData(
        text_a=list(ds[col_a]),
        text_b=None if col_b is None else list(ds[col_b]),
        labels=[int(x) for x in ds["label"]],
    )
