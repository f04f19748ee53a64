"""GLUE loader on small hand-made files: quirks that must work and inputs that must fail clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpbench.data.glue import load_glue
from dpbench.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def raises_one_line(exc: type[Exception], match: str, *args: object) -> str:
    with pytest.raises(exc, match=match) as info:
        load_glue(*args)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- quirks that must parse ----------------------------------------------------------------

def test_tsv_quotes_are_literal_and_crlf_ok(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv",
          'sentence\tlabel\r\na "quoted thing\t0\r\nhe said " hi \t1\r\n\n')
    data = load_glue("sst2", "train", str(tmp_path))
    assert data.text_a == ['a "quoted thing', 'he said " hi ']
    assert data.labels == [0, 1] and data.text_b is None


def test_cola_headerless_and_mrpc_bom(tmp_path: Path) -> None:
    write(tmp_path / "cola" / "dev.tsv", "gj04\t1\t\tIt rained.\ngj04\t0\t*\tRained it the.\n")
    assert load_glue("cola", "dev", str(tmp_path / "cola")).labels == [1, 0]
    write(tmp_path / "mrpc" / "dev.tsv",
          "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA b .\tC d .\n", "utf-8-sig")
    data = load_glue("mrpc", "dev", str(tmp_path / "mrpc"))
    assert (data.text_a, data.text_b, data.labels) == (["A b ."], ["C d ."], [0])


def test_string_labels_use_hf_order(tmp_path: Path) -> None:
    write(tmp_path / "rte" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n"
          "0\tp\th\tnot_entailment\n1\tp\th\tentailment\n")
    assert load_glue("rte", "train", str(tmp_path / "rte")).labels == [1, 0]
    records = {str(i): {"text_a": "p", "text_b": "h", "label": lab}
               for i, lab in enumerate(["contradiction", "entailment", "neutral"])}
    write(tmp_path / "mnli" / "subset_powerfulpromptft" / "dev.json", json.dumps(records))
    assert load_glue("mnli", "dev", str(tmp_path / "mnli")).labels == [2, 0, 1]


# --- inputs that must fail with a one-line error ----------------------------------------------

def test_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nbad row\twith\t0\n")
    msg = raises_one_line(DataError, r"train\.tsv line 3: expected 2 tab-separated columns",
                          "sst2", "train", str(tmp_path))
    assert str(tmp_path) in msg


def test_bad_label_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\t0\nfine\tpositive\n")
    raises_one_line(DataError, r"dev\.tsv line 3: unknown label 'positive'; expected one of "
                    r"'0', '1'", "sst2", "dev", str(tmp_path))


def test_missing_data_dir(tmp_path: Path) -> None:
    raises_one_line(DataError, r"task\.data_dir '.*nope' does not exist; point task\.data_dir "
                    r"at a folder holding train\.tsv and dev\.tsv", "sst2", "train",
                    str(tmp_path / "nope"))
    write(tmp_path / "file", "x")
    raises_one_line(DataError, "is not a directory", "sst2", "train", str(tmp_path / "file"))


def test_missing_file_with_hint(tmp_path: Path) -> None:
    raises_one_line(DataError, r"dev\.tsv not found; task\.data_dir for rte must hold",
                    "rte", "dev", str(tmp_path))
    write(tmp_path / "rte" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n")
    raises_one_line(DataError, r"did you mean task\.data_dir=.*rte", "rte", "dev", str(tmp_path))
    raises_one_line(DataError, r"subset_powerfulpromptft/train\.json not found",
                    "qqp", "train", str(tmp_path))


def test_empty_dataset(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "sentence\tlabel\n\n")
    raises_one_line(DataError, "has no examples for sst2 train", "sst2", "train", str(tmp_path))
    write(tmp_path / "subset_powerfulpromptft" / "dev.json", "{}")
    raises_one_line(DataError, "has no examples for qnli dev", "qnli", "dev", str(tmp_path))


def test_wrong_header(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    raises_one_line(DataError, r"train\.tsv line 1: expected header 'sentence<TAB>label'",
                    "sst2", "train", str(tmp_path))


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "subset_powerfulpromptft" / "train.json"
    write(path, '{"0": {"text_a": "q", "text_b": "s", "label": "entailment"},\n "1": }')
    raises_one_line(DataError, r"train\.json line 2: invalid JSON", "qnli", "train", str(tmp_path))
    write(path, json.dumps({"0": {"text_a": "q", "label": "entailment"}}))
    raises_one_line(DataError, r"train\.json entry '0': expected an object with string fields",
                    "qnli", "train", str(tmp_path))
    write(path, json.dumps({"0": {"text_a": "q", "text_b": "s", "label": "maybe"}}))
    raises_one_line(DataError, r"train\.json entry '0': unknown label 'maybe'",
                    "qnli", "train", str(tmp_path))


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    raises_one_line(DataError, r"train\.tsv is not valid UTF-8", "sst2", "train", str(tmp_path))


def test_bad_task_or_split(tmp_path: Path) -> None:
    raises_one_line(ConfigError, "unknown task 'sst3'; choose one of: sst2", "sst3", "train", None)
    raises_one_line(ConfigError, "'synthetic' is not a GLUE task", "synthetic", "train", None)
    raises_one_line(ConfigError, r"split must be one of \('train', 'dev'\) \(got 'test'\)",
                    "sst2", "test", str(tmp_path))


def test_hub_offline_says_set_data_dir(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    code = "from dpbench.data.glue import load_glue; load_glue('rte', 'dev', None)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("hub loader did not fail fast offline")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0
    assert last.startswith("dpbench.errors.DataError: could not load rte from the Hugging Face hub")
    assert "set task.data_dir" in last


# --- a tuning split held out of the training set ----------------------------------------------

def test_holdout_split_is_carved_from_train_and_dev_is_never_read(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from dpbench.pipeline import data_record, load_task

    rows = "".join(f"sentence {i}\t{i % 2}\n" for i in range(40))
    write(tmp_path / "train.tsv", "sentence\tlabel\n" + rows)
    task = OmegaConf.create({"name": "sst2", "data_dir": str(tmp_path), "holdout_examples": 10, "holdout_seed": 3})
    _, train, held = load_task(task, seed=0)  # no dev.tsv: holding out must not need it
    assert (len(train), len(held)) == (30, 10)
    assert not set(train.text_a) & set(held.text_a)
    assert sorted(train.text_a + held.text_a) == sorted(f"sentence {i}" for i in range(40))
    _, _, again = load_task(task, seed=7)  # the run seed does not move the split
    assert again.text_a == held.text_a
    assert data_record(task, train, held)["eval_split"] == "holdout"
    with pytest.raises(ConfigError, match="task.holdout_examples"):
        load_task(OmegaConf.merge(task, {"holdout_examples": 40}), seed=0)
