"""reports/gpu_performance.md: the GPU performance targets, each answered by named training runs
(their train_summary.json and metrics.jsonl), the levers tried with their measured effect, the
packing check run on the GPU and the memory estimator's record.

Which run answers which target is written down in a spec (configs/report/gpu_performance.yaml),
so the report states its evidence and can be rebuilt from the run directories at any time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..runs import project_path, read_json
from .builders import _bar_plot, _loss_plot
from .render import Report, gib, num, pct, table
from .runs import RunRecord, ReportError, discover, protocol_differences

MFU_FORMULA = ("MFU = tokens/s x (6 x (non-embedding params + LM-head params) + 12 x layers x attention width x "
               "sequence length) / 989e12 FLOP/s (dense bf16 of the H100 and the H200, the same chip). For LoRA the weight gradients of frozen "
               "weights are not computed: 4 x (non-embedding + LM-head) + 6 x LoRA params + 12 x L x A x span, "
               "where span is the mean attention span of a packed sample (sum len^2 / sum len).")


def _run(runs: dict[str, RunRecord], name: str | None, what: str) -> RunRecord | None:
    if not name:
        return None
    if name not in runs:
        raise ReportError(f"spec: {what} names run '{name}', which has no train_summary.json")
    return runs[name]


def loss_agreement(a: RunRecord, b: RunRecord) -> dict:
    """Per-step loss of two runs of one protocol: the largest relative difference."""
    la = {m["step"]: m["loss"] for m in a.metrics if m.get("loss") is not None}
    lb = {m["step"]: m["loss"] for m in b.metrics if m.get("loss") is not None}
    steps = sorted(set(la) & set(lb))
    rel = [abs(la[s] - lb[s]) / abs(la[s]) for s in steps if la[s]]
    return {"steps": len(steps), "max_rel_diff": max(rel) if rel else None,
            "final_loss": [la.get(steps[-1]) if steps else None, lb.get(steps[-1]) if steps else None]}


def _speed_row(r: RunRecord) -> list[Any]:
    err = r.get("error")
    tps = f"failed: {str(err).split('.')[0]}" if err else num(r.get("tokens_per_s_steady"), 0)
    return [r.name, tps, pct(r.get("mfu_steady")), gib(r.get("peak_memory_bytes")),
            num(r.get("micro_batch_size")), num(r.get("grad_accum")),
            "on" if r.get("gradient_checkpointing") else "off",
            (r.get("compile_scope") or "model") if r.get("torch_compile") else "off",
            num(r.get("attn_implementation")), num(r.get("sdpa_backend")), "yes" if r.get("liger_kernel") else "no",
            num(r.get("final_loss"), 3)]


SPEED_HEADERS = ["run", "tokens/s (steady)", "MFU", "peak GiB", "micro batch", "accum", "checkpointing",
                 "compile", "attention", "SDPA backend", "Liger", "final loss"]


def build_gpu_performance(spec_path: str | Path, root: str | Path | None = None, out_dir: str | Path = "reports",
                          command: str = "") -> tuple[Path, Path]:
    """root: the run dirs (default: the spec's runs_root, else runs/train)."""
    spec_path = project_path(spec_path)
    try:
        spec = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ReportError(f"{spec_path} does not exist") from None
    root = root or spec.get("runs_root") or "runs/train"
    names = sorted({n for t in (spec.get("targets") or {}).values() for k in ("run", "baseline_run")
                    if (n := t.get(k))} | {n for lv in spec.get("levers") or [] for n in (lv["base"], lv["with"])}
                   | set(spec.get("runs") or []) | ({spec["profile_run"]} if spec.get("profile_run") else set()))
    runs = {r.name: r for r in discover(root, names)} if names else {}
    rep = Report("gpu_performance", spec.get("title", "GPU performance"), out_dir)
    first = next(iter(runs.values()), None)
    device = first.get("device.name") if first else None
    rep.data.update(device=device, spec=os.path.relpath(spec_path, project_path(".")), mfu_formula=MFU_FORMULA,
                    runs_root=str(root))
    rep.add(spec.get("intro", "").strip(), "", f"Device: {device}. " + (spec.get("setup", "").strip()), "",
            f"**{MFU_FORMULA}**", "")

    # --- targets
    rows, tdata = [], {}
    for key, t in (spec.get("targets") or {}).items():
        r = _run(runs, t.get("run"), f"target {key}")
        d: dict[str, Any] = {"what": t.get("what", key), "run": t.get("run")}
        if "min_mfu" in t:
            v = r.get("mfu_steady") if r else None
            d.update(measured=v, target=f">= {pct(t['min_mfu'])} MFU", met=v is not None and v >= t["min_mfu"])
            shown = f"{pct(v)} MFU ({num(r.get('tokens_per_s_steady'), 0)} tokens/s)" if r else "not run"
        elif "baseline_run" in t or "baseline_tokens_per_s" in t:
            base = _run(runs, t.get("baseline_run"), f"target {key}")
            base_tps = t.get("baseline_tokens_per_s") or (base.get("tokens_per_s_steady") if base else None)
            v = r.get("tokens_per_s_steady") if r else None
            ratio = v / base_tps if v and base_tps else None
            met = ratio is not None and ratio >= t["min_ratio"]
            d.update(measured=ratio, tokens_per_s=v, baseline_tokens_per_s=base_tps,
                     baseline_source=t.get("baseline_source") or (base.name if base else None),
                     target=f">= {t['min_ratio']}x")
            shown = f"{num(ratio, 2)}x ({num(v, 0)} vs {num(base_tps, 0)} tokens/s)" if ratio else "not run"
            if "max_padding_waste" in t:
                w = r.get("padding_waste") if r else None
                d["padding_waste"] = w
                met = met and w is not None and w <= t["max_padding_waste"]
                shown += f"; padding waste {pct(w)} (target <= {pct(t['max_padding_waste'])})"
            if t.get("loss_check") and base is not None and r is not None:
                diffs = protocol_differences(base, r)
                agree = loss_agreement(base, r)
                d.update(loss_agreement=agree, protocol_differences=diffs, loss_tolerance=t["loss_check"])
                ok = not diffs and agree["max_rel_diff"] is not None and agree["max_rel_diff"] <= t["loss_check"]
                met = met and ok
                shown += (f"; loss curves over {agree['steps']} steps: max relative difference "
                          f"{agree['max_rel_diff']:.1e} (tolerance {t['loss_check']:g})"
                          + (f"; protocols differ: {', '.join(diffs)}" if diffs else ""))
            d["met"] = met
        else:
            raise ReportError(f"spec: target {key} needs min_mfu, or min_ratio with baseline_run / "
                              "baseline_tokens_per_s")
        tdata[key] = d
        rows.append([d["what"], d["target"], shown, "**met**" if d["met"] else "not met", f"`{t.get('run')}`"])
    rep.data["targets"] = tdata
    rep.add("## Targets", "", table(["target", "wanted", "measured", "result", "run"], rows), "")
    for key, t in (spec.get("targets") or {}).items():
        if t.get("loss_check") and tdata[key].get("loss_agreement"):
            pair = [runs[t["baseline_run"]], runs[t["run"]]]
            rep.plot(f"loss_{key}", _loss_plot(pair, "training loss, same data and global batch"),
                     f"loss curves: {t['baseline_run']} vs {t['run']}")

    # --- levers
    lv_rows, lv_data = [], []
    for lv in spec.get("levers") or []:
        a, b = runs[lv["base"]], runs[lv["with"]]
        ta, tb = a.get("tokens_per_s_steady"), b.get("tokens_per_s_steady")
        eff = tb / ta if ta and tb else None
        verdict = lv.get("verdict") or ("kept" if eff and eff > 1.02 else "rejected")
        lv_data.append({**lv, "effect": eff, "verdict": verdict})
        lv_rows.append([lv["lever"], f"`{a.name}` -> `{b.name}`", num(ta, 0), num(tb, 0),
                        f"{eff:.2f}x" if eff else "–", f"{gib(a.get('peak_memory_bytes'))} -> "
                        f"{gib(b.get('peak_memory_bytes'))}", verdict, lv.get("note", "")])
    if lv_rows:
        rep.add("## Levers, one at a time", "", table(
            ["lever", "runs", "tokens/s before", "tokens/s after", "effect", "peak GiB", "verdict", "note"],
            lv_rows), "")
    rep.data["levers"] = lv_data

    # --- every run
    ordered = [runs[n] for n in names]
    rep.add("## Every run", "", table(SPEED_HEADERS, [_speed_row(r) for r in ordered]), "")
    rep.add("Commands (each run's own record, `command` in its train_summary.json):", "")
    rep.add(*[f"- `{r.name}`: `{r.launch}`" for r in ordered], "")
    rep.plot("throughput", _bar_plot([r.name for r in ordered],
                                     {"tokens/s": [r.get("tokens_per_s_steady") for r in ordered]},
                                     "steady tokens/s", "throughput per run"), "steady tokens/s per run")
    rep.data["runs"] = [{"run": r.name, "command": r.launch, **{k: r.get(k) for k in (
        "tokens_per_s_steady", "mfu_steady", "peak_memory_bytes", "micro_batch_size", "grad_accum",
        "gradient_checkpointing", "torch_compile", "compile_scope", "attn_implementation", "sdpa_backend",
        "liger_kernel", "final_loss", "padding_waste", "seq_len", "flops_per_token", "task", "sft_mode")},
        "estimate_peak_ratio": r.get("estimate.peak_memory_ratio")} for r in ordered]

    if spec.get("floor"):
        _floor_section(rep, spec, runs)
    if spec.get("profile_run"):
        _profile_section(rep, runs[spec["profile_run"]])

    # --- packing check, estimator
    pc = spec.get("packing_check")
    if pc:
        p = project_path(pc)
        if not p.is_file():
            raise ReportError(f"spec: packing_check {p} does not exist")
        body = read_json(p)
        rep.data["packing_check"] = body
        rep.add("## Packing without cross-contamination, on the GPU", "",
                f"`{body['command']}` on {body['device_name']} ({body['dtype']}, {body['model']}):", "",
                table(["attention", "rows", "samples compared", "max abs logit diff packed vs alone",
                       "naive packing (min over samples)", "result"],
                      [[x["attn_implementation"], x["rows"], x["samples"], f"{x['max_abs_logit_diff']:.2e}",
                        f"{x['naive_packing_min_abs_logit_diff']:.2e}", "pass" if x["passed"] else "FAIL"]
                       for x in body["results"]]), "")
    est = spec.get("estimator")
    if est:
        p = project_path(est)
        body = read_json(p) if p.is_file() else None
        rows, ratios = [], []
        for r in ordered:
            if not r.get("estimate.predicted"):
                continue
            now = reestimate(r)
            measured = r.get("peak_memory_bytes")
            ratio = measured / now["peak_memory_bytes"] if now and measured else None
            mode = now["shape"]["kernels"] if now else None
            # compiled LoRA / checkpointed runs get the eager formula: an upper bound, not a model
            modelled = mode is not None and now["activation_model"] == mode
            if ratio and modelled:
                ratios.append((r.name, ratio, mode))
            rows.append([r.name, gib(r.get("estimate.predicted.peak_memory_bytes")),
                         gib(now["peak_memory_bytes"]) if now else "–", gib(measured),
                         num(r.get("estimate.peak_memory_ratio"), 3), num(ratio, 3),
                         "–" if mode is None else mode if modelled else f"{mode}: not calibrated, eager formula"])
        calibrated = [x for _, x, _ in ratios]
        rep.add("## Memory estimator", "", spec.get("estimator_note", "").strip(), "",
                table(["run", "predicted at the run GiB", "estimator now GiB", "measured GiB",
                       "measured / at the run", "measured / now", "estimator mode"], rows), "")
        if calibrated:
            rep.add(f"Measured / now over the runs the estimator models (eager, and compiled full training): "
                    f"{min(calibrated):.3f} to {max(calibrated):.3f} ({len(calibrated)} runs).", "")
        rep.data["estimator"] = {"record": est, "summary": (body or {}).get("summary"),
                                 "now": [{"run": n, "measured_over_now": x, "kernels": k} for n, x, k in ratios]}
    for line in spec.get("notes") or []:
        rep.add(f"- {line}")
    rep.add("")
    return rep.write(command)


def reestimate(r: RunRecord) -> dict | None:
    """The current estimator's prediction for a finished run of a preset shape: the shape the run
    resolved and recorded (estimate.predicted.shape: precision, sequence length, method; kernels
    from the run's resolved torch_compile / liger_kernel), re-estimated with today's formulas. None for runs of a model directory (its config is not
    kept with the run). Reads run files only: no training code is imported."""
    import json

    from ..estimate.estimator import estimate_run
    from ..estimate.knobs import knobs_from_conf
    from ..estimate.shape import TrainShape
    from ..model import presets
    cfg = r.dir / "config.yaml"
    pred = r.get("estimate.predicted")
    if not cfg.is_file() or not pred:
        return None
    conf = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    model = conf.get("model") or {}
    if model.get("path") or not model.get("preset"):
        return None
    ds_path = (conf.get("dist") or {}).get("deepspeed")
    ds = json.loads(project_path(ds_path).read_text(encoding="utf-8")) if ds_path and \
        project_path(ds_path).is_file() else None
    shape = TrainShape.from_record(pred["shape"], ds_config=ds)
    # records older than the compiled-mode formulas say "eager" for compiled runs: the run's
    # resolved settings say which kernels ran
    shape.kernels = "liger" if r.get("liger_kernel") else "compiled" if r.get("torch_compile") else "eager"
    # and records older than the chunked-loss term do not carry its setting
    shape.loss_chunk_tokens = int((conf.get("runtime") or {}).get("loss_chunk_tokens") or 0)
    shape.fp8 = bool((conf.get("runtime") or {}).get("fp8"))
    return estimate_run(shape, presets.build_config(model["preset"]), int(pred["steps_detail"]["items"]),
                        r.world_size, knobs=knobs_from_conf(conf))


def _floor_section(rep: Report, spec: dict, runs: dict[str, RunRecord]) -> None:
    """The device's floor (scripts/kernel_floor.py): matmuls and attention alone, and how close the
    tuned run of each micro batch comes to it."""
    p = project_path(spec["floor"])
    if not p.is_file():
        raise ReportError(f"spec: floor {p} does not exist")
    body = read_json(p)
    rep.data["floor"] = body
    bw = body.get("copy_bytes_per_s")
    rep.add("## The device's floor: matmuls and attention alone", "",
            f"`{body['command']}` on {body['device']} ({body['date'][:10]}, torch {body['torch']}): every matmul "
            "of a decoder block and of the LM head (forward, input gradient, weight gradient) and causal attention "
            "forward + backward, each timed alone on random bf16 inputs ("
            f"{body.get('timing', 'CUDA events around one call, median of 10 repeats')}). A device-to-device copy "
            f"moved {bw / 1e12:.2f} TB/s (read + write). Summed over the layers, that is the step time if norms, "
            "RoPE, SwiGLU, the loss, casts and the optimizer cost nothing: an estimate of the ceiling for this "
            "shape.", "")
    tuned = spec.get("floor_runs") or {}
    rows = []
    for f in body["floors"]:
        fl = f["floor"]
        mm = {r["matmul"]: r for r in f["matmuls"]}
        att = {r["backend"]: r for r in f["attention"]}
        run = runs.get(tuned.get(f["micro_batch"]) or tuned.get(str(f["micro_batch"])) or "")
        got = run.get("tokens_per_s_steady") if run else None
        rows.append([f["micro_batch"], f"{mm['q_proj']['tflops_fwd_bwd']:.0f} / {mm['k_proj']['tflops_fwd_bwd']:.0f} / "
                     f"{mm['gate_proj']['tflops_fwd_bwd']:.0f} / {mm['lm_head']['tflops_fwd_bwd']:.0f}",
                     " / ".join(f"{b} {r['ms_fwd_bwd']:.2f} ms" if "ms_fwd_bwd" in r else f"{b} cannot run"
                                for b, r in att.items()),
                     f"{fl['ms_per_micro_batch']:.1f}", num(fl["tokens_per_s"], 0), pct(fl["mfu"]),
                     f"`{run.name}` {num(got, 0)} ({pct(got / fl['tokens_per_s'])} of the floor)" if got else "–"])
    rep.add(table(["micro batch", "matmul TF/s fwd+bwd: q / k / gate / lm_head",
                   "attention fwd+bwd per layer", "floor ms per micro-batch", "floor tokens/s", "floor MFU",
                   "tuned run"], rows), "")
    if spec.get("floor_note"):
        rep.add(spec["floor_note"].strip(), "")


def _profile_section(rep: Report, run: RunRecord) -> None:
    """Device time per kernel category of one profiled run (profile_summary.json's kernels)."""
    p = run.dir / "profile_summary.json"
    if not p.is_file():
        raise ReportError(f"spec: profile_run {run.name} has no profile_summary.json")
    k = read_json(p).get("kernels")
    if not k:
        raise ReportError(f"spec: profile_run {run.name} recorded no device kernels (a CPU run?)")
    rep.data["profile"] = {"run": run.name, "kernels": k}
    rep.add("## Where a tuned step's time goes", "",
            f"`{run.launch}`: torch.profiler over {k['steps']} optimizer steps (profile track without phase "
            f"timers). The device was busy {pct(1 - k['idle_fraction'])} of the profiled window "
            f"({k['busy_ms_per_step']:.0f} of {k['window_ms_per_step']:.0f} ms per step); the profiler's own host "
            "overhead makes that window longer than an unprofiled step, so the idle share is an upper bound.", "",
            table(["kernels", "ms per step", "share of kernel time"],
                  [[c["category"], f"{c['ms_per_step']:.1f}", pct(c["share"])] for c in k["categories"]]), "",
            "Longest kernels:", "",
            table(["kernel", "category", "calls per step", "ms per step", "share"],
                  [[f"`{t['kernel'][:90]}`", t["category"], num(t["calls_per_step"], 1), f"{t['ms_per_step']:.1f}",
                    pct(t["share"])] for t in k["top_kernels"][:10]]), "")
