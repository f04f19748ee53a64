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
                         "method": ["nonprivate", "dp_full", "dp_bitfit", "dpkd", "prune_zero_shot", "prune_one_shot",
                                    "dpimp", "dpimp_structured", "dp_lora", "anadp"], "logger": ["csv", "wandb"],
                         "experiment": ["quickstart", "compression", "anadp"]}.items():
        assert {(group, n) for n in names} <= have


TEMPLATES = sorted(p.stem for p in (CONF.parent / "multirun_templates").glob("*.yaml"))


@pytest.mark.parametrize("template", TEMPLATES)
def test_multirun_template_composes_with_its_sweep(template: str) -> None:
    """``dpbench -m -cd multirun_templates -cn NAME``: the template adds the base config and a sweep."""
    with initialize_config_dir(config_dir=str(CONF.parent / "multirun_templates"), version_base="1.3"):
        cfg = compose(config_name=template, overrides=["hydra.searchpath=[file://" + str(CONF) + "]"],
                      return_hydra_config=True)
    validate(cfg)
    params = cfg.hydra.sweeper.params
    assert params and cfg.hydra.sweep.dir.startswith(f"outputs/{template}/")
    if template.endswith("_table"):  # a paper's table: its tasks from ../shared/data
        tasks = set(params["task"].split(",")) if "task" in params else {cfg.task.name}
        assert tasks in ({"sst2", "qnli", "mnli", "qqp"}, {"yelp"})
        assert cfg.task.data_dir.endswith(f"/{cfg.task.name}")
    else:  # a generic sweep over the default (or a user's) model and task, ≥ 3 seeds
        assert len(str(params["seed"]).split(",")) >= 3
    # every value of every swept axis composes (with the first value of the other axes, as in a job)
    axes = {key: str(values).split(",") for key, values in params.items()}
    with initialize_config_dir(config_dir=str(CONF.parent / "multirun_templates"), version_base="1.3"):
        for key, values in axes.items():
            for value in values:
                job = [f"{k}={value if k == key else v[0]}" for k, v in axes.items()]
                validate(compose(config_name=template,
                                 overrides=["hydra.searchpath=[file://" + str(CONF) + "]", *job]))


def test_slurm_launcher_config_composes() -> None:
    """The documented cluster launcher (``hydra/launcher=slurm_gpu``) resolves to submitit's SLURM launcher, and
    requeues a job that times out (a stopped run resumes from its checkpoint: tests/cli/test_resume.py)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.hydra.launcher.max_num_timeout >= 1 and cfg.hydra.launcher.signal_delay_s > 0
