"""The training reports: benchmark, optimization (sweeps), resume validation, profile, comms.
Each reads run directories only (`runs.discover`) and writes reports/<prefix>_<kind>.md, its
JSON twin and PNG plots under reports/img/."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .render import Report, gib, num, pct, run_sources, table
from .runs import (ReportError, RunRecord, discover, explain_groups, group_by_protocol,
                   load_run)

FAMILIES = {"native": ("single", "ddp", "fsdp"), "deepspeed": ("zero1", "zero2", "zero3", "zero3_offload")}
FAMILY_TITLES = {"native": "Native PyTorch (single GPU, DDP, FSDP)", "deepspeed": "DeepSpeed (ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3 + offload)"}


# ----------------------------------------------------------------------------- shared pieces

def _tps(r: RunRecord) -> float | None:
    return r.get("tokens_per_s_steady") or r.get("tokens_per_s_mean")


def predicted(r: RunRecord) -> dict:
    """The pre-flight estimate recorded in the summary ({predicted: {...}} or the estimate itself)."""
    est = r.get("estimate") or {}
    if isinstance(est, dict) and isinstance(est.get("predicted"), dict):
        return est["predicted"]
    return est if isinstance(est, dict) else {}


def checkpoint_stats(r: RunRecord) -> tuple[float | None, int | None, int]:
    cks = [c for c in (r.get("checkpoints") or []) if isinstance(c, dict)]
    if not cks:
        return None, None, 0
    secs = [float(c["seconds"]) for c in cks if c.get("seconds") is not None]
    sizes = [int(c["bytes"]) for c in cks if c.get("bytes") is not None]
    return (sum(secs) / len(secs) if secs else None), (sizes[-1] if sizes else None), len(cks)


def ratio(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b) if a is not None and b else None
    except (TypeError, ValueError):
        return None


def protocol_line(runs: list[RunRecord]) -> str:
    p = runs[0].protocol
    return (f"Protocol: data `{p['data_fingerprint']}`, sequence length {num(p['seq_len'])}, "
            f"{num(p['tokens_per_step'])} tokens per optimizer step.")


def grouped(runs: list[RunRecord], allow_mixed: bool, rep: Report, what: str) -> list[list[RunRecord]]:
    """Comparable groups; notes in the report why runs were not put side by side (or were, when
    allowed)."""
    groups = group_by_protocol(runs)
    diffs = explain_groups(groups)
    if not diffs:
        return groups
    if allow_mixed:
        rep.add(f"> **Mixed protocols** in {what} (compared anyway: --allow-mixed-protocols):",
                *[f"> - {d}" for d in diffs], "")
        rep.data.setdefault("mixed_protocols", []).extend(diffs)
        return [runs]
    rep.add(f"> In {what}, runs with different protocols are not compared in one table; "
            f"{len(groups)} comparable groups follow. Why:", *[f"> - {d}" for d in diffs], "")
    rep.data.setdefault("protocol_splits", []).extend(diffs)
    return groups


def _loss_plot(runs: list[RunRecord], title: str):
    def draw(ax):
        drew = False
        for r in runs:
            pts = [(m["step"], m["loss"]) for m in r.metrics if m.get("loss") is not None]
            if pts:
                ax.plot(*zip(*pts), label=f"{r.name} ({r.backend})", linewidth=1.2)
                drew = True
        if not drew:
            return False
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return draw


def _bar_plot(labels: list[str], series: dict[str, list], ylabel: str, title: str):
    def draw(ax):
        import numpy as np
        if not labels:
            return False
        x = np.arange(len(labels))
        w = 0.8 / max(len(series), 1)
        for i, (name, vals) in enumerate(series.items()):
            ax.bar(x + i * w - 0.4 + w / 2, [v if v is not None else 0 for v in vals], w, label=name)
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    return draw


# ----------------------------------------------------------------------------- benchmark

def gpu_allocator_measure(r: RunRecord) -> bool:
    """The estimate predicts the CUDA allocator's peak; a CPU run's RSS is not comparable."""
    m = str(r.get("peak_memory_measure") or "").lower()
    return "max_memory_allocated" in m or (not m and r.get("device.type") == "cuda")


def benchmark_row(r: RunRecord) -> dict:
    est = predicted(r)
    ck_s, ck_b, ck_n = checkpoint_stats(r)
    tps = _tps(r)
    comparable = gpu_allocator_measure(r)
    return {
        "run": r.name, "backend": r.backend, "world_size": r.world_size,
        "tokens_per_s_mean": r.get("tokens_per_s_mean"), "tokens_per_s_steady": r.get("tokens_per_s_steady"),
        "tokens_per_s_per_gpu": tps / r.world_size if tps else None,
        "mfu_mean": r.get("mfu_mean"), "mfu_steady": r.get("mfu_steady"),
        "peak_memory_bytes": r.get("peak_memory_bytes"), "peak_memory_measure": r.get("peak_memory_measure"),
        "predicted_peak_memory_bytes": est.get("peak_memory_bytes"),
        "memory_measured_over_predicted": ratio(r.get("peak_memory_bytes"), est.get("peak_memory_bytes"))
        if comparable else None,
        "steps": r.get("steps"), "predicted_steps": est.get("steps"),
        "checkpoint_save_s_mean": ck_s, "checkpoint_bytes": ck_b, "checkpoints": ck_n,
        "final_loss": r.get("final_loss"), "protocol": r.protocol,
    }


def scaling(rows: list[dict]) -> list[dict]:
    """ddp tokens/s / (world_size x single tokens/s), within one protocol group."""
    singles = [x for x in rows if x["backend"] == "single" and x["world_size"] == 1]
    out = []
    for x in rows:
        if x["backend"] == "single" or x["world_size"] < 2 or not singles:
            continue
        for s in singles:
            a = x["tokens_per_s_steady"] or x["tokens_per_s_mean"]
            b = s["tokens_per_s_steady"] or s["tokens_per_s_mean"]
            if a and b:
                out.append({"run": x["run"], "backend": x["backend"], "world_size": x["world_size"],
                            "baseline": s["run"], "tokens_per_s": a, "baseline_tokens_per_s": b,
                            "efficiency": a / (x["world_size"] * b)})
    return out


def build_benchmark(runs: list[RunRecord], out_dir="reports", prefix="cpt", allow_mixed=False,
                    command="") -> tuple[Path, Path]:
    if not runs:
        raise ReportError("benchmark: no finished runs of track bench")
    rep = Report(f"{prefix}_benchmark", f"{prefix.replace('_', ' ').upper()} benchmark: backends side by side", out_dir)
    rep.add("Throughput, MFU, memory and checkpoint cost per backend, read from each run's "
            "`train_summary.json` and `metrics.jsonl`. Tokens/s *steady* leaves out the first "
            "`metrics.steady_skip_steps` steps. *Predicted* columns are the pre-flight estimate "
            "(`forgelab.train.estimator`) recorded in the same summary.", "")
    rep.data["families"] = {}
    for fam, backends in FAMILIES.items():
        fam_runs = [r for r in runs if r.backend in backends]
        rep.add(f"## {FAMILY_TITLES[fam]}", "")
        if not fam_runs:
            rep.add(f"No runs of {', '.join(backends)}.", "")
            continue
        fam_data = []
        for gi, g in enumerate(grouped(fam_runs, allow_mixed, rep, f"the {fam} family")):
            rows = [benchmark_row(r) for r in g]
            if len({tuple(r.protocol.values()) for r in g}) == 1:
                rep.add(protocol_line(g), "")
            rep.add(table(
                ["run", "backend", "ranks", "tokens/s mean", "tokens/s steady", "tokens/s/GPU", "MFU mean",
                 "MFU steady", "peak mem GiB", "predicted GiB", "measured/pred.", "steps", "pred. steps",
                 "ckpt save s", "ckpt MiB"],
                [[x["run"], x["backend"], x["world_size"], num(x["tokens_per_s_mean"], 0),
                  num(x["tokens_per_s_steady"], 0), num(x["tokens_per_s_per_gpu"], 0), pct(x["mfu_mean"]),
                  pct(x["mfu_steady"]), gib(x["peak_memory_bytes"]), gib(x["predicted_peak_memory_bytes"]),
                  num(x["memory_measured_over_predicted"], 2), num(x["steps"]), num(x["predicted_steps"]),
                  num(x["checkpoint_save_s_mean"], 2),
                  num(x["checkpoint_bytes"] / 2**20 if x["checkpoint_bytes"] else None, 1)] for x in rows]), "")
            measures = sorted({str(x["peak_memory_measure"]) for x in rows if x["peak_memory_measure"]})
            if measures:
                rep.add(f"Peak memory measured as: {', '.join(measures)}.", "")
            if any(x["memory_measured_over_predicted"] is None and x["predicted_peak_memory_bytes"]
                   for x in rows):
                rep.add("The prediction is GPU allocator memory; runs measured otherwise (CPU RSS) "
                        "get no measured/predicted ratio.", "")
            eff = scaling(rows)
            if eff:
                rep.add("Scaling efficiency = tokens/s of N ranks / (N x tokens/s of the single-GPU run), "
                        "same protocol:", "")
                rep.add(table(["run", "ranks", "tokens/s", "single run", "single tokens/s", "efficiency"],
                              [[e["run"], e["world_size"], num(e["tokens_per_s"], 0), e["baseline"],
                                num(e["baseline_tokens_per_s"], 0), pct(e["efficiency"])] for e in eff]), "")
            stem = f"{fam}_g{gi}"
            labels = [x["run"] for x in rows]
            rep.plot(f"{stem}_throughput", _bar_plot(labels, {
                "mean": [x["tokens_per_s_mean"] for x in rows],
                "steady": [x["tokens_per_s_steady"] for x in rows]}, "tokens/s", f"{fam}: throughput"),
                f"{fam} throughput")
            rep.plot(f"{stem}_memory", _bar_plot(labels, {
                "measured": [x["peak_memory_bytes"] / 2**30 if x["peak_memory_bytes"] else None for x in rows],
                "predicted": [x["predicted_peak_memory_bytes"] / 2**30 if x["predicted_peak_memory_bytes"]
                              else None for x in rows]}, "GiB", f"{fam}: peak memory"), f"{fam} peak memory")
            rep.plot(f"{stem}_loss", _loss_plot(g, f"{fam}: loss"), f"{fam} loss curves")
            fam_data.append({"protocol": g[0].protocol, "rows": rows, "scaling": eff})
        rep.data["families"][fam] = fam_data
    rep.add("## Runs", "")
    rep.add(*run_sources(runs, rep.out_dir))
    rep.data["runs"] = [str(r.dir) for r in runs]
    return rep.write(command)


# ----------------------------------------------------------------------------- optimization

IGNORED_CONFIG = ("run_name", "sweep.", "checkpoint.overwrite", "track")


def _flat(d: Any, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(d) if isinstance(d, (list, dict)) else d
    return out


def differing_knobs(runs: list[RunRecord]) -> list[str]:
    """Config keys (config.yaml, flattened) whose values differ between the runs."""
    flats = [_flat(r.config) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    out = []
    for k in keys:
        if any(k == i or k.startswith(i) for i in IGNORED_CONFIG):
            continue
        if len({repr(f.get(k)) for f in flats}) > 1:
            out.append(k)
    return out


METRICS = {"tokens_per_s_steady": max, "mfu_steady": max, "final_loss": min, "peak_memory_bytes": min}


def build_optimization(runs: list[RunRecord], out_dir="reports", prefix="cpt", allow_mixed=False,
                       metric: str = "tokens_per_s_steady", command="") -> tuple[Path, Path]:
    if metric not in METRICS:
        raise ReportError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    if not runs:
        raise ReportError("optimization: no finished sweep runs of track optimize")
    sweeps: dict[str, list[RunRecord]] = {}
    for r in runs:
        name = r.get("plan.sweep.name") or (r.name.rsplit("--", 1)[0] if "--" in r.name else r.name)
        sweeps.setdefault(name, []).append(r)
    rep = Report(f"{prefix}_optimization", f"{prefix.upper()} optimization sweeps", out_dir)
    pick = METRICS[metric]
    rep.add(f"Each sweep's runs side by side with the settings that differ between them "
            f"(from each run's `config.yaml`). Best = {'highest' if pick is max else 'lowest'} "
            f"`{metric}` within a comparable group, marked **best**.", "")
    rep.data["sweeps"] = {}
    for name, members in sweeps.items():
        members.sort(key=lambda r: r.name)
        rep.add(f"## Sweep `{name}`", "")
        sweep_data = []
        for gi, g in enumerate(grouped(members, allow_mixed, rep, f"sweep {name}")):
            knobs = differing_knobs(g)
            rows = []
            vals = [(r.get(metric), r) for r in g if r.get(metric) is not None]
            best = pick(vals, key=lambda t: t[0])[1] if vals else None
            for r in g:
                flat = _flat(r.config)
                rows.append({"run": r.name, "best": r is best, **{k: flat.get(k) for k in knobs},
                             "tokens_per_s_steady": r.get("tokens_per_s_steady"), "mfu_steady": r.get("mfu_steady"),
                             "peak_memory_bytes": r.get("peak_memory_bytes"), "final_loss": r.get("final_loss"),
                             "steps": r.get("steps")})
            if len({tuple(r.protocol.values()) for r in g}) == 1:
                rep.add(protocol_line(g), "")
            rep.add(table(["run", *knobs, "tokens/s steady", "MFU steady", "peak mem GiB", "final loss", "steps"],
                          [[("**best** " if x["best"] else "") + x["run"], *[num(x[k], 3) for k in knobs],
                            num(x["tokens_per_s_steady"], 0), pct(x["mfu_steady"]), gib(x["peak_memory_bytes"]),
                            num(x["final_loss"], 4), num(x["steps"])] for x in rows]), "")
            if best is not None and len(g) > 1:
                base = g[0]
                gain = ratio(best.get(metric), base.get(metric))
                rep.add(f"Best: `{best.name}` ({metric} {num(best.get(metric), 3)}"
                        + (f", {gain:.2f}x of `{base.name}`" if gain and best is not base else "") + ").", "")
            labels = [x["run"] for x in rows]
            rep.plot(f"{_safe(name)}_g{gi}_throughput", _bar_plot(labels, {
                "tokens/s steady": [x["tokens_per_s_steady"] for x in rows]}, "tokens/s", f"{name}: throughput"),
                f"{name} throughput")
            rep.plot(f"{_safe(name)}_g{gi}_memory", _bar_plot(labels, {
                "peak GiB": [x["peak_memory_bytes"] / 2**30 if x["peak_memory_bytes"] else None for x in rows]},
                "GiB", f"{name}: peak memory"), f"{name} peak memory")
            rep.plot(f"{_safe(name)}_g{gi}_loss", _loss_plot(g, f"{name}: loss"), f"{name} loss curves")
            sweep_data.append({"protocol": g[0].protocol, "knobs": knobs, "metric": metric,
                               "best": best.name if best else None, "rows": rows})
        rep.data["sweeps"][name] = sweep_data
    rep.add("## Runs", "")
    rep.add(*run_sources(runs, rep.out_dir))
    return rep.write(command)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


# ----------------------------------------------------------------------------- resume

def _curve_rows(rv: dict, resumed: RunRecord) -> list[dict]:
    rows = rv.get("curve")
    if rows is None and isinstance(rv.get("steps"), list):
        rows = rv["steps"]
    if rows is not None:
        return [{"step": x["step"], "reference": x.get("loss_uninterrupted", x.get("loss_reference")),
                 "resumed": x.get("loss_resumed"), "abs_diff": x.get("abs_diff")} for x in rows]
    ref = load_run(_ref_dir(rv, resumed))
    a = {m["step"]: m.get("loss") for m in ref.metrics}
    b = {m["step"]: m.get("loss") for m in resumed.metrics}
    out = []
    for s in sorted(set(a) | set(b)):
        d = abs(a[s] - b[s]) if a.get(s) is not None and b.get(s) is not None else None
        out.append({"step": s, "reference": a.get(s), "resumed": b.get(s), "abs_diff": d})
    return out


def _ref_dir(rv: dict, resumed: RunRecord) -> Path:
    ref = rv.get("uninterrupted_run") or rv.get("reference_run")
    if not ref:
        raise ReportError(f"{resumed.dir / 'resume_validation.json'}: key 'reference_run' is missing")
    p = Path(ref)
    return p if p.is_absolute() else (resumed.dir.parent / ref if "/" not in ref else p)


def build_resume(runs: list[RunRecord], out_dir="reports", prefix="cpt", command="") -> tuple[Path, Path]:
    runs = [r for r in runs if r.resume_validation]
    if not runs:
        raise ReportError("resume: no run directory holds resume_validation.json (track resume)")
    rep = Report(f"{prefix}_resume_validation", f"{prefix.upper()} resume validation", out_dir)
    rep.add("An uninterrupted run against the same run stopped at a checkpoint and resumed: the "
            "loss at every optimizer step must match (bit-identical expected on CPU fp32; within the "
            "tolerance on GPU). Read from `resume_validation.json` and both runs' `metrics.jsonl`.", "")
    rep.data["validations"] = []
    for r in runs:
        rv = r.resume_validation
        rows = _curve_rows(rv, r)
        diffs = [x["abs_diff"] for x in rows if x["abs_diff"] is not None]
        max_diff = rv.get("max_abs_diff", max(diffs) if diffs else None)
        tol = rv.get("tolerance")
        passed = rv.get("passed", max_diff is not None and tol is not None and max_diff <= tol)
        ref_name = Path(str(rv.get("uninterrupted_run") or rv.get("reference_run"))).name
        resume = r.get("resume") or {}
        stop = rv.get("stop_at") or resume.get("step") or rv.get("resumed_step")
        rep.add(f"## `{r.name}` vs `{ref_name}`", "")
        rep.add(table(["reference (uninterrupted)", "resumed", "resumed from", "at step", "steps compared",
                       "max abs loss diff", "identical", "tolerance", "device", "result"],
                      [[ref_name, r.name, f"`{rv.get('resumed_from') or resume.get('from_checkpoint') or '–'}`",
                        num(stop), num(rv.get("steps_compared", len(diffs))), num(max_diff, 3),
                        num(rv.get("identical")), num(tol, 3), rv.get("device", "–"),
                        "**passed**" if passed else "**FAILED**"]]), "")
        if rv.get("missing_steps"):
            rep.add(f"Steps missing in one of the runs: {rv['missing_steps']}", "")
        rep.add(table(["step", "loss (uninterrupted)", "loss (resumed)", "abs diff"],
                      [[x["step"], num(x["reference"], 6), num(x["resumed"], 6), num(x["abs_diff"], 3)]
                       for x in rows]), "")

        def draw(ax, rows=rows, stop=stop):
            a = [(x["step"], x["reference"]) for x in rows if x["reference"] is not None]
            b = [(x["step"], x["resumed"]) for x in rows if x["resumed"] is not None]
            if not a and not b:
                return False
            if a:
                ax.plot(*zip(*a), label="uninterrupted", linewidth=2.5, alpha=0.5)
            if b:
                ax.plot(*zip(*b), "--", marker=".", label="stage 1 + resumed stage 2", linewidth=1)
            if stop:
                ax.axvline(stop, color="gray", linestyle=":", label=f"resume at step {stop}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        rep.plot(f"{_safe(r.name)}_loss", draw, "loss curves, uninterrupted vs resumed")
        rep.data["validations"].append({"resumed_run": str(r.dir), "reference_run": ref_name, "resume_step": stop,
                                        "max_abs_diff": max_diff, "tolerance": tol, "passed": passed,
                                        "identical": rv.get("identical"), "curve": rows})
    rep.add("## Runs", "")
    rep.add(*run_sources(runs, rep.out_dir))
    return rep.write(command)


# ----------------------------------------------------------------------------- profile

SPLIT = ("data", "forward", "backward", "optimizer")


def build_profile(runs: list[RunRecord], out_dir="reports", prefix="cpt", allow_mixed=False,
                  command="") -> tuple[Path, Path]:
    runs = [r for r in runs if r.profile]
    if not runs:
        raise ReportError("profile: no run directory holds profile_summary.json (track profile)")
    rep = Report(f"{prefix}_profile", f"{prefix.upper()} profile: where a training step goes", out_dir)
    rep.add("Time split per optimizer step (rank 0, ms), model FLOPs per step and MFU, from each "
            "run's `profile_summary.json` and `train_summary.json`. Traces (Chrome / Perfetto) are "
            "listed per run.", "")
    rep.data["groups"] = []
    for gi, g in enumerate(grouped(runs, allow_mixed, rep, "the profiled runs")):
        rows = []
        for r in g:
            ts = r.profile.get("time_split_ms") or {}
            total = sum(float(ts.get(k) or 0) for k in SPLIT)
            rows.append({"run": r.name, "backend": r.backend, "world_size": r.world_size,
                         **{f"{k}_ms": ts.get(k) for k in SPLIT}, "step_ms": total or None,
                         "flops_per_step": r.profile.get("flops_per_step"),
                         "tokens_per_s": _tps(r), "mfu": r.get("mfu_steady") or r.get("mfu_mean"),
                         "trace_files": r.profile.get("trace_files") or []})
        if len({tuple(r.protocol.values()) for r in g}) == 1:
            rep.add(protocol_line(g), "")
        rep.add(table(["run", "backend", "ranks", *[f"{k} ms" for k in SPLIT], "step ms", "FLOPs/step",
                       "tokens/s", "MFU"],
                      [[x["run"], x["backend"], x["world_size"],
                        *[f"{num(x[k + '_ms'], 1)} ({pct(ratio(x[k + '_ms'], x['step_ms']))})" for k in SPLIT],
                        num(x["step_ms"], 1), num(x["flops_per_step"] and float(x["flops_per_step"]), 0),
                        num(x["tokens_per_s"], 0), pct(x["mfu"])] for x in rows]), "")

        def draw(ax, rows=rows):
            import numpy as np
            if not rows:
                return False
            x = np.arange(len(rows))
            bottom = np.zeros(len(rows))
            for k in SPLIT:
                vals = np.array([float(r[k + "_ms"] or 0) for r in rows])
                ax.bar(x, vals, 0.6, bottom=bottom, label=k)
                bottom += vals
            ax.set_xticks(x, [r["run"] for r in rows], rotation=20, ha="right", fontsize=7)
            ax.set_ylabel("ms per optimizer step")
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        rep.plot(f"g{gi}_time_split", draw, "time split per step")
        for x in rows:
            if x["trace_files"]:
                rep.add(f"Traces of `{x['run']}`: " + ", ".join(f"`{t}`" for t in x["trace_files"]), "")
        ds_runs = [r for r in g if r.profile.get("deepspeed")]
        if ds_runs:  # profile.deepspeed: DeepSpeed's flops profiler and comms logger beside the lab's numbers
            rep.add("DeepSpeed's own profilers beside the lab's numbers (`profile.deepspeed: true`): FLOPs of one "
                    "optimizer step per rank (DeepSpeed: its forward count x 3 x accumulation), and bytes per step "
                    "of each collective (DeepSpeed's communication logger over the run vs the lab's trace of the "
                    "profiled steps).", "")
            rep.add(table(["run", "lab FLOPs/step/rank", "DeepSpeed FLOPs/step/rank", "ratio"],
                          [[r.name, num(r.profile.get("flops_per_step_per_rank"), 0),
                            num(r.profile["deepspeed"].get("flops_per_step_per_rank_deepspeed"), 0),
                            num(r.profile["deepspeed"].get("flops_ratio_deepspeed_to_lab"), 4)] for r in ds_runs]), "")
            rep.add(table(["run", "op", "DeepSpeed MiB/step", "trace MiB/step", "ratio"],
                          [[r.name, c["op"], num(c["bytes_per_step_deepspeed"] / 2**20, 3),
                            num(c["bytes_per_step_trace"] / 2**20 if c["bytes_per_step_trace"] is not None else None, 3),
                            num(c["ratio"], 4)]
                           for r in ds_runs for c in r.profile["deepspeed"].get("comms_beside_trace") or []]), "")
        rep.data["groups"].append({"protocol": g[0].protocol, "rows": rows})
    rep.add("## Runs", "")
    rep.add(*run_sources(runs, rep.out_dir))
    return rep.write(command)


# ----------------------------------------------------------------------------- comms

def build_comms(runs: list[RunRecord], out_dir="reports", prefix="cpt", allow_mixed=False,
                command="") -> tuple[Path, Path]:
    runs = [r for r in runs if r.profile and r.profile.get("comms") is not None]
    if not runs:
        raise ReportError("comms: no run directory holds profile_summary.json with 'comms' (track profile)")
    rep = Report(f"{prefix}_comms", f"{prefix.upper()} communication per backend", out_dir)
    rep.add("Collective operations per optimizer step (rank 0) from the profiler traces summarized in "
            "`profile_summary.json`: calls, bytes and time. Bandwidth = bytes / time.", "")
    rep.data["groups"] = []
    for gi, g in enumerate(grouped(runs, allow_mixed, rep, "the profiled runs")):
        if len({tuple(r.protocol.values()) for r in g}) == 1:
            rep.add(protocol_line(g), "")
        rows = []
        for r in g:
            ops = r.profile.get("comms") or []
            if not ops:
                rows.append({"run": r.name, "backend": r.backend, "world_size": r.world_size, "op": "(none)",
                             "calls_per_step": 0, "bytes_per_step": 0, "ms_per_step": 0.0})
            for o in ops:
                rows.append({"run": r.name, "backend": r.backend, "world_size": r.world_size, "op": o.get("op"),
                             "calls_per_step": o.get("calls_per_step"), "bytes_per_step": o.get("bytes_per_step"),
                             "ms_per_step": o.get("ms_per_step")})
        rep.add(table(["run", "backend", "ranks", "op", "calls/step", "MiB/step", "ms/step", "GB/s"],
                      [[x["run"], x["backend"], x["world_size"], x["op"], num(x["calls_per_step"], 1),
                        num(x["bytes_per_step"] / 2**20 if x["bytes_per_step"] is not None else None, 2),
                        num(x["ms_per_step"], 2),
                        num(ratio(x["bytes_per_step"], x["ms_per_step"]) and
                            ratio(x["bytes_per_step"], x["ms_per_step"]) / 1e6, 2)] for x in rows]), "")
        totals = {}
        for x in rows:
            t = totals.setdefault(x["run"], {"backend": x["backend"], "bytes": 0.0, "ms": 0.0})
            t["bytes"] += float(x["bytes_per_step"] or 0)
            t["ms"] += float(x["ms_per_step"] or 0)
        rep.add(table(["run", "backend", "MiB/step (all ops)", "ms/step (all ops)"],
                      [[k, v["backend"], num(v["bytes"] / 2**20, 2), num(v["ms"], 2)] for k, v in totals.items()]),
                "")
        ops = sorted({x["op"] for x in rows if x["op"] != "(none)"})
        labels = [r.name for r in g]
        series = {op: [sum(float(x["bytes_per_step"] or 0) for x in rows if x["run"] == n and x["op"] == op) / 2**20
                       for n in labels] for op in ops}
        rep.plot(f"g{gi}_bytes", _bar_plot(labels, series, "MiB per step", "collective volume per step"),
                 "collective volume per step")
        series_t = {op: [sum(float(x["ms_per_step"] or 0) for x in rows if x["run"] == n and x["op"] == op)
                         for n in labels] for op in ops}
        rep.plot(f"g{gi}_time", _bar_plot(labels, series_t, "ms per step", "collective time per step"),
                 "collective time per step")
        rep.data["groups"].append({"protocol": g[0].protocol, "rows": rows, "totals": totals})
    rep.add("## Runs", "")
    rep.add(*run_sources(runs, rep.out_dir))
    return rep.write(command)


# ----------------------------------------------------------------------------- all

KINDS = ("benchmark", "optimization", "resume", "profile", "comms")
DEFAULT_TRACKS = {"benchmark": ("bench",), "optimization": ("optimize",), "resume": ("resume",),
                  "profile": ("profile",), "comms": ("profile",)}


def build(kind: str, root="runs/train", names=None, out_dir="reports", prefix="cpt", allow_mixed=False,
          task: str | None = None, tracks: tuple[str, ...] | None = None, metric="tokens_per_s_steady",
          command="") -> tuple[Path, Path]:
    """Build one report from the runs under root (default tracks per kind, or named runs)."""
    if kind not in KINDS:
        raise ReportError(f"unknown report {kind!r}; one of {', '.join(KINDS)}")
    runs = discover(root, names, tracks if tracks is not None else DEFAULT_TRACKS[kind])
    if not runs:
        raise ReportError(f"{kind}: no finished runs of track(s) "
                          f"{', '.join(tracks or DEFAULT_TRACKS[kind])} under {root}")
    if task:
        runs = [r for r in runs if r.get("task") == task]
    if names and kind in ("benchmark", "optimization") and not allow_mixed:
        # runs named explicitly are one comparison: refuse mixed protocols outright
        from .runs import check_comparable
        check_comparable(runs, allow_mixed)
    if kind == "benchmark":
        return build_benchmark(runs, out_dir, prefix, allow_mixed, command)
    if kind == "optimization":
        return build_optimization(runs, out_dir, prefix, allow_mixed, metric, command)
    if kind == "resume":
        return build_resume(runs, out_dir, prefix, command)
    if kind == "profile":
        return build_profile(runs, out_dir, prefix, allow_mixed, command)
    return build_comms(runs, out_dir, prefix, allow_mixed, command)


def build_all(root="runs/train", out_dir="reports", prefix="cpt", allow_mixed=False, task=None,
              command="", log=print) -> dict:
    """Every report that has runs; the others are listed as skipped with the reason."""
    done, skipped = {}, {}
    for kind in KINDS:
        try:
            md, _ = build(kind, root, None, out_dir, prefix, allow_mixed, task, command=command)
            done[kind] = str(md)
        except ReportError as e:
            skipped[kind] = str(e)
            log(f"skipped {kind}: {e}")
    return {"written": done, "skipped": skipped}
