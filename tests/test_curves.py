"""scripts/compare_curves.py: two trees of runs are paired by name and compared step by step."""
from __future__ import annotations

import json
import subprocess
import sys

from forgelab.report.curves import compare_curves
from forgelab.runs import PROJECT_ROOT


def _run(root, name, losses, torn=False):
    d = root / name
    d.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "loss": x, "grad_norm": 1.0, "lr": 1e-4}) for i, x in enumerate(losses)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"step": 9, "lo' if torn else ""))


def test_identical_curves_pass_and_a_changed_step_fails(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "r1", [2.0, 1.5, 1.25])
    _run(b, "r1", [2.0, 1.5, 1.25], torn=True)  # a torn last line (a kill mid-append) is not a step
    _run(a, "r2", [3.0, 2.0])
    _run(b, "r2", [3.0, 2.0 + 1e-6])
    _run(a, "only_a", [1.0])
    rep = compare_curves(a, b)
    by = {r["run"]: r for r in rep["runs"]}
    assert by["r1"]["identical"] and by["r1"]["passed"] and by["r1"]["steps"] == 3
    assert not by["r2"]["passed"] and abs(by["r2"]["max_abs_diff"]["loss"] - 1e-6) < 1e-12
    assert rep["only_in_a"] == ["only_a"] and not rep["passed"]
    assert compare_curves(a, b, tolerance=1e-5)["passed"]
    r = subprocess.run([sys.executable, "scripts/compare_curves.py", str(a), str(b)], cwd=PROJECT_ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "DIFFERS" in r.stdout and "only in" in r.stdout
