"""Bad configurations and data through the `dpbench` command: each gets one line naming the fix
(``dpbench: error: ...`` last on stderr), a non-zero exit, no traceback and never an "ok" record."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_cli_runs import TINY, TINY_RUN, _tsv, dpbench, read

# case → (overrides, a substring of the error line: the option or file to fix). "{tmp}" is the test's folder
# holding the data folders made by _data_folders; runs get TINY_RUN (TINY with task=...) and method=dp_full
# unless they set an experiment, which brings its own tiny settings.
BAD_INPUTS = {
    # privacy budget
    "epsilon_zero": (["privacy.epsilon=0"], "privacy.epsilon"),
    "epsilon_negative": (["privacy.epsilon=-1"], "privacy.epsilon"),
    "delta_zero": (["privacy.delta=0"], "privacy.delta"),
    "delta_one": (["privacy.delta=1"], "privacy.delta"),
    "delta_not_below_1_over_n": (["privacy.delta=0.1"], "privacy.allow_large_delta"),
    "noise_multiplier_negative": (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    "noise_multiplier_too_small": (["privacy.noise_multiplier=0.1", "privacy.epsilon=1"], "privacy.noise_multiplier"),
    "clip_norm_zero": (["privacy.clip_norm=0"], "privacy.clip_norm"),
    "unknown_accountant": (["privacy.accountant=rdp"], "privacy.accountant"),
    "unknown_engine": (["privacy.engine=fast"], "privacy.engine"),
    "unknown_clipping": (["privacy.clipping=l2"], "privacy.clipping"),
    # batches and steps
    "batch_larger_than_dataset": (["privacy.batch_size=1000"], "privacy.batch_size"),
    "physical_batch_zero": (["privacy.physical_batch_size=0"], "privacy.physical_batch_size"),
    "physical_tokens_zero": (["privacy.physical_batch_tokens=0"], "privacy.physical_batch_tokens"),
    "group_by_length_word": (["privacy.group_by_length=sometimes"], "privacy.group_by_length"),
    "max_steps_zero": (["trainer.max_steps=0"], "trainer.max_steps"),
    "epochs_zero": (["trainer.max_steps=null", "privacy.epochs=0"], "privacy.epochs"),
    # options of the wrong type or range (every option has a rule: tests/test_config_rules.py)
    "lr_negative": (["method.optimizer.lr=-1"], "method.optimizer.lr"),
    "lr_word": (["method.optimizer.lr=fast"], "method.optimizer.lr"),
    "devices_zero": (["trainer.devices=0"], "trainer.devices"),
    "max_length_zero": (["task.max_length=0"], "task.max_length"),
    "gpu_absent": (["trainer.accelerator=gpu"], "trainer.accelerator=gpu"),
    # config names and keys
    "unknown_key": (["privacy.epsilonn=3"], "privacy.epsilonn"),
    "unknown_task": (["task=nope"], "unknown task 'nope'"),
    "unknown_model": (["model=nope"], "unknown model 'nope'"),
    "unknown_method": (["method=nope"], "unknown method 'nope'"),
    "unknown_optimizer": (["method.optimizer.name=lamb"], "method.optimizer.name"),
    "unknown_schedule": (["method.optimizer.schedule=cosine"], "method.optimizer.schedule"),
    "unknown_trainable": (["method.trainable=heads"], "method.trainable"),
    # methods
    "sparsity_one": (["method=prune_one_shot", "method.compression.sparsity=1.0"], "method.compression.sparsity"),
    "sparsity_negative": (["method=prune_one_shot", "method.compression.sparsity=-0.1"], "method.compression.sparsity"),
    "anadp_unknown_groups": (["method=anadp", "method.anadp.groups=bad"], "method.anadp.groups"),
    "dpkd_budget_split_above_one": (["method=dpkd", "method.budget_split=1.5"], "method.budget_split"),
    "dpkd_budget_split_zero": (["method=dpkd", "method.budget_split=0"], "method.budget_split"),
    "distildp_kd_lam_above_one": (["experiment=distildp_smoke", "method.kd.lam=2"], "method.kd.lam"),
    # models
    "missing_packaged_model": (["model=minilm", "model.pretrained=pkg://no_such_pkg/model"], "model.pretrained"),
    "missing_packaged_tokenizer": (["model.tokenizer=pkg://no_such_pkg/model"], "model.tokenizer"),
    "missing_local_model": (["model=minilm", "model.pretrained=/nonexistent/model"], "model.pretrained"),
    # data
    "missing_data_dir": (["task=sst2", "task.data_dir=/nonexistent/sst2"], "task.data_dir"),
    "missing_dev_file": (["task=sst2", "task.data_dir={tmp}/nodev"], "dev.tsv"),
    "malformed_tsv": (["task=sst2", "task.data_dir={tmp}/bad"], "train.tsv"),
    "empty_dataset": (["task=sst2", "task.data_dir={tmp}/empty"], "empty"),
    "label_out_of_range": (["task=sst2", "task.data_dir={tmp}/label5"], "unknown label '5'"),
    # output
    "unwritable_output_folder": (["hydra.run.dir=/proc/dpbench_out"], "hydra.run.dir"),
    "unwritable_sweep_folder": (["-m", "hydra.sweep.dir=/proc/dpbench_sweep", "seed=0,1"], "hydra.sweep.dir"),
}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _data_folders(tmp: Path) -> None:
    _tsv(tmp / "bad", "sentence\tlabel\nfine\t1\nno label column here\n")
    _tsv(tmp / "empty", "sentence\tlabel\n")
    _tsv(tmp / "label5", "sentence\tlabel\nfine\t1\nworse\t5\n")
    (_tsv(tmp / "nodev", "sentence\tlabel\nfine\t1\n") / "dev.tsv").unlink()


def test_enough_distinct_cases() -> None:
    assert len(BAD_INPUTS) >= 25 and len({tuple(o) for o, _ in BAD_INPUTS.values()}) == len(BAD_INPUTS)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_error(case: str, tmp_path: Path) -> None:
    if case == "gpu_absent" and _has_cuda():
        pytest.skip("this machine has a CUDA GPU")
    _data_folders(tmp_path)
    overrides, expected = BAD_INPUTS[case]
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    out = tmp_path / "out"
    if any(o.startswith("experiment=") for o in overrides):
        base = []
    else:
        base = [*(TINY if any(o.startswith("task=") for o in overrides) else TINY_RUN), "method=dp_full"]
    proc = dpbench(*base, f"hydra.run.dir={out}", *overrides)  # the last value of a key wins
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("dpbench: error: ") and expected in lines[-1], proc.stderr[-2000:]
    assert sum(ln.startswith("dpbench: error") for ln in lines) == 1 and "Traceback" not in proc.stderr
    if (out / "results.json").exists():
        assert read(out)["status"] != "ok"
