"""One training session on one rank: the Trainer subclass and the run around it.

``run_session`` builds the TrainingArguments (which start the process group), prepares the run
dir (rank 0), loads or builds the model, trains with ``ForgeTrainer`` and writes the final
model and ``train_summary.json``. What the stock Trainer does is left to it; the subclass adds:

- AdamW parameter groups without decay on norms, biases and embeddings
- host-side token counting (collators pass a plain int per batch; no device sync)
- phase timers and profiler ranges for the profile track
- atomic checkpoints: save into a staging dir, publish by rename once every rank finished,
  then keep the newest ``checkpoint.keep_last``
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..model import base_model
from ..runs import Run, read_json, write_json
from . import checkpoint as ckpt
from .callbacks import MetricsCallback, SaveTimer, StopCallback, read_metrics, truncate_metrics
from .data import SLOTS_KEY, TOKENS_KEY, CPTCollator, SFTCollator, attention_span, open_dataset
from .flops import count_model, flops_per_token, mfu, peak_flops
from .optim import decay_parameter_names, optimizer_name, scheduler_args
from ..prof.kernels import kernel_breakdown, trace_events
from .profiling import ProfilerCallback, StepTimers, comms_from_trace

log = logging.getLogger("forgelab.train")


# ----------------------------------------------------------------------------- the Trainer

class ForgeTrainer(Trainer):
    def __init__(self, *args, run_dir: Path, keep_last: int, timers: StepTimers, flops_per_token: float,
                 steady_skip: int = 0, loss_chunk: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk = loss_chunk
        self.steady_skip = steady_skip
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.timers = timers
        self.fpt = flops_per_token
        self.saved: list[dict] = []
        self._step_tokens = 0
        self.local_tokens = 0  # this rank's real and padded token slots over the session
        self.local_slots = 0
        self._staging: str | None = None
        self._micro_end = 0.0
        self.add_callback(_PhaseCallback(self))

    def pop_step_tokens(self) -> int:
        n, self._step_tokens = self._step_tokens, 0
        return n

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        with self.timers.time("data"):
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        for b in batches:
            n = int(b.pop(TOKENS_KEY, 0))
            self._step_tokens += n
            self.local_tokens += n
            self.local_slots += int(b.pop(SLOTS_KEY, n))
        return batches, n_items

    def _prepare_inputs(self, inputs):
        inputs.pop(TOKENS_KEY, None)  # evaluation batches reach here with the counts still in
        inputs.pop(SLOTS_KEY, None)
        return super()._prepare_inputs(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.timers.time("forward"):
            if self.loss_chunk and model.training and not return_outputs:
                from .chunked_loss import causal_lm_loss
                loss = causal_lm_loss(model, inputs, self.loss_chunk, num_items_in_batch)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * self.accelerator.num_processes  # as the stock compute_loss does
                return loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, *args, **kwargs):
        with self.timers.time("forward_backward"):
            loss = super().training_step(model, inputs, *args, **kwargs)
        self._micro_end = time.perf_counter()
        return loss

    def floating_point_ops(self, inputs) -> int:
        # the stock version walks all parameters on every micro-batch; the formula is cached
        return int(self.fpt * inputs["input_ids"].numel())

    # -- atomic checkpoints
    def _get_output_dir(self, trial=None) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        final = self.run_dir / f"{ckpt.PREFIX}{step}"
        staging = ckpt.staging_path(self.run_dir, step)
        t0 = time.perf_counter()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part into staging/checkpoint-N
        finally:
            self._staging = None
        if self.args.should_save:
            SaveTimer.delay(step)
        self.accelerator.wait_for_everyone()
        removed = []
        if self.args.should_save:
            ckpt.publish(staging, final)
            removed = ckpt.rotate(self.run_dir, self.keep_last)
        self.accelerator.wait_for_everyone()
        rec = {"step": step, "seconds": round(time.perf_counter() - t0, 3),
               "bytes": ckpt.dir_bytes(final) if self.args.should_save else None, "path": str(final)}
        self.saved.append(rec)
        log.info("checkpoint %s: %.2f s, %s bytes%s", final.name, rec["seconds"], rec["bytes"],
                 f" (removed {', '.join(removed)})" if removed else "")


class _PhaseCallback(TrainerCallback):
    """Optimizer time (clip + step: from the last micro-batch's end to after the step) and the
    step boundary for the phase timers."""

    def __init__(self, trainer: ForgeTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kw):
        t = self.trainer.timers
        if t.enabled:
            t._sync()
            t.add("optimizer", time.perf_counter() - self.trainer._micro_end)

    def on_step_end(self, args, state, control, **kw):
        self.trainer.timers.end_step(self.trainer.steady_skip)


# ----------------------------------------------------------------------------- setup

def _choose_precision(want: str, on_cuda: bool, notices: list[str]) -> str:
    if want == "auto":
        if on_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        notices.append("CPU: training in fp32 (precision auto; bf16/fp16 are GPU settings)")
        return "fp32"
    if want == "fp16" and not on_cuda:
        notices.append("CPU: fp16 mixed precision needs CUDA; training in fp32")
        return "fp32"
    if want == "bf16" and not on_cuda:
        notices.append("CPU: bf16 autocast on CPU (slow on most CPUs; GPUs are where bf16 pays)")
    return want


def _choose_attn(want: str, on_cuda: bool, notices: list[str]) -> str:
    if want == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available
        if not on_cuda or not is_torch_flex_attn_available():
            # PyTorch's CPU flex attention has no backward pass
            notices.append("flex_attention trains on CUDA only (torch has no CPU backward for it); using sdpa, "
                           "which builds the same block-diagonal mask from the position ids")
            return "sdpa"
    if want.startswith("flash_attention"):
        pkg = "flash_attn_interface" if want == "flash_attention_3" else "flash_attn"
        if not on_cuda or importlib.util.find_spec(pkg) is None:
            notices.append(f"{want} needs CUDA and the {pkg} package; using sdpa")
            return "sdpa"
    return want


def _choose_compile(want, on_cuda: bool, notices: list[str]) -> bool:
    if want == "cuda" and not on_cuda:
        notices.append("runtime.torch_compile is 'cuda': CPU runs eager (compiling pays off on GPUs)")
        return False
    return bool(want)


def _choose_loss_chunk(conf, model, world: int, notices: list[str]) -> int:
    n = conf.runtime.loss_chunk_tokens
    if not n:
        return 0
    base = base_model(model)
    head = getattr(base, "lm_head", None)
    why = None
    if world > 1:
        why = "it runs the decoder outside the DDP/DeepSpeed wrapper, so it needs one rank"
    elif conf.runtime.torch_compile and conf.runtime.compile_scope == "model":
        why = "the whole-model compile wraps the forward it bypasses; use runtime.compile_scope=blocks"
    elif head is None or getattr(head, "bias", None) is not None or not hasattr(base, "model") or \
            getattr(base.config, "final_logit_softcapping", None):
        why = "the model has no plain bias-free lm_head over base.model"
    if why:
        notices.append(f"runtime.loss_chunk_tokens is off: {why}")
        return 0
    return n


def _choose_liger(want: bool, on_cuda: bool, notices: list[str]) -> bool:
    if want and not on_cuda:
        notices.append("Liger kernels need CUDA (Triton); running without them")
        return False
    if want and importlib.util.find_spec("liger_kernel") is None:
        notices.append("runtime.liger_kernel is on but liger-kernel is not installed; running without it")
        return False
    return want


def apply_sdpa_backend(want: str, on_cuda: bool, notices: list[str]) -> str:
    """Pin PyTorch's SDPA kernel choice (process-wide flags, read when a graph is traced).
    cudnn and flash keep the memory-efficient kernel (flash) or math (cudnn) as the fallback
    for what they cannot run, such as the dense masks of packed rows under sdpa."""
    if want == "auto":
        return want
    if not on_cuda:
        notices.append(f"runtime.sdpa_backend {want} is a CUDA setting; CPU uses PyTorch's own choice")
        return "auto"
    b = torch.backends.cuda
    on = {"flash": ("flash", "efficient", "math"), "cudnn": ("cudnn", "math"),
          "efficient": ("efficient", "math"), "math": ("math",)}[want]
    b.enable_flash_sdp("flash" in on)
    b.enable_cudnn_sdp("cudnn" in on)
    b.enable_mem_efficient_sdp("efficient" in on)
    b.enable_math_sdp(True)
    return want


def decoder_blocks(model) -> torch.nn.ModuleList | None:
    """The decoder's layer list (through a peft wrapper too): the ModuleList as long as the
    config's num_hidden_layers."""
    base = base_model(model)
    n = getattr(base.config.get_text_config(), "num_hidden_layers", None)
    for m in base.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m
    return None


def compile_blocks(model, mode: str | None, notices: list[str]) -> int:
    """Regional compilation: each decoder block (all share one graph, so it compiles once) and
    the loss (fuses the logits' upcast, log-softmax and gather)."""
    blocks = decoder_blocks(model)
    if blocks is None:
        notices.append("runtime.compile_scope blocks: no decoder layer list found; compiling the whole model")
        model.compile(mode=mode)
        return 0
    for b in blocks:
        b.compile(mode=mode)
    base = base_model(model)
    base.loss_function = torch.compile(base.loss_function, mode=mode)
    return len(blocks)


def build_training_args(pre, on_cuda: bool, precision: str, liger: bool, notices: list[str]):
    from transformers import TrainingArguments

    conf = pre.conf
    rt, op, st = conf.runtime, conf.optim, conf.steps
    ds = None
    offload = False
    if pre.ds_config is not None:
        ds = json.loads(json.dumps(pre.ds_config))
        zero = ds.get("zero_optimization", {})
        offload = "offload_optimizer" in zero or "offload_param" in zero
        if offload and "optimizer" not in ds:
            # the Trainer's torch AdamW steps the offloaded fp32 master copy on the host
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
    fsdp = conf.backend == "fsdp"
    fsdp_config = dict(conf.dist.fsdp_config) if fsdp else None
    if fsdp and not on_cuda:
        # accelerate wraps FSDP only on accelerators; say so instead of letting it fall back silently
        notices.append("CPU: accelerate runs FSDP on GPUs only; backend fsdp runs as DDP (gloo) here")
        fsdp, fsdp_config = False, None
    sched, sched_kw = scheduler_args(op.scheduler, op.min_lr_ratio)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kw = dict(
        output_dir=str(pre.run_dir), max_steps=st.max_steps, per_device_train_batch_size=st.micro_batch_size,
        gradient_accumulation_steps=st.grad_accum, learning_rate=op.lr, lr_scheduler_type=sched,
        lr_scheduler_kwargs=sched_kw, warmup_steps=op.warmup_steps, weight_decay=op.weight_decay,
        adam_beta1=op.beta1, adam_beta2=op.beta2, adam_epsilon=op.eps, max_grad_norm=op.max_grad_norm,
        optim=optimizer_name(op.fused, on_cuda, offload),
        bf16=precision == "bf16", fp16=precision == "fp16", tf32=(rt.tf32 if on_cuda else None),
        activation_checkpointing=rt.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if rt.gradient_checkpointing else None,
        torch_compile=rt.torch_compile and rt.compile_scope == "model", torch_compile_mode=rt.compile_mode,
        use_liger_kernel=liger, liger_kernel_config=(rt.liger_kernel_config or None) if liger else None,
        logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False, report_to="none",
        disable_tqdm=False, include_num_input_tokens_seen="no", skip_memory_metrics=True,
        save_strategy="steps" if conf.checkpoint.every_steps else "no",
        save_steps=conf.checkpoint.every_steps or 500, save_total_limit=None,
        save_on_each_node=conf.checkpoint.save_on_each_node,
        eval_strategy="steps" if conf.eval.every_steps else "no", eval_steps=conf.eval.every_steps or None,
        per_device_eval_batch_size=conf.eval.batch_size, prediction_loss_only=True,
        seed=conf.seed, dataloader_num_workers=conf.data.num_workers,
        dataloader_pin_memory=conf.data.pin_memory and on_cuda,
        dataloader_persistent_workers=conf.data.persistent_workers and conf.data.num_workers > 0,
        dataloader_prefetch_factor=conf.data.prefetch_factor if conf.data.num_workers > 0 else None,
        dataloader_drop_last=True, remove_unused_columns=False,
        use_cpu=not on_cuda, ddp_backend="gloo" if (not on_cuda and world > 1) else None,
        ddp_find_unused_parameters=conf.dist.find_unused_parameters,
        ddp_bucket_cap_mb=conf.dist.bucket_cap_mb, ddp_timeout=conf.dist.timeout_s,
        deepspeed=ds, fsdp=True if fsdp else None, fsdp_config=fsdp_config,
    )
    args = TrainingArguments(**kw)
    _ = args.device  # starts the process group now, before the model loads
    if on_cuda:
        # transformers sets TF32 through the new per-backend API only; inductor's matmul autotuning
        # (max-autotune) reads the legacy global setting, which then refuses the mix. One call sets both.
        torch.set_float32_matmul_precision("high" if rt.tf32 else "highest")
    if ds is not None:
        # ZeRO-3 partitions the model while it loads (zero.Init), which asks DeepSpeed's comm
        # layer for the world size; on CPU accelerate started plain torch.distributed instead
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
    return args


def prepare_run_dir(pre, is_main: bool) -> list[str]:
    """Rank 0: drop unfinished saves; when not resuming (and overwrite is on), clear old outputs."""
    if not is_main:
        return []
    from .entry import RUN_OUTPUTS
    done = [f"removed unfinished save {n}" for n in ckpt.clean_staging(pre.run_dir)]
    if pre.resume is None and pre.conf.checkpoint.overwrite and pre.run_dir.is_dir():
        for name in RUN_OUTPUTS:
            p = pre.run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
                done.append(f"cleared {name}/")
            elif p.exists():
                p.unlink()
                done.append(f"cleared {name}")
        for _, p in ckpt.complete_checkpoints(pre.run_dir):
            shutil.rmtree(p)
            done.append(f"cleared {p.name}")
        for p in pre.run_dir.glob("train_summary.step*.json"):
            p.unlink()
    elif pre.resume is not None and (pre.run_dir / "train_summary.json").is_file():
        # keep the interrupted/stopped session's summary next to the new one
        old = read_json(pre.run_dir / "train_summary.json")
        os.replace(pre.run_dir / "train_summary.json",
                   pre.run_dir / f"train_summary.step{old.get('steps', 'x')}.json")
    return done


def model_config(pre, tokenizer, notices: list[str]):
    """The transformers config of the model to train (pretrain: built from the preset/dict with
    the tokenizer's size and special tokens)."""
    from transformers import AutoConfig

    from ..config import ConfigError
    from ..runs import project_path
    if not pre.conf.random_init:
        return AutoConfig.from_pretrained(project_path(pre.conf.model.path))
    d = dict(pre.model_config)
    model_type = d.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(k, None)
    n_tok = len(tokenizer)
    if int(d.get("vocab_size") or 0) != n_tok:
        if int(d.get("vocab_size") or 0) > n_tok:
            n_tok = int(d["vocab_size"])  # a larger (e.g. padded) embedding is fine
        else:
            if d.get("vocab_size"):
                notices.append(f"model vocab_size {d['vocab_size']} < tokenizer size {n_tok}: set to {n_tok}")
        d["vocab_size"] = n_tok
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, k)
        d[k] = tokenizer.eos_token_id if tid is None and k == "pad_token_id" else tid
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"pretrain model config: {e}") from None


def build_model(pre, mc, on_cuda: bool, notices: list[str]):
    from transformers import AutoModelForCausalLM, GenerationConfig, set_seed

    from ..runs import project_path
    conf = pre.conf
    attn = _choose_attn(conf.model.attn_implementation, on_cuda, notices)
    if conf.random_init:
        if conf.task != "pretrain":
            notices.append(f"model.preset {conf.model.preset} without model.path: random-init weights (a "
                           "benchmark shape, not a fine-tune)")
        set_seed(conf.model.init_seed if conf.model.init_seed is not None else conf.seed)
        # random init straight on the GPU (seconds instead of minutes for billions of parameters
        # on the host); ZeRO-3 and FSDP place the weights themselves
        on_gpu_init = on_cuda and conf.backend in ("single", "ddp")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu_init else torch.device("cpu")
        with dev:
            model = AutoModelForCausalLM.from_config(mc, dtype=torch.float32, attn_implementation=attn)
        model.generation_config = GenerationConfig(bos_token_id=mc.bos_token_id, eos_token_id=mc.eos_token_id,
                                                   pad_token_id=mc.pad_token_id)
    else:
        model = AutoModelForCausalLM.from_pretrained(project_path(conf.model.path), dtype=torch.float32,
                                                     attn_implementation=attn)
    model.config.use_cache = False  # no KV cache while training
    if conf.task == "sft" and conf.sft.mode == "lora":
        from peft import LoraConfig, get_peft_model
        lc = conf.lora
        set_seed(conf.seed)  # adapter init
        model = get_peft_model(model, LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
            modules_to_save=lc.modules_to_save or None, bias="none", task_type="CAUSAL_LM"))
    return model


def memory_warning(estimate: dict, device_total: int) -> str | None:
    """A warning when the estimated device memory (allocator peak + reserve + CUDA context) does
    not fit the GPU; the run still starts (the estimate can be off, an out-of-memory error is clear)."""
    need = estimate.get("device_bytes") or 0
    if need <= device_total:
        return None
    return (f"{need / 2**30:.1f} GiB needed on a {device_total / 2**30:.1f} GiB GPU: expect out of memory; lower "
            "steps.micro_batch_size (raise steps.grad_accum to keep the global batch) or turn on "
            "runtime.gradient_checkpointing")


def estimate_shape(conf: dict, precision: str, seq_len: int, liger: bool) -> dict:
    """A train config (as a dict) with the keys the estimator reads by leaf name set to what the
    run resolves: precision, sequence length, packing, optimizer, method, kernels, weight dtype."""
    shape = dict(conf, runtime=dict(conf.get("runtime") or {}, precision=precision))
    lora = conf.get("task") == "sft" and (conf.get("sft") or {}).get("mode") == "lora"
    shape.update(seq_len=seq_len, drop_last=True, packing=True, optimizer="adamw_torch",
                 method="lora" if lora else "full", use_liger_kernel=liger, model_dtype="float32",
                 deepspeed=(conf.get("dist") or {}).get("deepspeed"))
    return shape


def run_estimate(pre, mc, precision: str, liger: bool, world: int) -> tuple[dict | None, str | None]:
    """The pre-flight memory/step estimate (forgelab.train.estimator), fed the resolved settings."""
    try:
        from .estimator import estimate_run
    except ImportError:
        return None, "forgelab.train.estimator is not available"
    from ..config import to_dict
    conf = pre.conf
    seq = pre.train.seq_len
    meta = pre.train.meta
    if pre.train.kind == "sft" and not meta.get("packed", True):
        # one sample per row, batches padded to their longest: the worst batch holds the longest sample
        longest = int((meta.get("sample_tokens") or {}).get("max") or seq)
        mult = conf.data.pad_to_multiple_of
        seq = min(seq, -(-longest // mult) * mult if mult else longest)
    shape = estimate_shape(to_dict(conf), precision, seq, liger)
    try:
        return estimate_run(shape, mc, pre.train.n_items, world), None
    except Exception as e:  # an estimator bug must not cost the training run; it is recorded
        return None, f"estimate failed: {type(e).__name__}: {e}"


def save_final(trainer: ForgeTrainer, pre, extra: dict) -> Path:
    """final/: weights (safetensors) or the LoRA adapter, tokenizer + chat template, generation
    config; written to a staging dir and renamed, like checkpoints."""
    final = pre.run_dir / "final"
    staging = pre.run_dir / f"{ckpt.STAGING}final"
    main = trainer.args.should_save
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank: ZeRO-3 gathers the weights collectively
    if main:
        model = trainer.accelerator.unwrap_model(trainer.model)
        gen = getattr(model, "generation_config", None)
        if gen is not None and not (staging / "generation_config.json").exists() and \
                not (staging / "adapter_config.json").exists():
            gen.save_pretrained(staging)
        (staging / "training_args.bin").unlink(missing_ok=True)
        write_json(staging / "forgelab_train.json", extra)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final


def _all_reduce_max(value: int, device) -> int:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _peak_memory(on_cuda: bool, device) -> tuple[int, str]:
    if on_cuda:
        return _all_reduce_max(int(torch.cuda.max_memory_allocated()), device), \
            "cuda max_memory_allocated (max over ranks)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return _all_reduce_max(int(rss), device), "peak RSS of a rank process (max over ranks)"


def _rate(records: list[dict]) -> float | None:
    secs = sum(r["step_time_s"] for r in records)
    return sum(r["step_tokens"] for r in records) / secs if records and secs > 0 else None


# ----------------------------------------------------------------------------- the session

def run_session(pre, plan_info: dict | None = None) -> int:
    from transformers import AutoTokenizer

    conf = pre.conf
    plan_info = plan_info or {}
    on_cuda = torch.cuda.is_available()
    notices = list(pre.notices)
    if conf.runtime.threads:
        torch.set_num_threads(conf.runtime.threads)
    precision = _choose_precision(conf.runtime.precision, on_cuda, notices)
    liger = _choose_liger(conf.runtime.liger_kernel, on_cuda, notices)
    conf.runtime.torch_compile = _choose_compile(conf.runtime.torch_compile, on_cuda, notices)  # resolved, recorded
    tokenizer = AutoTokenizer.from_pretrained(pre.tokenizer_dir)
    mc = model_config(pre, tokenizer, notices)
    # before the TrainingArguments exist: under ZeRO-3 they turn every model build into a
    # partitioned one, the estimator's meta-device model included
    estimate, est_note = run_estimate(pre, mc, precision, liger, int(os.environ.get("WORLD_SIZE", "1")))
    args = build_training_args(pre, on_cuda, precision, liger, notices)
    world, rank = args.world_size, args.process_index
    is_main = rank == 0
    lora = conf.task == "sft" and conf.sft.mode == "lora"
    try:
        cleaned = prepare_run_dir(pre, is_main)
        if world > 1:
            torch.distributed.barrier()
        with Run("train", conf, pre.run_name, summary_name="train_summary.json", rank=rank) as run:
            run.data_fingerprint = pre.train.data_fingerprint
            run.tokenizer_fingerprint = pre.tokenizer_fp
            # what the run is, so that a failed run's summary says it too; the end adds the rest
            rt = conf.runtime
            run.summary.update({
                "command": os.environ.get("FORGELAB_COMMAND"), "task": conf.task, "track": conf.track,
                "backend": conf.backend, "world_size": world, "micro_batch_size": conf.steps.micro_batch_size,
                "grad_accum": conf.steps.grad_accum, "seq_len": pre.train.seq_len, "precision": precision,
                "gradient_checkpointing": rt.gradient_checkpointing, "torch_compile": rt.torch_compile,
                "compile_scope": rt.compile_scope if rt.torch_compile else None,
                "attn_implementation": conf.model.attn_implementation, "sdpa_backend": rt.sdpa_backend,
                "liger_kernel": liger, "estimate": {"predicted": estimate}})
            for c in cleaned:
                run.log.info("%s", c)
            run.log.info("%s | task %s, track %s, backend %s, %d rank(s), %s, %s", pre.resume_msg, conf.task,
                         conf.track, conf.backend, world, "cuda" if on_cuda else "cpu", precision)
            if est_note:
                run.log.warning("pre-flight estimate: %s", est_note)
            if estimate:
                run.log.info("pre-flight estimate: peak %.2f GiB, %s steps",
                             estimate.get("peak_memory_bytes", 0) / 2**30, estimate.get("steps"))
                if on_cuda:
                    warn = memory_warning(estimate, torch.cuda.get_device_properties(args.device).total_memory)
                    if warn:
                        run.log.warning("pre-flight estimate: %s", warn)
            model = build_model(pre, mc, on_cuda, notices)
            sdpa = apply_sdpa_backend(conf.runtime.sdpa_backend, on_cuda, notices)
            if conf.runtime.torch_compile and conf.runtime.compile_scope == "blocks":
                n_compiled = compile_blocks(model, conf.runtime.compile_mode, notices)
                if n_compiled:
                    run.log.info("torch.compile: %d decoder blocks + the loss (regional)", n_compiled)
            loss_chunk = _choose_loss_chunk(conf, model, world, notices)
            for n in notices:
                run.log.warning("notice: %s", n)
            counts = count_model(model, lora=lora)
            span = attention_span(pre.train)
            fpt = flops_per_token(counts, span, lora=lora)
            dev_name = torch.cuda.get_device_name(0) if on_cuda else None
            peak, peak_src = peak_flops(conf.metrics.peak_flops, dev_name, precision)
            run.log.info("model %s: %.1fM params (%.1fM trainable), %.3g FLOPs/token, attention span %.0f",
                         pre.model_source, counts.params / 1e6, counts.trainable_params / 1e6, fpt, span)

            train_ds = open_dataset(pre.train)
            eval_ds = open_dataset(pre.eval) if pre.eval else None
            if pre.train.kind == "sft":
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                pad = int(pre.train.meta.get("pad_token_id", pad))
                collator = SFTCollator(pad, conf.data.pad_to_multiple_of)
            else:
                collator = CPTCollator()
            timers = StepTimers(enabled=conf.profile.enabled and conf.profile.time_split, on_cuda=on_cuda)
            trainer = ForgeTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                   data_collator=collator, processing_class=tokenizer, run_dir=pre.run_dir,
                                   keep_last=conf.checkpoint.keep_last, timers=timers, flops_per_token=fpt,
                                   steady_skip=conf.metrics.steady_skip_steps, loss_chunk=loss_chunk)

            resume_info = None
            resume_step = 0
            if pre.resume is not None:
                st = read_json(pre.resume / ckpt.MARKER)
                resume_step = int(st["global_step"])
                resume_info = {"from_checkpoint": str(pre.resume), "step": resume_step,
                               "tokens": int(st.get("num_input_tokens_seen", 0))}
                if is_main:
                    kept = truncate_metrics(pre.run_dir / "metrics.jsonl", resume_step)
                    truncate_metrics(pre.run_dir / "eval_metrics.jsonl", resume_step)
                    run.log.info("metrics.jsonl: kept %d step records up to step %d", kept, resume_step)
            metrics_cb = MetricsCallback(trainer, pre.run_dir, is_main=is_main, world=world,
                                         tokens_vary=pre.train.kind == "sft", flops_per_token=fpt, peak_flops=peak,
                                         on_cuda=on_cuda, tensorboard=conf.metrics.tensorboard,
                                         resume_step=resume_step)
            trainer.add_callback(metrics_cb)
            if conf.steps.stop_after_steps:
                trainer.add_callback(StopCallback(conf.steps.stop_after_steps))
            prof_cb = None
            if conf.profile.enabled:
                prof_cb = ProfilerCallback(conf.profile, pre.run_dir / "profile", rank, on_cuda, metrics_cb)
                trainer.add_callback(prof_cb)
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()

            t0 = time.time()
            try:
                trainer.train(resume_from_checkpoint=str(pre.resume) if pre.resume else None)
            finally:
                metrics_cb.close()
                if prof_cb:
                    prof_cb.stop()
            train_seconds = time.time() - t0
            stopped_early = trainer.state.global_step < conf.steps.max_steps

            final_dir = None
            if conf.checkpoint.save_final and not stopped_early:
                final_dir = save_final(trainer, pre, {
                    "task": conf.task, "sft_mode": conf.sft.mode if conf.task == "sft" else None,
                    "base_model": conf.model.path, "tokenizer": str(pre.tokenizer_dir), "run": pre.run_name,
                    "steps": trainer.state.global_step, "data_fingerprint": pre.train.data_fingerprint,
                    "tokenizer_fingerprint": pre.tokenizer_fp})
                run.log.info("final model -> %s", final_dir)
            peak_mem, mem_measure = _peak_memory(on_cuda, args.device)

            recs = metrics_cb.records
            skip = conf.metrics.steady_skip_steps
            steady = recs[skip:] if len(recs) > skip else []
            tps_mean, tps_steady = _rate(recs), _rate(steady)
            curve = read_metrics(pre.run_dir / "metrics.jsonl") if is_main else recs
            losses = [r["loss"] for r in curve if r.get("loss") is not None]
            global_batch = conf.steps.micro_batch_size * conf.steps.grad_accum * world
            steps_done = len(recs)
            tokens_step_mean = sum(r["step_tokens"] for r in recs) / steps_done if steps_done else None
            if estimate is not None:
                est = {"predicted": estimate,
                       "measured": {"peak_memory_bytes": peak_mem, "peak_memory_measure": mem_measure,
                                    "steps": trainer.state.global_step},
                       "peak_memory_ratio": (peak_mem / estimate["peak_memory_bytes"]
                                             if estimate.get("peak_memory_bytes") else None)}
            else:
                est = {"predicted": None, "note": est_note}
            run.summary.update({
                # command, task, track, backend, batch and the requested speed settings are in
                # already (set when the run started); the applied attention and SDPA kernels replace them
                "sft_mode": conf.sft.mode if conf.task == "sft" else None, "nodes": pre.nnodes, "device": {"type": "cuda" if on_cuda else "cpu", "name": dev_name,
                                                "count": world},
                "attn_implementation": model.config.get_text_config()._attn_implementation
                if hasattr(model.config, "get_text_config") else None,
                "compile_mode": conf.runtime.compile_mode if conf.runtime.torch_compile else None,
                "sdpa_backend": sdpa, "loss_chunk_tokens": loss_chunk,
                "liger_kernel_config": conf.runtime.liger_kernel_config if liger else None,
                "fused_adamw": args.optim.value if hasattr(args.optim, "value") else str(args.optim),
                "dataloader_workers": conf.data.num_workers,
                "model": {"name": Path(conf.model.path).name if conf.model.path else
                          (conf.model.preset or "custom"), "source": pre.model_source, **counts.as_dict()},
                "data": {"train": str(pre.train.path), "kind": pre.train.kind, "items": pre.train.n_items,
                         "seq_len": pre.train.seq_len, "data_fingerprint": pre.train.data_fingerprint,
                         "tokenizer_fingerprint": pre.train.tokenizer_fingerprint,
                         "eval": str(pre.eval.path) if pre.eval else None},
                "tokenizer_fingerprint": pre.tokenizer_fp,
                "attention_span": span, "global_batch": global_batch, "tokens_per_step": tokens_step_mean,
                "tokens_per_step_capacity": global_batch * pre.train.seq_len,
                "padding_waste": (1 - trainer.local_tokens / trainer.local_slots) if trainer.local_slots else None,
                "padding_waste_note": "1 - real tokens / token slots of the batches rank 0 trained on",
                "steps": trainer.state.global_step, "max_steps": conf.steps.max_steps,
                "steps_this_session": steps_done, "stopped_early": stopped_early,
                "tokens": int(trainer.state.num_input_tokens_seen),
                "tokens_per_s_mean": tps_mean, "tokens_per_s_steady": tps_steady,
                "steady_skip_steps": skip, "steady_steps": len(steady),
                "flops_per_token": fpt, "flops_formula": "lora: 4*(N_nonemb+N_head) + 6*N_lora + 12*L*A*S" if lora
                else "6*(N_nonemb+N_head) + 12*L*A*S",
                "peak_flops": peak, "peak_flops_source": peak_src,
                "mfu_mean": mfu(tps_mean, fpt, peak, world), "mfu_steady": mfu(tps_steady, fpt, peak, world),
                "peak_memory_bytes": peak_mem, "peak_memory_measure": mem_measure,
                "checkpoints": trainer.saved, "resume": resume_info,
                "final_loss": losses[-1] if losses else None, "best_loss": min(losses) if losses else None,
                "loss_curve": "metrics.jsonl", "tensorboard": "tb" if conf.metrics.tensorboard else None,
                "final_model": str(final_dir) if final_dir else None,
                "train_seconds": round(train_seconds, 3), "estimate": est, "notices": notices,
                **({"plan": plan_info} if plan_info else {}),
            })
            if prof_cb is not None and is_main:
                _write_profile_summary(pre, prof_cb, timers, fpt, tokens_step_mean, world, run)
            run.log.info("done: %d steps, final loss %s, %.1f tokens/s steady, peak memory %.2f GiB",
                         trainer.state.global_step, run.summary["final_loss"], tps_steady or tps_mean or 0,
                         peak_mem / 2**30)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            # without this, torchrun sometimes aborts at exit (gloo)
            on_nccl = dist.get_backend() == "nccl"
            dist.barrier(device_ids=[torch.cuda.current_device()] if on_nccl else None)
            dist.destroy_process_group()
    return 0


def _write_profile_summary(pre, prof_cb: ProfilerCallback, timers: StepTimers, fpt: float,
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
    write_json(pre.run_dir / "profile_summary.json", body)
    run.summary["profile_summary"] = "profile_summary.json"
    run.log.info("profile summary -> %s", pre.run_dir / "profile_summary.json")
