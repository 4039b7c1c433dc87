#!/usr/bin/env python3
"""Throughput and loss curves of runs against a baseline run (the FP8 runs against bf16), from
their records (train_summary.json, metrics.jsonl) under one runs root:

  python scripts/gpu/fp8_compare.py RUNS_ROOT BASE RUN... [--json OUT.json]

Per run: steady tokens/s and its ratio to the baseline, MFU as the run recorded it (the lab's
FLOP count against the bf16 peak, FP8 runs too), peak memory, and the loss curve's relative
difference to the baseline's, |loss - loss_base| / loss_base, step by step: its maximum over all
steps, over the steps after metrics.steady_skip_steps and over the second half of the run, the
steps where it passes 1%, and the difference of the mean of the last 10 losses."""
import argparse
import json
import sys
from pathlib import Path

from forgelab.runs import read_metrics, write_json


def load(root: Path, name: str) -> tuple[dict, dict]:
    d = root / name
    summary = json.loads((d / "train_summary.json").read_text()) if (d / "train_summary.json").exists() else {}
    curve = {r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl") if r.get("loss") is not None}
    return summary, curve


def compare(root: Path, base: str, names: list[str]) -> dict:
    bs, bc = load(root, base)
    skip = bs.get("steady_skip_steps") or 0
    rows = []
    for name in [base, *names]:
        s, c = load(root, name)
        steps = sorted(set(c) & set(bc))
        rel = {k: abs(c[k] - bc[k]) / bc[k] for k in steps}
        last = steps[-10:]
        last_mean, base_mean = (sum(c[k] for k in last), sum(bc[k] for k in last)) if last else (0, 0)
        tps, btps = s.get("tokens_per_s_steady"), bs.get("tokens_per_s_steady")
        rows.append({
            "run": name, "outcome": s.get("outcome"), "error": s.get("error"), "fp8": s.get("fp8"),
            "fp8_linears": s.get("fp8_linears"), "tokens_per_s_steady": tps,
            "speedup_vs_base": tps / btps if tps and btps else None, "mfu_steady": s.get("mfu_steady"),
            "peak_memory_gib": (s["peak_memory_bytes"] / 2**30) if s.get("peak_memory_bytes") else None,
            "steps_compared": len(steps), "final_loss": s.get("final_loss"),
            "max_rel_loss_diff": max(rel.values()) if rel else None,
            "max_rel_loss_diff_after_skip": max((v for k, v in rel.items() if k > skip), default=None),
            "max_rel_loss_diff_second_half": max((v for k, v in rel.items() if k > steps[-1] / 2), default=None),
            "worst_step": max(rel, key=rel.get) if rel else None,
            "steps_over_1pct": [k for k in steps if rel[k] > 0.01],
            "last10_mean_rel_diff": abs(last_mean - base_mean) / base_mean if last else None,
            "command": s.get("command")})
    return {"root": str(root), "base": base, "steady_skip_steps": skip, "runs": rows}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="runs root holding <run>/train_summary.json")
    p.add_argument("base", help="the baseline run (bf16)")
    p.add_argument("runs", nargs="+", help="the runs compared with it")
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    a = p.parse_args()
    rep = compare(a.root, a.base, a.runs)
    print("| run | fp8 | outcome | tokens/s | vs base | MFU (bf16 formula) | peak GiB | max rel loss diff "
          "(all / after skip / last-10 mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rep["runs"]:
        print(f"| {r['run']} | {r['fp8'] or 'off'} | {r['outcome']} | {fmt(r['tokens_per_s_steady'], ',.0f')} | "
              f"{fmt(r['speedup_vs_base'], '.3f')}x | {fmt(r['mfu_steady'], '.1%')} | "
              f"{fmt(r['peak_memory_gib'], '.1f')} | "
              f"{fmt(r['max_rel_loss_diff'], '.2%')} / {fmt(r['max_rel_loss_diff_after_skip'], '.2%')} / "
              f"{fmt(r['last10_mean_rel_diff'], '.2%')} |")
    if a.json:
        write_json(a.json, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
