"""train_summary.json of a run: what the run is (written when it starts, so a failed run's
summary says it too) and what it did (added at the end: throughput, MFU, memory, checkpoints,
losses, the estimate next to the measurement), plus profile_summary.json for the profile track.
Reports read these files only."""
from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from ..prof.kernels import kernel_breakdown, trace_events
from ..runs import read_metrics, write_json
from .flops import mfu
from .profiling import ProfilerCallback, StepTimers, comms_from_trace


def start_fields(s) -> dict:
    """The run's identity and requested settings."""
    conf, rt = s.conf, s.conf.runtime
    return {
        "command": os.environ.get("FORGELAB_COMMAND"), "task": conf.task, "track": conf.track,
        "backend": conf.backend, "world_size": s.world, "micro_batch_size": conf.steps.micro_batch_size,
        "grad_accum": conf.steps.grad_accum, "seq_len": s.pre.train.seq_len, "precision": s.rt.precision,
        "gradient_checkpointing": rt.gradient_checkpointing, "torch_compile": rt.torch_compile,
        "compile_scope": rt.compile_scope if rt.torch_compile else None,
        "attn_implementation": conf.model.attn_implementation, "sdpa_backend": rt.sdpa_backend,
        "fp8": s.rt.fp8, "liger_kernel": s.rt.liger, "estimate": {"predicted": s.estimate},
        "memory_cap_bytes": s.rt.memory_cap,
        **({"loss_component": _component(conf.loss)} if conf.loss else {})}


def _component(spec: str) -> dict:
    """A user's component as the run used it: its path and a hash of the file defining it."""
    from ..components import component_fingerprints
    return {"spec": spec, "files": component_fingerprints([spec])}


def end_fields(s, trainer, metrics_cb, train_seconds: float, final_dir: Path | None) -> dict:
    """What the session did. Command, task, track, backend, batch and the requested speed
    settings are in already; the applied attention and SDPA kernels replace the requested ones."""
    conf, pre, world, model, args = s.conf, s.pre, s.world, s.model, trainer.args
    peak_mem, mem_measure = peak_memory(s.rt.on_cuda, args.device)
    recs = metrics_cb.records
    skip = conf.metrics.steady_skip_steps
    steady = recs[skip:] if len(recs) > skip else []
    tps_mean, tps_steady = rate(recs), rate(steady)
    curve = read_metrics(pre.run_dir / "metrics.jsonl") if s.is_main else recs
    losses = [r["loss"] for r in curve if r.get("loss") is not None]
    # AutoTP / Ulysses: the sizes the Trainer ran with (from the DeepSpeed config and accelerate's
    # ParallelismConfig); world / (tp x sp) ranks read different data
    tp, sp = trainer.get_tp_size(), trainer.get_sp_size()
    global_batch = conf.steps.micro_batch_size * conf.steps.grad_accum * (world // (tp * sp))
    steps_done = len(recs)
    tokens_step_mean = sum(r["step_tokens"] for r in recs) / steps_done if steps_done else None
    s.tokens_step_mean = tokens_step_mean
    if s.estimate is not None:
        est = {"predicted": s.estimate,
               "measured": {"peak_memory_bytes": peak_mem, "peak_memory_measure": mem_measure,
                            "steps": trainer.state.global_step},
               "peak_memory_ratio": (peak_mem / s.estimate["peak_memory_bytes"]
                                     if s.estimate.get("peak_memory_bytes") else None)}
    else:
        est = {"predicted": None, "note": s.est_note}
    rt, fpt, peak = conf.runtime, s.fpt, s.peak
    return {
        **s.method.summary(conf), "nodes": pre.nnodes,
        "device": {"type": "cuda" if s.rt.on_cuda else "cpu", "name": s.dev_name, "count": world},
        "attn_implementation": model.config.get_text_config()._attn_implementation
        if hasattr(model.config, "get_text_config") else None,
        "compile_mode": rt.compile_mode if rt.torch_compile else None,
        "sdpa_backend": s.sdpa, "loss_chunk_tokens": s.loss_chunk, "fp8_linears": s.fp8_linears,
        "fp8_lm_head": bool(s.rt.fp8) and rt.fp8_lm_head,
        "liger_kernel_config": rt.liger_kernel_config if s.rt.liger else None,
        "fused_adamw": args.optim.value if hasattr(args.optim, "value") else str(args.optim),
        "dataloader_workers": conf.data.num_workers,
        "model": {"name": Path(conf.model.path).name if conf.model.path else
                  (conf.model.preset or "custom"), "source": pre.model_source, **s.counts.as_dict()},
        "data": {"train": str(pre.train.path), "kind": pre.train.kind, "items": pre.train.n_items,
                 "seq_len": pre.train.seq_len, "data_fingerprint": pre.train.data_fingerprint,
                 "tokenizer_fingerprint": pre.train.tokenizer_fingerprint,
                 "eval": str(pre.eval.path) if pre.eval else None},
        "tokenizer_fingerprint": pre.tokenizer_fp,
        "tensor_parallel_size": tp, "sequence_parallel_size": sp, "data_parallel_size": world // (tp * sp),
        "attention_span": s.span, "global_batch": global_batch, "tokens_per_step": tokens_step_mean,
        "tokens_per_step_capacity": global_batch * pre.train.seq_len,
        "padding_waste": (1 - trainer.local_tokens / trainer.local_slots) if trainer.local_slots else None,
        "padding_waste_note": "1 - real tokens / token slots of the batches rank 0 trained on",
        "steps": trainer.state.global_step, "max_steps": conf.steps.max_steps,
        "steps_this_session": steps_done, "stopped_early": s.stopped_early,
        "tokens": int(trainer.state.num_input_tokens_seen),
        "tokens_per_s_mean": tps_mean, "tokens_per_s_steady": tps_steady,
        "steady_skip_steps": skip, "steady_steps": len(steady),
        "flops_per_token": fpt, "flops_formula": s.method.flops_formula,
        "peak_flops": peak, "peak_flops_source": s.peak_src + (
            "; FP8 linears: the same FLOP count against this peak, not an FP8 one" if s.rt.fp8 else ""),
        "mfu_mean": mfu(tps_mean, fpt, peak, world), "mfu_steady": mfu(tps_steady, fpt, peak, world),
        "peak_memory_bytes": peak_mem, "peak_memory_measure": mem_measure,
        "checkpoints": trainer.saved, "resume": s.resume_info,
        "final_loss": losses[-1] if losses else None, "best_loss": min(losses) if losses else None,
        "method_metrics": method_metrics(curve), "sequence_tokens_mean": s.seq_tokens_mean,
        "loss_curve": "metrics.jsonl", "tensorboard": "tb" if conf.metrics.tensorboard else None,
        "trackers": metrics_cb.tracker_where,  # tracker -> its dir or URI (W&B disabled: null)
        "final_model": str(final_dir) if final_dir else None,
        "train_seconds": round(train_seconds, 3), "estimate": est, "notices": s.notices, "disk": s.disk,
        **({"plan": s.plan_info} if s.plan_info else {}),
    }


def _all_reduce_max(value: int, device) -> int:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def peak_memory(on_cuda: bool, device) -> tuple[int, str]:
    if on_cuda:
        return _all_reduce_max(int(torch.cuda.max_memory_allocated()), device), \
            "cuda max_memory_allocated (max over ranks)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return _all_reduce_max(int(rss), device), "peak RSS of a rank process (max over ranks)"


def rate(records: list[dict]) -> float | None:
    secs = sum(r["step_time_s"] for r in records)
    return sum(r["step_tokens"] for r in records) / secs if records and secs > 0 else None


_STEP_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "step_tokens", "tokens_per_s", "mfu", "step_time_s",
              "elapsed_s", "time", "epoch", "mem_allocated", "mem_reserved", "mem_max_allocated", "rss"}


def method_metrics(curve: list[dict]) -> dict | None:
    """First, last and mean of every per-step value a method logged besides the lab's own
    (alignment: rewards/margins, rewards/accuracies, reward, kl, completion lengths)."""
    keys = sorted({k for r in curve for k in r if k not in _STEP_KEYS})
    out = {}
    for k in keys:
        vals = [r[k] for r in curve if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = {"first": vals[0], "last": vals[-1], "mean": sum(vals) / len(vals), "steps": len(vals)}
    return out or None


def write_profile_summary(pre, prof_cb: ProfilerCallback, timers: StepTimers, fpt: float,
                           tokens_step: float | None, world: int, run) -> None:
    steps = prof_cb.active_steps
    traces = sorted(str(p.relative_to(pre.run_dir)) for p in (pre.run_dir / "profile").glob("trace_rank*.json"))
    events = trace_events(prof_cb.trace_files[0]) if prof_cb.trace_files else []  # read once: traces are large
    comms = comms_from_trace(events, steps)
    kernels = kernel_breakdown(events, steps)
    flops_step = fpt * tokens_step if tokens_step else None
    body = {
        "flops_per_step": flops_step,
        "flops_per_step_per_rank": flops_step / world if flops_step else None,
        "flops_per_step_profiler_per_rank": prof_cb.profiler_flops,
        "flops_note": "flops_per_step: model FLOPs of one optimizer step over all ranks (formula in "
                      "forgelab/train/flops.py); profiler: the matmul FLOPs torch.profiler counted on rank 0 "
                      "(aten mm/addmm/bmm; fused attention kernels are not counted, so it misses 12*L*A*S)",
        "time_split_ms": timers.split_ms() if timers.enabled else None,
        "time_split_note": "rank 0, mean per optimizer step after metrics.steady_skip_steps; backward = "
                           "forward+backward - forward; with DeepSpeed the optimizer step runs inside the "
                           "last micro-batch's backward",
        "kernels": kernels, "kernels_note": None if kernels is None else (
            "phase timers synced the device at each boundary (profile.time_split): idle time includes those "
            "syncs" if timers.enabled else "no phase timers: idle time is the run's own"),
        "comms": comms, "comms_rank": 0, "profiled_steps": steps, "world_size": world,
        "trace_files": traces, "op_tables": sorted(str(p.relative_to(pre.run_dir))
                                                  for p in (pre.run_dir / "profile").glob("ops_rank*.txt")),
    }
    if pre.conf.profile.deepspeed and pre.ds_config is not None:
        from .ds_profilers import summary as ds_summary
        body["deepspeed"] = ds_summary(pre.run_dir, int(run.summary.get("steps_this_session") or 0),
                                       body["flops_per_step_per_rank"],
                                       pre.conf.steps.grad_accum, comms)
    write_json(pre.run_dir / "profile_summary.json", body)
    run.summary["profile_summary"] = "profile_summary.json"
    run.log.info("profile summary -> %s", pre.run_dir / "profile_summary.json")
