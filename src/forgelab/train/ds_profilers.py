"""DeepSpeed's own flops profiler and communication logger on the profile track
(`profile.deepspeed: true`, zero backends): switched on in the run's DeepSpeed config, read back
after training, and set beside the lab's FLOPs formula and trace-measured collectives in
profile_summary.json, so either can be checked against the other."""
from __future__ import annotations

import re
from pathlib import Path

FLOPS_FILE = "ds_flops_profile.txt"
# label in DeepSpeed's profile summary -> key
_FIELDS = {"world size": "world_size", "batch size per GPU": "batch_size_per_gpu", "params per GPU": "params_per_gpu",
           "fwd flops per GPU": "fwd_flops_per_gpu", "fwd latency": "fwd_latency_s", "bwd latency": "bwd_latency_s",
           "step latency": "step_latency_s", "iter latency": "iter_latency_s"}
_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
          "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def profile_step(profile) -> int:
    """The optimizer step DeepSpeed's flops profiler measures, as DeepSpeed counts (from 0): the
    torch profiler's first recorded one (after its wait and warmup steps)."""
    return profile.wait + profile.warmup


def configure(ds: dict, profile, run_dir: Path) -> None:
    """Turn both on in the run's DeepSpeed config (the copy the Trainer gets)."""
    out = run_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)
    ds["flops_profiler"] = {"enabled": True, "profile_step": profile_step(profile), "module_depth": -1,
                            "top_modules": 1, "detailed": False, "output_file": str(out / FLOPS_FILE)}
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}


def _value(text: str) -> float | None:
    """'414.2 M' -> 4.142e8, '42.52 ms' -> 0.04252, '2' -> 2.0 (DeepSpeed's rounded units)."""
    m = re.match(r"\s*([0-9.]+)\s*([KMGTP]?)(?:MACs|FLOPS|flops)?\s*(s|ms|us|ns)?\s*$", text)
    if not m:
        return None
    num, scale, time_unit = m.groups()
    v = float(num)
    if time_unit:
        # '1.8 Gs' does not occur in the summary lines read here; a time has no size prefix
        return v * _UNITS[time_unit]
    return v * _UNITS[scale]


def read_flops(path: Path) -> dict | None:
    """The summary block of DeepSpeed's flops profile file (None when it was not written)."""
    if not path.is_file():
        return None
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        label, sep, rest = line.partition(":")
        key = _FIELDS.get(label.strip())
        if sep and key and key not in out:
            out[key] = _value(rest)
        m = re.match(r"Profile Summary at step (\d+)", line.strip())
        if m:
            out["step"] = int(m.group(1))
    return out or None


def comms(steps: int) -> list[dict]:
    """What DeepSpeed's communication logger recorded in this process (rank 0), per op: calls and
    bytes per optimizer step over the `steps` the run trained, and time. The logger's per-call
    latency is its op timer read without a reset (deepspeed.comm.timed_op), i.e. a running total
    per op name, so the op's time is the largest value it recorded, not a sum."""
    try:
        import deepspeed.comm.comm as dscomm
    except ImportError:
        return []
    logger = getattr(dscomm, "comms_logger", None)
    rows = []
    for op, sizes in sorted((getattr(logger, "comms_dict", None) or {}).items()):
        calls = sum(rec[0] for rec in sizes.values())
        nbytes = sum(size * rec[0] for size, rec in sizes.items())
        total_ms = max((max(rec[1]) for rec in sizes.values() if rec[1]), default=0.0)
        rows.append({"op": op, "calls_per_step": calls / steps if steps else None,
                     "bytes_per_step": nbytes / steps if steps else None,
                     "ms_per_step": total_ms / steps if steps else None,
                     "message_sizes": sorted(int(x) for x in sizes)})
    return rows


def beside_trace(logged: list[dict], traced: list[dict]) -> list[dict]:
    """Bytes per step of each collective as DeepSpeed logged it and as the lab's trace parsing
    measured it (the logger names all_gather all_gather_into_tensor)."""
    name = lambda op: op.replace("_into_tensor", "").replace("reduce_scatter_tensor", "reduce_scatter")  # noqa: E731
    by_trace = {t["op"]: t for t in traced or []}
    out = []
    for op in sorted({name(r["op"]) for r in logged} | set(by_trace)):
        ds_bytes = sum(r["bytes_per_step"] or 0 for r in logged if name(r["op"]) == op)
        tr = by_trace.get(op, {}).get("bytes_per_step")
        out.append({"op": op, "bytes_per_step_deepspeed": ds_bytes, "bytes_per_step_trace": tr,
                    "ratio": ds_bytes / tr if tr else None})
    return out


def summary(run_dir: Path, steps: int, lab_flops_per_step_per_rank: float | None, grad_accum: int,
            traced_comms: list[dict] | None = None) -> dict:
    """DeepSpeed's numbers beside the lab's: its forward FLOPs of one micro-batch x 3 (forward +
    backward) x accumulation is one optimizer step's FLOPs per rank."""
    fl = read_flops(run_dir / "profile" / FLOPS_FILE)
    ds_step = fl["fwd_flops_per_gpu"] * 3 * grad_accum if fl and fl.get("fwd_flops_per_gpu") else None
    return {"flops_profile": fl, "flops_profile_file": f"profile/{FLOPS_FILE}" if fl else None,
            "flops_per_step_per_rank_deepspeed": ds_step,
            "flops_ratio_deepspeed_to_lab": ds_step / lab_flops_per_step_per_rank
            if ds_step and lab_flops_per_step_per_rank else None,
            "comms_logger": (logged := comms(steps)),
            "comms_beside_trace": beside_trace(logged, traced_comms),
            "note": "DeepSpeed's flops profiler counts the modules' forward FLOPs at one step (x 3 for training, "
                    "x accumulation per optimizer step; SDPA's attention term is counted by its own patch); "
                    "its communication logger counts every deepspeed.comm collective of the whole run (rank 0); the trace's "
                    "numbers cover the profiled steps only"}
