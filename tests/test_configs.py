"""Every member of every config group composes and passes validation; experiment presets too."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF
from dpbench.config import validate

GROUPS = ["model", "task", "method", "privacy", "trainer", "logger", "experiment"]
MEMBERS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,member", MEMBERS, ids=[f"{g}={m}" for g, m in MEMBERS])
def test_member_composes(group: str, member: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={member}"])
    validate(cfg)
    if group != "experiment":
        assert cfg[group].get("name", member) == member or group in ("privacy", "trainer")


def test_required_members_exist() -> None:
    have = set(MEMBERS)
    for group, names in {"model": ["minilm", "bert_base", "roberta_base", "distilbert", "tiny_bert", "tiny_roberta",
                                   "tiny_gpt2"],
                         "task": ["sst2", "qnli", "qqp", "mnli", "cola", "mrpc", "rte", "synthetic", "synthetic_pair"],
                         "method": ["nonprivate", "dp_full", "dp_bitfit"], "logger": ["csv", "wandb"],
                         "experiment": ["quickstart"]}.items():
        assert {(group, n) for n in names} <= have
