"""``audit=true`` records a one-run audit in results.json; ``dpbench-audit`` re-audits a record."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from test_cli_runs import TINY_RUN, dpbench, read


def test_audit_flag_and_command(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = dpbench(*TINY_RUN, "method=dp_bitfit", "privacy.epsilon=2", "audit=true", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    a = r["audit"]
    assert a["consistent"] and a["claimed_epsilon"] == r["privacy"]["epsilon"]
    assert 0 <= a["epsilon_lower_bound"] <= r["privacy"]["epsilon"] and a["stages"][0]["guesses"] == 200
    check = subprocess.run([sys.executable, "-m", "dpbench.privacy.audit", str(out / "results.json")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "consistent with the claimed" in check.stdout, check.stdout + check.stderr
