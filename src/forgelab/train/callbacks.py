"""Trainer callbacks: per-step metrics (metrics.jsonl + the experiment trackers) and the stop step."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from ..runs import read_metrics
from .flops import mfu

log = logging.getLogger("forgelab.train")


def memory_now(on_cuda: bool) -> dict:
    if on_cuda:
        import torch
        return {"mem_allocated": torch.cuda.memory_allocated(), "mem_reserved": torch.cuda.memory_reserved(),
                "mem_max_allocated": torch.cuda.max_memory_allocated()}
    import psutil
    return {"rss": psutil.Process().memory_info().rss}


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep only lines for steps <= last_step (a resumed run redoes the later ones), dropping a
    line torn by a kill; returns kept."""
    if not path.is_file():
        return 0
    kept = [r for r in read_metrics(path) if r.get("step", math.inf) <= last_step]
    from ..runs import atomic_write_text
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)


# keys of the Trainer's own per-step log; anything else a method logged goes into the record too
_TRAINER_KEYS = {"loss", "learning_rate", "grad_norm", "epoch", "num_input_tokens_seen", "total_flos"}


class MetricsCallback(TrainerCallback):
    """One line per optimizer step in metrics.jsonl and the same scalars in every tracker
    (trackers.py: TensorBoard, MLflow, W&B), logged by the main rank only.

    Tokens are counted on the host by the collators (no device sync); the loss and grad norm
    come from the Trainer's own per-step log (logging_steps = 1), which is the one host sync
    per optimizer step.
    """

    def __init__(self, trainer, run_dir: Path, *, is_main: bool, world: int,
                 flops_per_token: float, peak_flops: float | None, on_cuda: bool, trackers: list = (),
                 params: dict | None = None, run_name: str = "", resume_step: int = 0):
        self.trainer = trainer
        self.path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval_metrics.jsonl"
        self.run_dir = run_dir
        self.is_main = is_main
        self.world = world
        self.fpt = flops_per_token
        self.peak = peak_flops
        self.on_cuda = on_cuda
        self.trackers = list(trackers)
        self.params = params or {}
        self.run_name = run_name
        self.resume_step = resume_step
        self.records: list[dict] = []
        self.tracker_where: dict[str, str | None] = {}  # tracker -> where it wrote, for the summary
        self._started: list = []
        self._fh = None
        self.t_prev = 0.0
        self.t0 = 0.0
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent by tooling inside a step (profiler trace export) is not step time."""
        self._excluded += seconds

    # -- lifecycle
    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.t_prev = time.perf_counter()
        if self.is_main:
            self._fh = open(self.path, "a", encoding="utf-8")
            for t in self.trackers:
                self.tracker_where[t.name] = t.start(self.params, self.run_name, self.run_dir, self.resume_step)
                self._started.append(t)

    def on_train_end(self, args, state, control, **kw):
        self.close(ok=True)

    def close(self, ok: bool = False):
        """The session calls this in a finally too: without on_train_end first, the run failed."""
        if self._fh:
            self._fh.close()
            self._fh = None
        while self._started:
            self._started.pop().finish(ok)

    def _track(self, scalars: dict, step: int) -> None:
        for t in self._started:
            t.log(scalars, step)

    def on_save(self, args, state, control, **kw):
        self.t_prev = time.perf_counter()  # checkpoint time is reported on its own, not as step time

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if self.is_main and metrics:
            rec = {"step": state.global_step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            with open(self.eval_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            if "eval_loss" in metrics:
                self._track({"eval/loss": metrics["eval_loss"]}, state.global_step)
        self.t_prev = time.perf_counter()

    # -- the per-step record
    def _global_tokens(self, local: int) -> int:
        if self.world == 1:
            return local
        # summed over what the ranks' batches held, even for fixed-length blocks: a rank that read
        # a short or empty batch must not be counted as a full one
        import torch
        acc = self.trainer.accelerator
        t = torch.tensor([local], dtype=torch.int64, device=acc.device)
        # the ranks of one AutoTP / Ulysses group all count the same batches (Ulysses hands every
        # rank each whole batch of its group before slicing the sequences), so count one group once
        group = self.trainer.get_tp_size() * self.trainer.get_sp_size()
        return int(acc.reduce(t, reduction="sum").item()) // group

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs or "train_loss" in logs:
            return
        now = time.perf_counter()
        dt = now - self.t_prev - self._excluded
        self._excluded = 0.0
        local = self.trainer.pop_step_tokens()
        step_tokens = self._global_tokens(local)  # collective: every rank reaches this line
        state.num_input_tokens_seen += step_tokens
        tps = step_tokens / dt if dt > 0 else None
        rec = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
               "grad_norm": logs.get("grad_norm"), "tokens": int(state.num_input_tokens_seen),
               "step_tokens": step_tokens, "tokens_per_s": tps,
               "mfu": mfu(tps, self.fpt, self.peak, self.world), "step_time_s": dt,
               "elapsed_s": now - self.t0, "time": time.time(), "epoch": state.epoch}
        rec.update(memory_now(self.on_cuda))
        # what the method logs besides the loss (TRL: rewards/margins, rewards/accuracies, kl, reward,
        # completions/mean_length, ...), under its own names
        extra = {k: v for k, v in logs.items() if k not in _TRAINER_KEYS and isinstance(v, (int, float))}
        for k, v in extra.items():
            rec[k if k not in rec else f"method/{k}"] = v
        self.records.append(rec)
        if self.is_main:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
            if self._started:
                self._track(tracker_scalars(rec, extra), rec["step"])
        self.t_prev = time.perf_counter()


def tracker_scalars(rec: dict, extra: dict) -> dict[str, float]:
    """The scalars of a step record under the trackers' names (train/*, memory/*, method/*)."""
    out = {f"train/{k}": rec[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens")
           if rec.get(k) is not None}
    out.update({f"memory/{k}": rec[k] for k in ("mem_allocated", "mem_reserved", "mem_max_allocated", "rss")
                if k in rec})
    out.update({f"method/{k}": v for k, v in extra.items()})
    return out


class StopCallback(TrainerCallback):
    """Stop at ``steps.stop_after_steps`` after saving a checkpoint there; the LR schedule still
    spans max_steps, so a resumed run continues the same curve."""

    def __init__(self, stop_after: int):
        self.stop_after = stop_after

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.stop_after:
            log.info("stop_after_steps=%d reached: saving a checkpoint and stopping", self.stop_after)
            control.should_save = True
            control.should_training_stop = True
        return control


class SaveTimer:
    """Test hook: FORGELAB_SAVE_DELAY_S makes a save wait between writing and publishing (only
    the save at step FORGELAB_SAVE_DELAY_STEP when that is set), so a test can kill the process
    while a checkpoint is unfinished."""

    @staticmethod
    def delay(step: int) -> None:
        d = float(os.environ.get("FORGELAB_SAVE_DELAY_S", "0") or 0)
        only = os.environ.get("FORGELAB_SAVE_DELAY_STEP")
        if d > 0 and (not only or int(only) == step):
            log.warning("FORGELAB_SAVE_DELAY_S=%s: pausing inside the checkpoint save (test hook)", d)
            time.sleep(d)
