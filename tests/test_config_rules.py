"""Every option in conf/ that takes a number, a flag or a name has a rule (dpbench.config.RULES), and each
rule refuses a wrong type, an out-of-range value and a null where none is allowed, naming the option."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from conftest import CONF
from dpbench.config import RULES, validate
from dpbench.errors import ConfigError

# Options checked elsewhere (the privacy budget, in validate's own lines) or that hold names, paths or lists
# whose check is where they are used (a missing file, an unknown trainable set, a layer index).
NOT_RULED = {"privacy.epsilon", "privacy.delta", "privacy.noise_multiplier", "privacy.clip_norm", "privacy.epochs",
             "data_root", "logger.name", "logger.project", "logger.entity", "logger.mode", "logger.tags",
             "method.name", "method.kind", "method.pipeline", "method.trainable", "method.lora.target_modules",
             "method.step_fractions", "method.compression.step_fractions", "method.student.layers",
             "model.name", "model.family", "model.pretrained", "model.tokenizer", "model.tokenizer_kind",
             "model.gguf_file", "model.config", "task.name", "task.kind", "task.data_dir", "task.codes",
             "task.train_file", "task.eval_file", "method.student.repair.cache_dir",
             "method.student.repair.public.data_dir", "method.teacher_cache_dir",
             "method.student.repair.public.mix"}  # mix: a {task: share} map, checked where it is read (public_corpus)


def _configs() -> list:
    methods = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    tasks = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    models = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    out = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for i, method in enumerate(methods):
            out.append(compose("config", overrides=[f"method={method}", f"task={tasks[i % len(tasks)]}",
                                                    f"model={models[i % len(models)]}"]))
        out += [compose("config", overrides=[f"task={t}"]) for t in tasks]
        out += [compose("config", overrides=[f"model={m}", "logger=wandb"]) for m in models]
    return out


CONFIGS = _configs()


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).startswith("model.config"):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_every_option_has_a_rule() -> None:
    leaves = {}
    for cfg in CONFIGS:
        leaves.update(_leaves(OmegaConf.to_container(cfg, resolve=False)))
    unruled = sorted(k for k in leaves if k not in RULES and k not in NOT_RULED)
    assert not unruled, f"options without a rule in dpbench.config.RULES: {unruled}"
    assert all(cfg is not None for cfg in CONFIGS)
    for cfg in CONFIGS:  # and every shipped config passes its rules
        validate(cfg)


def _with_key(key: str):
    """A shipped config with the option, or with its parent (an option users may add, e.g. with ``+``)."""
    for path in (key, key.rpartition(".")[0]):
        for cfg in CONFIGS:
            if OmegaConf.select(cfg, path, default=KeyError) is not KeyError:
                return cfg.copy()
    raise AssertionError(f"no shipped config has {key} or its parent: drop its rule")


def _bad_values(key: str) -> list:
    rule = RULES[key]
    if rule.kind is bool:
        bad = ["sometimes", 1]
    elif rule.kind is str:
        bad = ["no_such_name", 3]
    elif rule.kind is int:
        lo = int(rule.words.split(">= ")[1].split()[0])
        bad = [lo - 1, "fast", 1.5]
    else:
        bad = [-1e9, "fast", float("nan")]
    return bad + ([] if rule.nullable else [None])


@pytest.mark.parametrize("key", sorted(RULES))
def test_rule_refuses_bad_values_naming_the_option(key: str) -> None:
    base = _with_key(key)
    for bad in _bad_values(key):
        cfg = base.copy()
        with open_dict(cfg):
            OmegaConf.update(cfg, key, bad, force_add=True)
        with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')} must be .*set e.g."):
            validate(cfg)
