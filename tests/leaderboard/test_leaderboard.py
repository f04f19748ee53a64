"""The leaderboard verifies before it lists: fixture runs with real accountant numbers, tampered and
incomplete ones, seeds averaged, paper rows joined, HTML/PNG outputs, and the submission round trip."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpbench.leaderboard.aggregate import aggregate
from dpbench.leaderboard.baselines import PaperRow, join, load_baselines
from dpbench.leaderboard.cli import main
from dpbench.leaderboard.submission import config_hash, pack, validate
from dpbench.leaderboard.verify import load_verdicts, verify_record
from dpbench.privacy.accounting import Stage, compute_epsilon
from dpbench.results.schema import PrivacyRecord, RunRecord


def run_record(task: str = "sst2", method: str = "dp_full", model: str = "minilm", seed: int = 0,
               acc: float = 0.8, sigma: float | None = 1.0, steps: int = 50, q: float = 0.02) -> dict:
    """A results.json as a run writes it, with ε from the accountant for (σ, q, steps, δ); its config
    plans exactly that mechanism for n = 1,000 training examples (B = q·n, ``trainer.max_steps``, δ)."""
    n, b = N_TRAIN, round(q * N_TRAIN)
    if sigma is None:
        privacy = PrivacyRecord(None, None, None, None, None, [])
    else:
        stages = [Stage("train", sigma, b / n, steps)]
        eps = compute_epsilon(stages, 1e-5).upper
        privacy = PrivacyRecord(eps, round(eps + 0.5), 1e-5, "prv", 1.0, [s.to_dict() for s in stages])
    config = {"seed": seed, "task": {"name": task}, "model": {"name": model},
              "method": {"name": method, "private": sigma is not None, "trainable": "full"},
              "privacy": {"batch_size": b, "epochs": 3, "delta": 1e-5}, "trainer": {"max_steps": steps}}
    rec = RunRecord("ok", task, model, method, seed, config, {"accuracy": acc}, privacy,
                    {"trainable": 100, "total": 1000}, {"train_s": 10.0, "steps": steps}, {"peak_rss_mb": 500.0})
    return {**rec.to_dict(), "data": {"train_examples": n, "dev_examples": 100}}


N_TRAIN = 1000


def write(root: Path, name: str, record: dict) -> Path:
    path = root / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return path


def test_honest_record_is_accepted_with_recomputed_epsilon() -> None:
    rec = run_record()
    v = verify_record(rec)
    assert v.ok, v.reasons
    assert v.epsilon_recomputed == pytest.approx(rec["privacy"]["epsilon"], rel=1e-9)


def test_tampered_epsilon_is_rejected() -> None:
    rec = run_record()
    rec["privacy"]["epsilon"] *= 0.8
    v = verify_record(rec)
    assert not v.ok and "below the recomputed upper bound" in v.reasons[0]


@pytest.mark.parametrize("tamper, reason", [
    (lambda r: r["privacy"]["stages"][0].update(sample_rate=0.01), "sample rate 0.01, but privacy.batch_size"),
    (lambda r: r["data"].update(train_examples=2000), "sample rate 0.02, but privacy.batch_size"),
    (lambda r: r["privacy"]["stages"][0].update(steps=25), "log 25 steps in all, but the config plans 50"),
    (lambda r: r["timing"].update(steps=40), "more than timing.steps = 40"),
    (lambda r: r["privacy"].update(delta=1e-3), "δ = 0.001 is logged, but the config gives 1e-05"),
    (lambda r: r.pop("data"), "lacks data.train_examples"),
])
def test_mechanism_that_disagrees_with_its_config_is_rejected(tamper, reason: str) -> None:
    """Lowering the logged q or steps lowers the recomputed ε too, so only the cross-check catches it."""
    rec = run_record()
    tamper(rec)
    v = verify_record(rec)
    assert not v.ok and any(reason in r for r in v.reasons), v.reasons


def test_tampered_mechanism_is_rejected() -> None:
    """Claim kept, but the logged σ lowered: the recomputed ε rises above the claim."""
    rec = run_record()
    rec["privacy"]["stages"][0]["noise_multiplier"] = 0.7
    assert not verify_record(rec).ok


@pytest.mark.parametrize("path", [("privacy", "delta"), ("metrics",), ("timing", "steps"), ("params", "total"),
                                  ("seed",)])
def test_missing_field_is_named(path: tuple[str, ...]) -> None:
    rec = run_record()
    parent = rec
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    v = verify_record(rec)
    assert not v.ok and any(f"missing field '{'.'.join(path)}'" in r for r in v.reasons), v.reasons


def test_private_method_without_stages_and_incomplete_runs_are_rejected() -> None:
    rec = run_record()
    rec["privacy"] = {**rec["privacy"], "epsilon": None, "stages": []}
    assert "private method with no privacy stages" in verify_record(rec).reasons[0]
    rec = run_record()
    rec["privacy"]["epsilon"] = None
    assert "claims no ε" in verify_record(rec).reasons[0]
    rec = {**run_record(), "status": "running"}
    assert "not 'ok'" in verify_record(rec).reasons[0]
    assert verify_record(run_record(method="nonprivate", sigma=None)).ok


def test_seeds_are_averaged_and_ranked() -> None:
    recs = [run_record(seed=s, acc=a) for s, a in enumerate([0.80, 0.84, 0.82])]
    recs += [run_record(method="dp_bitfit", seed=s, acc=a) for s, a in enumerate([0.85, 0.87])]
    rows = aggregate((r, r["privacy"]["epsilon"]) for r in recs)
    assert len(rows) == 2
    by = {r.method: r for r in rows}
    assert by["dp_full"].n == 3 and by["dp_full"].mean == pytest.approx(0.82)
    assert by["dp_full"].std == pytest.approx(0.02) and by["dp_full"].seeds == [0, 1, 2]
    assert by["dp_bitfit"].rank == 1 and by["dp_full"].rank == 2


def test_perplexity_ranks_ascending() -> None:
    recs = []
    for method, ppl in [("distildp", 30.0), ("dp_lm_student", 45.0)]:
        r = run_record(task="yelp", method=method)
        r["metrics"] = {"student_perplexity": ppl, "teacher_perplexity": 20.0}
        recs.append(r)
    rows = aggregate((r, None) for r in recs)
    assert {r.method: r.rank for r in rows} == {"distildp": 1, "dp_lm_student": 2}
    assert rows[0].metric == "student_perplexity"


def test_paper_rows_join_on_task_model_method_epsilon() -> None:
    rec = run_record(model="roberta_large")
    rec["privacy"]["target_epsilon"] = 3.0
    other = run_record(method="dp_lora")
    rows = aggregate([(rec, None), (other, None)])
    papers = [PaperRow("sst2", "roberta_large", "dp_full", 3.0, "accuracy", 93.9, "FastDP README", unit="%"),
              PaperRow("sst2", "roberta_large", "dp_full", 8.0, "accuracy", 99.0, "elsewhere", unit="%"),
              PaperRow("qnli", "roberta_large", "dp_full", 3.0, "accuracy", 91.0, "FastDP README", unit="%")]
    unjoined = join(rows, papers)
    by = {r.method: r for r in rows}
    assert [p["fraction"] for p in by["dp_full"].paper] == [pytest.approx(0.939)]
    assert by["dp_full"].paper[0]["same_model"] and "FastDP README" in by["dp_full"].paper[0]["label"]
    assert by["dp_lora"].paper == [] and sorted(p.task for p in unjoined) == ["qnli", "sst2"]


def test_packaged_baselines_cite_sources() -> None:
    rows = load_baselines()
    assert rows and all(p.source for p in rows)
    fastdp = {p.task: p.value for p in rows if p.method == "dp_full" and p.epsilon == 3}
    assert fastdp == {"sst2": 93.9, "qnli": 91.0, "qqp": 86.8, "mnli": 86.3}


def test_cli_html_plots_and_strict(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    for s in range(2):
        for eps_sigma, method in [(1.0, "dp_full"), (2.0, "dp_full"), (1.0, "dp_bitfit")]:
            write(runs, f"{method}_{eps_sigma}_{s}", run_record(method=method, seed=s, sigma=eps_sigma,
                                                                acc=0.7 + 0.1 * s))
    write(runs, "nonprivate", run_record(method="nonprivate", sigma=None, acc=0.9))
    bad = run_record(seed=7)
    bad["privacy"]["epsilon"] /= 2
    write(runs, "tampered", bad)
    out = tmp_path / "board.html"
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs), "-o", str(out), "--strict"])
    assert exit_info.value.code == 1
    page = out.read_text()
    assert "<table class=\"sortable\">" in page and page.count("data:image/png;base64,") >= 2
    assert "tampered" in page and "below the recomputed upper bound" in page
    pngs = sorted(p.name for p in (tmp_path / "board_plots").glob("*.png"))
    assert "privacy_utility_sst2.png" in pngs and "speed_memory.png" in pngs
    assert all((tmp_path / "board_plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs), "--format", "markdown"])
    assert exit_info.value.code == 0
    md = capsys.readouterr().out
    assert md.count("| sst2 |") == 4 and "tampered" in md


def test_submit_validate_merge_round_trip(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    for s in range(3):
        write(runs, f"dp_{s}", run_record(seed=s, acc=0.8))
    sub, rejected = pack(runs, load_verdicts(runs), "team")
    assert not rejected and len(sub["runs"]) == 3
    assert validate(sub, min_seeds=3).accepted
    assert not validate(sub, min_seeds=4).accepted
    edited = copy.deepcopy(sub)
    edited["runs"][0]["record"]["privacy"]["epsilon"] = 0.01
    assert any("below the recomputed" in r for r in validate(edited).reasons)
    edited = copy.deepcopy(sub)
    edited["runs"][1]["record"]["config"]["method"]["trainable"] = "bitfit"
    assert any("config_hash" in r for r in validate(edited).reasons)
    assert sub["runs"][0]["config_hash"] == config_hash(sub["runs"][0]["record"]["config"])

    file = tmp_path / "sub.json"
    for argv, code in [(["submit", str(runs), "-o", str(file)], 0), (["validate", str(file)], 0),
                       (["merge", str(file), "--into", str(tmp_path / "board")], 0)]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == code, capsys.readouterr()
    assert "accept" in capsys.readouterr().out
    merged = load_verdicts(tmp_path / "board")
    assert len(merged) == 3 and all(v.ok for v in merged)
    with pytest.raises(SystemExit) as exit_info:  # the board reads a submission file as it reads a folder
        main([str(file), "--format", "markdown"])
    assert exit_info.value.code == 0 and "| 0.8000 ± 0.000 | 3 |" in capsys.readouterr().out
    file.write_text(json.dumps(edited))
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(file)])
    assert exit_info.value.code == 1 and "reject" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # the edited run is listed as rejected, never in the table
        main([str(file), "--format", "markdown", "--strict"])
    out = capsys.readouterr()
    assert exit_info.value.code == 1 and "| 0.8000 ± 0.000 | 2 |" in out.out and "config_hash" in out.err


def test_bad_folder_is_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dpbench.leaderboard.cli", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a folder" in proc.stderr


def test_uninformative_audit_is_shown_as_such_not_as_a_bound() -> None:
    from dpbench.leaderboard.render import COLUMNS, cells

    audit = COLUMNS.index("audit ε ≥")
    weak = run_record()
    weak["audit"] = {"epsilon_lower_bound": 1.2, "consistent": True, "informative": False}
    strong = run_record(method="dp_bitfit")
    strong["audit"] = {"epsilon_lower_bound": 0.4, "consistent": True, "informative": True}
    rows = {r.method: r for r in aggregate((rec, verify_record(rec).epsilon_recomputed) for rec in (weak, strong))}
    assert rows["dp_full"].audit_lower is None and rows["dp_full"].audit_uninformative
    assert cells(rows["dp_full"])[audit] == "uninformative"
    assert rows["dp_bitfit"].audit_lower == 0.4 and cells(rows["dp_bitfit"])[audit] == "0.40"
    assert cells(rows["dp_full"])[COLUMNS.index("tuning")] == "not accounted"  # its hyper-parameters: outside ε


def test_a_tuning_run_on_a_holdout_split_never_shares_a_row_with_dev_runs() -> None:
    dev, held = run_record(acc=0.8), run_record(acc=0.9, seed=1)
    held["data"]["eval_split"] = "holdout"
    rows = aggregate([(r, verify_record(r).epsilon_recomputed) for r in (dev, held)])
    assert sorted((r.task, r.n) for r in rows) == [("sst2", 1), ("sst2 (holdout)", 1)]


def test_relative_claims_show_the_measured_change_beside_the_papers() -> None:
    """A paper's relative claim is joined with our change against the same reference (same task, model, ε,
    dense): DPIMP at 50% vs DP full in points, DPKD's '≈ −5%', and a claim without a reference says so."""
    dense, pruned, student = (run_record(method=m, acc=a) for m, a in [("dp_full", 0.86), ("dpimp", 0.848),
                                                                       ("dpkd", 0.829)])
    pruned["compression"] = {"target_sparsity": 0.5}
    lonely = run_record(task="qnli", method="dpkd", acc=0.7)
    rows = aggregate((r, None) for r in (dense, pruned, student, lonely))
    join(rows, load_baselines())
    by = {(r.task, r.method): r for r in rows}
    dpimp = by["sst2", "dpimp"].paper[0]
    assert dpimp["measured"]["change"] == pytest.approx(-1.2) and dpimp["measured"]["reference"] == "dp_full"
    assert dpimp["short"].startswith("-1.2 pts vs dp_full, paper 'nearly full performance'")
    dpkd = by["sst2", "dpkd"].paper[0]
    assert dpkd["measured"]["change"] == pytest.approx(-3.1) and "paper ≈-5 pts" in dpkd["short"]
    assert by["qnli", "dpkd"].paper == [] and by["sst2", "dp_full"].paper == []
    claim = PaperRow("qnli", "bert_base", "dpkd", "any", "accuracy", -5, "somewhere", unit="%",
                     relative_to=("dp_full",))
    join(rows, [claim])
    assert by["qnli", "dpkd"].paper[0]["short"].startswith("no dp_full run to compare")


def test_claim_reference_prefers_the_same_trainable_set_and_lower_perplexity() -> None:
    lora, bitfit, anadp = (run_record(method=m, acc=a) for m, a in [("dp_lora", 0.80), ("dp_bitfit", 0.84),
                                                                    ("anadp", 0.81)])
    for rec, trainable in [(lora, "lora"), (bitfit, "bitfit"), (anadp, "lora")]:
        rec["config"]["method"]["trainable"] = trainable
    lm = []
    for method, ppl in [("distildp", 40.0), ("dp_lm_student", 52.0), ("dpkd_lm", 47.5)]:
        rec = run_record(task="big_patent", method=method, sigma=1.0)
        rec["metrics"] = {"student_perplexity": ppl}
        lm.append(rec)
    rows = aggregate((r, None) for r in (lora, bitfit, anadp, *lm))
    for r in rows:  # the packaged DistilDP claim is at ε = 2
        r.target_epsilon = 2.0 if r.task == "big_patent" else r.target_epsilon
    join(rows, load_baselines())
    by = {r.method: r for r in rows}
    assert by["anadp"].paper[0]["measured"]["reference"] == "dp_lora"   # not the better dp_bitfit
    assert by["anadp"].paper[0]["measured"]["change"] == pytest.approx(1.0)
    distil = by["distildp"].paper[0]["measured"]
    assert distil["reference"] == "dpkd_lm" and distil["change"] == pytest.approx(-7.5) and distil["unit"] == ""


def test_paper_numbers_are_shown_on_our_scale(tmp_path: Path, capsys) -> None:
    rec = run_record(model="roberta_large", acc=0.9)
    rec["privacy"]["target_epsilon"] = 3.0
    runs = tmp_path / "runs"
    write(runs, "a", rec)
    with pytest.raises(SystemExit):
        main([str(runs), "--format", "markdown"])
    md = capsys.readouterr().out
    assert "0.939 roberta_large [FastDP README]" in md and "93.9" not in md
