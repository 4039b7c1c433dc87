"""Loss curves of two trees of training runs compared step by step: the check that a change
(a refactor, an upgrade of transformers or torch) leaves training where it was.

Runs are paired by their directory name under each root (runs/train/<name>/metrics.jsonl).
For each pair, every step's loss, grad norm and learning rate are compared; on CPU in fp32 the
lab's runs are deterministic, so `identical` is the expected verdict there."""
from __future__ import annotations

from pathlib import Path

from .runs import read_metrics

KEYS = ("loss", "grad_norm", "lr")


def compare_curves(a_root: str | Path, b_root: str | Path, tolerance: float = 0.0) -> dict:
    a_root, b_root = Path(a_root), Path(b_root)
    a = {p.parent.name: p for p in a_root.glob("*/metrics.jsonl")}
    b = {p.parent.name: p for p in b_root.glob("*/metrics.jsonl")}
    runs = []
    for name in sorted(set(a) & set(b)):
        ra = {r["step"]: r for r in read_metrics(a[name])}
        rb = {r["step"]: r for r in read_metrics(b[name])}
        steps = sorted(set(ra) | set(rb))
        worst = {k: 0.0 for k in KEYS}
        missing = [s for s in steps if s not in ra or s not in rb]
        for s in steps:
            if s in missing:
                continue
            for k in KEYS:
                x, y = ra[s].get(k), rb[s].get(k)
                if x is None and y is None:
                    continue
                worst[k] = max(worst[k], float("inf") if x is None or y is None else abs(x - y))
        same = not missing and all(v == 0.0 for v in worst.values())
        runs.append({"run": name, "steps": len(steps), "missing_steps": missing, "max_abs_diff": worst,
                     "identical": same, "passed": not missing and all(v <= tolerance for v in worst.values())})
    return {"a": str(a_root), "b": str(b_root), "tolerance": tolerance, "runs": runs,
            "only_in_a": sorted(set(a) - set(b)), "only_in_b": sorted(set(b) - set(a)),
            "passed": bool(runs) and all(r["passed"] for r in runs)}
