"""The transformers TrainingArguments of a run (or the method's subclass of them, e.g. TRL's
DPOConfig, with the method's own fields), built from the lab's config and the resolved
runtime. Creating them starts the process group (torchrun / DeepSpeed ranks), so this runs
before the model loads; the DeepSpeed config is the file the backend names, with the one
change the lab needs (the Trainer's torch AdamW steps ZeRO-offloaded master weights)."""
from __future__ import annotations

import json
import os

import torch

from ..config import ConfigError
from .optim import optimizer_name, scheduler_args


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
        if conf.profile.enabled and conf.profile.deepspeed:
            from .ds_profilers import configure
            configure(ds, conf.profile, pre.run_dir)
        tp_section(ds, conf.dist.tensor_parallel, conf.dist.deepspeed)
    elif conf.profile.enabled and conf.profile.deepspeed:
        notices.append(f"profile.deepspeed: DeepSpeed's profilers run on the zero backends; backend {conf.backend} "
                       "has the lab's own profile only")
    fsdp = conf.backend == "fsdp"
    fsdp_config = dict(conf.dist.fsdp_config) if fsdp else None
    if fsdp and not on_cuda:
        # accelerate wraps FSDP only on accelerators; say so instead of letting it fall back silently
        notices.append("CPU: accelerate runs FSDP on GPUs only; backend fsdp runs as DDP (gloo) here")
        fsdp, fsdp_config = False, None
    sched, sched_kw = scheduler_args(op.scheduler, op.min_lr_ratio)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_model_parallel(pre, world)
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
        # the Trainer writes this into model.config: with a KV cache transformers drops the
        # packed-sequence mask, and packed SFT samples would attend to each other
        use_cache=False,
        use_cpu=not on_cuda, ddp_backend="gloo" if (not on_cuda and world > 1) else None,
        ddp_find_unused_parameters=conf.dist.find_unused_parameters,
        ddp_bucket_cap_mb=conf.dist.bucket_cap_mb, ddp_timeout=conf.dist.timeout_s,
        deepspeed=ds, fsdp=True if fsdp else None, fsdp_config=fsdp_config,
        parallelism_config=ulysses_config(pre),
    )
    method = conf.method
    extra = method.trl_args(conf)
    args_cls = method.args_class()
    if not issubclass(args_cls, TrainingArguments):
        raise TypeError(f"{args_cls.__name__} is not a TrainingArguments subclass")
    args = args_cls(**kw, **extra)
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


def tp_section(ds: dict, tp: int, ds_file: str) -> None:
    """dist.tensor_parallel as DeepSpeed AutoTP's size. The key is the one place the size is set:
    a JSON that names another autotp_size is refused rather than silently overridden. transformers
    reads it (integrations/deepspeed.py: deepspeed.tp_model_init before the engine starts) and
    accelerate builds the TP device mesh from it."""
    have = ds.get("tensor_parallel", {}).get("autotp_size")
    if have is not None and have != tp:
        raise ConfigError(f"key 'dist.tensor_parallel' is {tp} but {ds_file} sets tensor_parallel.autotp_size "
                          f"{have}; leave autotp_size out of the JSON and set dist.tensor_parallel")
    if tp > 1:
        ds["tensor_parallel"] = {**ds.get("tensor_parallel", {}), "autotp_size": tp}
        # accelerate gathers a TP-sharded model's weights for save_model only with this flag (named
        # for ZeRO-3, read for AutoTP too); without it final/ held no weights, only global_stepN/
        zero = ds.setdefault("zero_optimization", {})
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise ConfigError(f"key 'dist.tensor_parallel' is {tp} but {ds_file} sets zero_optimization."
                              "stage3_gather_16bit_weights_on_model_save false: the final model would hold no "
                              "weights; remove it")
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def check_model_parallel(pre, world: int) -> None:
    """What only the ranks know: the world size, the data's sequence length and the model's heads
    must divide by the tensor/sequence-parallel size (else DeepSpeed fails later, mid-setup)."""
    d = pre.conf.dist
    text = pre.model_config.get("text_config") or pre.model_config
    for key, n in (("dist.tensor_parallel", d.tensor_parallel), ("dist.sequence_parallel", d.sequence_parallel)):
        if n == 1:
            continue
        if world % n:
            raise ConfigError(f"key '{key}' = {n} does not divide the world size {world} (dist.nproc_per_node "
                              "x nodes); the data-parallel size is world / this")
        heads, kv = text.get("num_attention_heads"), text.get("num_key_value_heads") or text.get("num_attention_heads")
        # AutoTP shards the key/value heads; Ulysses may instead replicate fewer kv heads than ranks
        kv_ok = not kv or kv % n == 0 or key == "dist.sequence_parallel" and n % kv == 0
        if heads and heads % n or not kv_ok:
            raise ConfigError(f"key '{key}' = {n}: the model has {heads} attention heads and {kv} key/value heads; "
                              "both must divide by it" + (" (or the key/value heads divide it)"
                                                          if key == "dist.sequence_parallel" else ""))
    sp = d.sequence_parallel
    if sp > 1 and pre.train.seq_len % sp:
        raise ConfigError(f"key 'dist.sequence_parallel' = {sp} does not divide the data's sequence length "
                          f"{pre.train.seq_len}: Ulysses splits every sequence into equal shards")


def ulysses_config(pre):
    """dist.sequence_parallel > 1: accelerate's ParallelismConfig for DeepSpeed Ulysses/ALST. The
    Trainer then wraps the DataLoader in DeepSpeed's UlyssesSPDataLoaderAdapter (every rank of the
    group gets a slice of each sequence) and computes the loss with deepspeed_sp_compute_loss."""
    sp = pre.conf.dist.sequence_parallel
    if sp == 1:
        return None
    from accelerate.utils import ParallelismConfig
    from accelerate.utils.dataclasses import DeepSpeedSequenceParallelConfig
    return ParallelismConfig(sp_backend="deepspeed", sp_size=sp, sp_handler=DeepSpeedSequenceParallelConfig(
        sp_seq_length=pre.train.seq_len, sp_seq_length_is_variable=False,
        sp_attn_implementation=pre.conf.model.attn_implementation))
