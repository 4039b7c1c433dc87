"""Where the GPU time of a profiled step goes, read from a torch.profiler Chrome trace.

The operator table says which aten ops were slow; this says what the device did: kernel time
per category (matmuls, attention, compiled Triton kernels, the optimizer, copies, ...), how much
of the profiled window the GPU was busy at all (idle gaps are what CUDA graphs or less host
work could win back), and the kernels that took longest. A compiled model's work shows up as
``triton_*`` kernels that no aten op names, which is why this reads the device side.
"""
from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

# first match wins: attention before gemm (flash and cutlass fmha kernels contain "gemm"-like words)
CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|sdpa|attn|attention", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|matmul|wgmma|s16816|s1688", re.I)),
    ("collective", re.compile(r"nccl", re.I)),
    ("optimizer_foreach", re.compile(r"multi_tensor_apply|adam|foreach|lpnorm", re.I)),
    ("triton_compiled", re.compile(r"^triton_", re.I)),
    ("loss_softmax", re.compile(r"softmax|cross_entropy|nll_loss|log_softmax", re.I)),
    ("reduce", re.compile(r"reduce_kernel|reduction", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|index|gather|scatter|embedding|fill|copy|cat",
                               re.I)),
)
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def category(name: str, cat: str = "kernel") -> str:
    if cat == "gpu_memcpy":
        return "memcpy"
    if cat == "gpu_memset":
        return "memset"
    for label, rx in CATEGORIES:
        if rx.search(name):
            return label
    return "other"


def trace_events(trace_file: str | Path) -> list[dict]:
    """The events of a Chrome trace as torch.profiler exports it (.json or .json.gz)."""
    trace_file = Path(trace_file)
    opener = gzip.open if trace_file.suffix == ".gz" else open
    with opener(trace_file, "rt", encoding="utf-8") as f:
        return json.load(f).get("traceEvents", [])


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams overlap)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def kernel_breakdown(events: list[dict], steps: int, top: int = 15) -> dict | None:
    """Device time per category and the busy share of the window, per profiled step, from a
    trace's events (``trace_events``); None when there are no device events (a CPU run)."""
    events = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
              and e.get("cat") in DEVICE_CATS and e.get("dur") is not None]
    if not events:
        return None
    n = max(int(steps), 1)
    per_cat: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list] = defaultdict(lambda: [0, 0.0])
    intervals = []
    for e in events:
        ts, dur = float(e["ts"]), float(e["dur"])
        intervals.append((ts, ts + dur))
        name = str(e.get("name", ""))
        per_cat[category(name, e["cat"])] += dur
        k = per_kernel[name]
        k[0] += 1
        k[1] += dur
    span = max(b for _, b in intervals) - min(a for a, _ in intervals)
    busy = _busy_us(intervals)
    kernel_total = sum(per_cat.values())
    return {
        "steps": n,
        "window_ms_per_step": span / 1e3 / n,
        "busy_ms_per_step": busy / 1e3 / n,
        "idle_fraction": 1 - busy / span if span > 0 else 0.0,
        "kernel_ms_per_step": kernel_total / 1e3 / n,
        "categories": [{"category": c, "ms_per_step": us / 1e3 / n, "share": us / kernel_total}
                       for c, us in sorted(per_cat.items(), key=lambda kv: -kv[1])],
        "top_kernels": [{"kernel": name[:160], "category": category(name), "calls_per_step": c / n,
                         "ms_per_step": us / 1e3 / n, "share": us / kernel_total}
                        for name, (c, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]],
        "note": "device events of the profiled window (torch.profiler, CUDA activity); busy = union of "
                "kernel/memcpy/memset intervals; idle = the rest of the window (host-bound gaps, syncs)",
    }
