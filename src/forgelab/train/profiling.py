"""The profile track: torch.profiler traces, the per-step time split and the collectives.

- traces: Chrome/Perfetto JSON per rank under <run dir>/profile/ (open in ui.perfetto.dev or
  TensorBoard's profiler plugin)
- time split: host timers in the trainer (forward / backward / optimizer / data), with a
  device sync at each boundary on CUDA so the times are real; only in the profile track
- comms: the backend's collective events in the trace (``gloo:all_reduce``, ``nccl:all_gather``,
  ... or ``record_param_comms``): calls, bytes (element count x dtype size of the inputs) and
  time per profiled step; on CUDA the time is that of the NCCL kernels on the GPU
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger("forgelab.train")

OPS = (("reduce_scatter", ("reduce_scatter", "reducescatter")),
       ("all_gather", ("all_gather", "allgather")),
       ("all_reduce", ("all_reduce", "allreduce")),
       ("broadcast", ("broadcast",)),
       ("all_to_all", ("all_to_all", "alltoall")))
DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
               "bool": 1, "unsigned char": 1, "signed char": 1, "short int": 2, "c10::Float8_e4m3fn": 1,
               "Float": 4, "BFloat16": 2, "Half": 2, "Double": 8, "Long": 8, "Int": 4, "Byte": 1, "Bool": 1}


def op_kind(name: str) -> str | None:
    low = name.lower()
    for kind, keys in OPS:
        if any(k in low for k in keys):
            return kind
    return None


class StepTimers:
    """Accumulates wall time per phase; enabled only in the profile track (CUDA syncs cost)."""

    def __init__(self, enabled: bool, on_cuda: bool):
        self.enabled = enabled
        self.on_cuda = on_cuda
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.skip = 0
        self.mark = 0.0

    def _sync(self):
        if self.on_cuda:
            import torch
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def time(self, phase: str):
        if not self.enabled:
            yield
            return
        from torch.profiler import record_function
        self._sync()
        t = time.perf_counter()
        with record_function(f"forgelab.{phase}"):
            yield
        self._sync()
        self.totals[phase] += time.perf_counter() - t
        self.mark = time.perf_counter()

    def add(self, phase: str, seconds: float):
        if self.enabled:
            self.totals[phase] += seconds

    def end_step(self, warmup_steps: int):
        """Close one optimizer step; the first ``warmup_steps`` are discarded (compile, caches)."""
        if not self.enabled:
            return
        if self.skip < warmup_steps:
            self.skip += 1
            self.totals.clear()
            return
        self.steps += 1

    def split_ms(self) -> dict:
        n = max(self.steps, 1)
        fwd = self.totals.get("forward", 0.0)
        fb = self.totals.get("forward_backward", 0.0)
        return {"forward": 1e3 * fwd / n, "backward": 1e3 * max(fb - fwd, 0.0) / n,
                "optimizer": 1e3 * self.totals.get("optimizer", 0.0) / n,
                "data": 1e3 * self.totals.get("data", 0.0) / n, "steps_measured": self.steps}


def comms_from_trace(events: list[dict], steps: int) -> list[dict]:
    """Collectives per step from the events of one Chrome trace (``prof.kernels.trace_events``;
    see the module docstring)."""
    backend_ev = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
                  and str(e.get("name", "")).startswith(("gloo:", "nccl:"))]
    param_ev = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
                and e.get("name") == "record_param_comms"]
    gpu_ev = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
              and e.get("cat") in ("kernel", "gpu_memcpy") and "nccl" in str(e.get("name", "")).lower()]
    agg: dict[str, dict] = defaultdict(lambda: {"calls": 0, "bytes": 0, "us": 0.0})
    if backend_ev:
        for e in backend_ev:
            kind = op_kind(e["name"].split(":", 1)[1])
            if not kind:
                continue
            a = agg[kind]
            a["calls"] += 1
            a["bytes"] += _bytes_from_shapes(e.get("args", {}))
            a["us"] += float(e.get("dur", 0.0))
    else:
        for e in param_ev:
            args = e.get("args", {})
            kind = op_kind(str(args.get("Collective name", "")))
            if not kind:
                continue
            a = agg[kind]
            a["calls"] += 1
            n = int(args.get("In msg nelems", 0) or 0)
            a["bytes"] += n * DTYPE_BYTES.get(str(args.get("dtype", "Float")), 4)
            a["us"] += float(e.get("dur", 0.0))
    if gpu_ev:  # on CUDA the collective's time is its kernel time
        for a in agg.values():
            a["us"] = 0.0
        for e in gpu_ev:
            kind = op_kind(e["name"])
            if kind:
                agg[kind]["us"] += float(e.get("dur", 0.0))
    n = max(steps, 1)
    return [{"op": k, "calls_per_step": v["calls"] / n, "bytes_per_step": v["bytes"] / n,
             "ms_per_step": v["us"] / 1e3 / n} for k, v in sorted(agg.items())]


def _bytes_from_shapes(args: dict) -> int:
    dims = args.get("Input Dims") or []
    types = args.get("Input type") or []
    total = 0
    for i, d in enumerate(dims):
        tp = types[i] if i < len(types) else "float"
        size = DTYPE_BYTES.get(str(tp))
        if size is None:
            continue
        shapes = d if d and isinstance(d[0], list) else [d]  # a TensorList or one tensor
        for s in shapes:
            if isinstance(s, list) and s:
                n = 1
                for x in s:
                    n *= int(x)
                total += n * size
    return total


class ProfilerCallback(TrainerCallback):
    """Runs torch.profiler over optimizer steps with a wait/warmup/active schedule and writes
    the traces and the operator table into <run dir>/profile/."""

    def __init__(self, conf, out_dir: Path, rank: int, on_cuda: bool, metrics=None):
        self.conf = conf
        self.metrics = metrics  # told how long trace export took, so step times leave it out
        self.out_dir = out_dir
        self.rank = rank
        self.on_cuda = on_cuda
        self.prof = None
        self.trace_files: list[str] = []
        self.profiler_flops: float | None = None
        self.active_steps = 0
        self.table: str = ""

    def on_train_begin(self, args, state, control, **kw):
        from torch.profiler import ProfilerActivity, profile, schedule
        self.out_dir.mkdir(parents=True, exist_ok=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
        c = self.conf
        self.prof = profile(activities=acts, schedule=schedule(wait=c.wait, warmup=c.warmup, active=c.active,
                                                               repeat=1),
                            on_trace_ready=self._ready, record_shapes=c.record_shapes,
                            profile_memory=c.profile_memory, with_stack=c.with_stack, with_flops=True)
        self.prof.start()
        log.info("profiler on: wait %d, warmup %d, active %d optimizer steps -> %s", c.wait, c.warmup, c.active,
                 self.out_dir)

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None:
            self.prof.step()

    def on_train_end(self, args, state, control, **kw):
        self.stop()

    def stop(self):
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()

    def _ready(self, prof):
        t0 = time.perf_counter()
        try:
            self._export(prof)
        finally:
            if self.metrics is not None:
                self.metrics.exclude(time.perf_counter() - t0)

    def _export(self, prof):
        self.active_steps = self.conf.active
        path = self.out_dir / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(path))
        self.trace_files.append(str(path))
        avg = prof.key_averages()
        self.profiler_flops = float(sum(e.flops for e in avg)) / max(self.conf.active, 1)
        sort = "self_cuda_time_total" if self.on_cuda else "self_cpu_time_total"
        self.table = avg.table(sort_by=sort, row_limit=40)
        (self.out_dir / f"ops_rank{self.rank}.txt").write_text(self.table, encoding="utf-8")
        log.info("profiler trace written: %s", path)
