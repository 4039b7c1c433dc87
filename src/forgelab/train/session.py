"""One training session on one rank, top to bottom: resolve the runtime, estimate, build the
TrainingArguments (they start the process group), prepare the run dir, build the model and the
method's parts, train with ForgeTrainer (trainer.py says what runs in a step), save final/ and
write train_summary.json."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import config as cfg
from ..runs import Run, read_json
from . import checkpoint as ckpt
from . import runtime, summary, trackers
from .callbacks import MetricsCallback, StopCallback, truncate_metrics
from .data import CountingCollator, DigestCollator, attention_span
from .flops import count_model, peak_flops
from .hf_args import build_training_args
from .memory_check import memory_warning, run_estimate
from .model_build import build_model, build_reference, model_config
from .profiling import ProfilerCallback, StepTimers
from .graceful import GracefulStop
from .run_dir import disk_check, prepare_run_dir, save_final
from .trainer import trainer_class


@dataclass
class Session:
    """What the session resolved on the way; the summary reads it."""
    pre: Any
    rt: runtime.Runtime
    world: int = 1
    is_main: bool = True
    notices: list[str] = field(default_factory=list)
    plan_info: dict = field(default_factory=dict)
    estimate: dict | None = None
    est_note: str | None = None
    model: Any = None
    counts: Any = None
    span: float = 0.0
    fpt: float = 0.0
    peak: float | None = None
    peak_src: str = ""
    dev_name: str | None = None
    sdpa: str = "auto"
    loss_chunk: int = 0
    fp8_linears: int = 0
    resume_info: dict | None = None
    stopped_early: bool = False
    disk: dict | None = None
    tokens_step_mean: float | None = None
    seq_tokens_mean: float | None = None
    lengths: list[int] | None = None
    build_reference: Any = None

    @property
    def conf(self):
        return self.pre.conf

    @property
    def method(self):
        return self.pre.conf.method


def run_session(pre, plan_info: dict | None = None) -> int:
    from transformers import AutoTokenizer

    conf = pre.conf
    notices = list(pre.notices)
    rt = runtime.resolve(conf, notices)
    s = Session(pre=pre, rt=rt, notices=notices, plan_info=plan_info or {})
    tokenizer = AutoTokenizer.from_pretrained(pre.tokenizer_dir)
    if pre.chat_template is not None:
        tokenizer.chat_template = pre.chat_template  # the data's template: checkpoints and final/ save it
    mc = model_config(pre, tokenizer, notices)
    s.lengths = conf.method.sequence_lengths(pre, tokenizer)
    if s.lengths:  # text data: the longest sequence sizes the memory estimate (batches pad to their longest)
        pre.train.meta["sequence_tokens"] = {"max": max(s.lengths), "mean": sum(s.lengths) / len(s.lengths),
                                             "n": len(s.lengths)}
    # before the TrainingArguments exist: under ZeRO-3 they turn every model build into a
    # partitioned one, the estimator's meta-device model included
    s.estimate, s.est_note = run_estimate(pre, mc, rt, int(os.environ.get("WORLD_SIZE", "1")))
    args = build_training_args(pre, rt.on_cuda, rt.precision, rt.liger, notices)
    s.world, rank = args.world_size, args.process_index
    s.is_main = rank == 0
    rc = 0
    try:
        cleaned = prepare_run_dir(pre, s.is_main)
        if s.world > 1:
            torch.distributed.barrier()
        with Run("train", conf, pre.run_name, summary_name="train_summary.json", rank=rank) as run:
            run.data_fingerprint = pre.train.data_fingerprint
            run.tokenizer_fingerprint = pre.tokenizer_fp
            run.summary.update(summary.start_fields(s))
            for c in cleaned:
                run.log.info("%s", c)
            run.log.info("%s | task %s, track %s, backend %s, %d rank(s), %s, %s", pre.resume_msg, conf.task,
                         conf.track, conf.backend, s.world, "cuda" if rt.on_cuda else "cpu", rt.precision)
            _log_estimate(s, run, args)
            trainer, metrics_cb, prof_cb, timers = _build_trainer(s, run, args, tokenizer, mc)
            stop = GracefulStop(conf.checkpoint.grace_s, s.world)
            trainer.add_callback(stop)
            t0 = time.time()
            stop.install()
            try:
                trainer.train(resume_from_checkpoint=str(pre.resume) if pre.resume else None)
            finally:
                stop.uninstall()
                metrics_cb.close()
                if prof_cb:
                    prof_cb.stop()
            train_seconds = time.time() - t0
            s.stopped_early = trainer.state.global_step < conf.steps.max_steps
            if stop.stopped_at is not None and s.stopped_early:
                run.outcome = "interrupted"
                run.summary["interrupted"] = {"signal": stop.signal_name, "step": stop.stopped_at,
                                              "checkpoint": trainer.saved[-1]["path"] if trainer.saved else None}
                rc = stop.exit_code
            final_dir = None
            if conf.checkpoint.save_final and not s.stopped_early:
                final_dir = save_final(trainer, pre, {
                    "task": conf.task, **conf.method.summary(conf),
                    "base_model": conf.model.path, "tokenizer": str(pre.tokenizer_dir), "run": pre.run_name,
                    "steps": trainer.state.global_step, "data_fingerprint": pre.train.data_fingerprint,
                    "tokenizer_fingerprint": pre.tokenizer_fp})
                run.log.info("final model -> %s", final_dir)
            run.summary.update(summary.end_fields(s, trainer, metrics_cb, train_seconds, final_dir))
            if prof_cb is not None and s.is_main:
                summary.write_profile_summary(pre, prof_cb, timers, s.fpt, s.tokens_step_mean, s.world, run)
            run.log.info("done: %d steps, final loss %s, %.1f tokens/s steady, peak memory %.2f GiB",
                         trainer.state.global_step, run.summary["final_loss"],
                         run.summary["tokens_per_s_steady"] or run.summary["tokens_per_s_mean"] or 0,
                         run.summary["peak_memory_bytes"] / 2**30)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            # without this, torchrun sometimes aborts at exit (gloo)
            on_nccl = dist.get_backend() == "nccl"
            dist.barrier(device_ids=[torch.cuda.current_device()] if on_nccl else None)
            dist.destroy_process_group()
    return rc


def _log_estimate(s: Session, run, args) -> None:
    if s.est_note:
        run.log.warning("pre-flight estimate: %s", s.est_note)
    if s.estimate:
        run.log.info("pre-flight estimate: peak %.2f GiB, %s steps",
                     s.estimate.get("peak_memory_bytes", 0) / 2**30, s.estimate.get("steps"))
        if s.rt.on_cuda:
            warn = memory_warning(s.estimate, s.rt.memory_cap or
                                  torch.cuda.get_device_properties(args.device).total_memory)
            if warn:
                run.log.warning("pre-flight estimate: %s", warn)


def _build_trainer(s: Session, run, args, tokenizer, mc):
    """The model with the method's trainable parameters and the runtime's kernels, the data,
    the collator, the ForgeTrainer and its callbacks."""
    pre, conf, rt, method, notices = s.pre, s.conf, s.rt, s.method, s.notices
    s.model = model = build_model(pre, mc, rt.on_cuda, notices)
    fp8_head = bool(rt.fp8) and conf.runtime.fp8_lm_head
    if rt.fp8:  # before compile: the float8 casts are traced into the block graphs
        s.fp8_linears = runtime.apply_fp8(model, rt.fp8, fp8_head)
        run.log.info("fp8: %d Linear layers -> torchao Float8Linear (%s scaling); LM head %s", s.fp8_linears,
                     rt.fp8, "too" if fp8_head else "kept")
    s.sdpa = runtime.apply_sdpa_backend(conf.runtime.sdpa_backend, rt.on_cuda, notices)
    if conf.runtime.torch_compile and conf.runtime.compile_scope == "blocks":
        n_compiled = runtime.compile_blocks(model, conf.runtime.compile_mode, notices, head=fp8_head)
        if n_compiled:
            run.log.info("torch.compile: %d decoder blocks + the loss (regional)", n_compiled)
    s.loss_chunk = runtime.choose_loss_chunk(conf, model, s.world, notices)
    for n in notices:
        run.log.warning("notice: %s", n)
    s.counts = count_model(model, lora=method.trainable == "lora")
    lengths = s.lengths
    if lengths:  # text data: the span of the sequences TRL will build
        s.span = float(sum(n * n for n in lengths) / sum(lengths))
        s.seq_tokens_mean = sum(lengths) / len(lengths)
    else:
        s.span = attention_span(pre.train)
    s.fpt = method.flops_per_token(s.counts, s.span, conf)
    s.dev_name = torch.cuda.get_device_name(0) if rt.on_cuda else None
    s.peak, s.peak_src = peak_flops(conf.metrics.peak_flops, s.dev_name, rt.precision)
    if conf.checkpoint.disk_check and s.is_main:
        s.disk, warn = disk_check(pre, s.counts, method.trainable == "lora")
        if warn:
            run.log.warning("disk: %s", warn)
    run.log.info("model %s: %.1fM params (%.1fM trainable), %.3g FLOPs/token, attention span %.0f",
                 pre.model_source, s.counts.params / 1e6, s.counts.trainable_params / 1e6, s.fpt, s.span)

    timers = StepTimers(enabled=conf.profile.enabled and conf.profile.time_split, on_cuda=rt.on_cuda)
    s.build_reference = lambda: build_reference(pre, mc, rt.on_cuda)
    cls = trainer_class(method.trainer_base(conf))
    trainer = cls(model=model, args=args, processing_class=tokenizer, **method.trainer_parts(s, tokenizer),
                  run_dir=pre.run_dir, keep_last=conf.checkpoint.keep_last, timers=timers, flops_per_token=s.fpt,
                  steady_skip=conf.metrics.steady_skip_steps, loss_chunk=s.loss_chunk,
                  sample_log=pre.run_dir / "samples" / f"rank{args.process_index}.jsonl"
                  if conf.metrics.sample_digests else None)
    if not isinstance(trainer.data_collator, CountingCollator) and method.tokens_vary():
        trainer.data_collator = CountingCollator(trainer.data_collator)  # a TRL collator: count on the host
    if conf.metrics.sample_digests:
        trainer.data_collator = DigestCollator(trainer.data_collator)
    trainer.manifest_hash = conf.checkpoint.manifest
    resume_step = 0
    if pre.resume is not None:
        st = read_json(pre.resume / ckpt.MARKER)
        resume_step = int(st["global_step"])
        s.resume_info = {"from_checkpoint": str(pre.resume), "step": resume_step,
                         "tokens": int(st.get("num_input_tokens_seen", 0))}
        if pre.convert_from is not None:
            s.resume_info["converted_from"] = str(pre.convert_from)
        if s.is_main:
            kept = truncate_metrics(pre.run_dir / "metrics.jsonl", resume_step)
            truncate_metrics(pre.run_dir / "eval_metrics.jsonl", resume_step)
            run.log.info("metrics.jsonl: kept %d step records up to step %d", kept, resume_step)
        if trainer.sample_log is not None:  # every rank keeps its own record of what it trained on
            truncate_metrics(trainer.sample_log, resume_step)
    metrics_cb = MetricsCallback(trainer, pre.run_dir, is_main=s.is_main, world=s.world,
                                 flops_per_token=s.fpt, peak_flops=s.peak, on_cuda=rt.on_cuda,
                                 trackers=trackers.select(conf.metrics), params=cfg.to_dict(conf),
                                 run_name=pre.run_name, resume_step=resume_step)
    trainer.add_callback(metrics_cb)
    if conf.steps.stop_after_steps:
        trainer.add_callback(StopCallback(conf.steps.stop_after_steps))
    prof_cb = None
    if conf.profile.enabled:
        prof_cb = ProfilerCallback(conf.profile, pre.run_dir / "profile", int(args.process_index), rt.on_cuda,
                                   metrics_cb)
        trainer.add_callback(prof_cb)
    if rt.on_cuda:
        torch.cuda.reset_peak_memory_stats()
    return trainer, metrics_cb, prof_cb, timers
