"""Pre-flight estimate of a training run: peak GPU memory per device and optimizer steps.

Every term is explicit so that a measured run can be compared term by term, and every
constant is a knob (`Knobs`, or a `estimate:` section of the training config).

Memory per GPU (bytes), where P = all parameters, Pt = trainable parameters, N = ranks
sharing the ZeRO/FSDP partition:

  weights        P  x param bytes       (/N under ZeRO-3/FSDP; on the host with param offload)
  master         Pt x 4                 (fp32 copy kept by DeepSpeed's optimizer when params are
                                         bf16/fp16; /N under ZeRO>=1; host with optimizer offload)
  gradients      Pt x grad bytes        (/N under ZeRO>=2/FSDP); held during the forward only
                                         when accumulating (grad_accum > 1) - a single micro
                                         step starts with grads set to None
  optimizer      Pt x state bytes       (AdamW: 2 states of the param dtype, fp32 under DeepSpeed;
                                         /N under ZeRO>=1; host with optimizer offload)
  activations    saved-for-backward tensors, per layer and token (formula in `layer_activations`);
                 with gradient checkpointing each layer's input, plus one recomputed layer
  logits         the loss on [tokens, vocab]: logits are upcast to fp32, log_softmax keeps its
                 fp32 output for backward, and its backward holds that output, the incoming
                 grad and the outgoing grad at once: 12 bytes per logit at the peak
  autocast       bf16 copies of fp32 weights, kept by the graph until their layer's backward
  buffers        DDP gradient buckets, ZeRO reduce/all-gather buckets, ZeRO-3 gathered params
  workspace      cuBLAS workspace and small allocator slack

The peak is the largest phase: loss backward (all activations + logits buffers), layer
recompute (checkpointing: the logits buffers are gone, one layer is live again), end of
backward (all gradients) and the optimizer step.

`peak_memory_bytes` predicts `torch.cuda.max_memory_allocated()`. `device_bytes` adds the
CUDA context (outside the allocator) and allocator reservation overhead, i.e. what nvidia-smi
shows.

Steps: micro batches per rank per epoch = ceil(items / (micro_batch x world_size)) (the HF
Trainer keeps the last partial batch), optimizer steps per epoch = ceil(that / accumulation);
with `drop_last` both are floors (items // (micro x world x accumulation)). max_steps > 0 wins.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ..config import ConfigError

GiB = 2**30
MiB = 2**20

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "half": 2, "float": 4}


@dataclasses.dataclass
class Knobs:
    """Tunable constants of the estimate (a `estimate:` section of a train config sets them)."""
    logits_bytes_per_element: float = 12.0   # fp32 logprobs + its grad + grad of logits at loss backward
    keep_logits_output: bool = False         # a loop that holds the model output during backward: + logits in act dtype
    activation_scale: float = 1.0            # multiplies the saved-activation formula (calibration)
    cuda_context_bytes: int = 600 * MiB      # CUDA context + kernels, outside the allocator (device_bytes only)
    workspace_bytes: int = 64 * MiB          # cuBLAS workspaces and small allocations inside the allocator
    reserved_overhead: float = 0.05          # allocator reserved / allocated (device_bytes only)
    ddp_bucket_copy: bool = True             # DDP keeps a bucket copy of the gradients (gradient_as_bucket_view=False)
    dropout_mask_bytes: float = 1.0          # LoRA dropout mask per element: 1 (CUDA fused bool mask); CPU keeps a mask in the input dtype
    optimizer_step_extra: float = 0.0        # transient bytes per trainable param during the step (fused AdamW: ~0)
    autocast: bool | None = None             # None: autocast when precision is bf16/fp16 (HF Trainer / accelerate)
    params_in_half: bool | None = None       # None: read the config; bf16 weights vs fp32 master + autocast
    sdpa_native_gqa: bool | None = None      # None: True unless the batch is padded (mask -> repeat_kv)
    steps_rounding: str = "auto"             # auto (drop_last -> floor, else ceil) | floor | ceil
    # torch.compile (full training, no checkpointing): inductor's partitioner recomputes cheap pointwise
    # work in backward instead of saving it, and the compiled loss keeps no fp32 logits. Fitted on six
    # H200 runs (0.6B and 1.7B shapes x micro batch 4, 8, 16, regional compile): both exact to 0.1%.
    compiled_activation_scale: float = 0.564
    compiled_logits_bytes_per_element: float = 6.22


# ----------------------------------------------------------------------------- reading configs

# sections read on their own, never searched for training keys
_OWN_SECTIONS = ("deepspeed", "ds_config", "deepspeed_config", "estimate", "fsdp_config")


def _flatten(obj: Any, prefix: str = "", out: dict | None = None, depth: int = 0,
             skip: tuple[str, ...] = ()) -> dict:
    """Dotted-key view of a dataclass / namespace / dict config (the schema may change)."""
    out = {} if out is None else out
    if depth > 6:
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif hasattr(obj, "__dict__") and not isinstance(obj, (str, bytes, int, float, bool)):
        items = [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]
    else:
        return out
    for k, v in items:
        key = f"{prefix}{k}"
        if k in skip:
            continue
        if dataclasses.is_dataclass(v) or isinstance(v, dict) or (
                hasattr(v, "__dict__") and not isinstance(v, (str, bytes, int, float, bool, list))):
            _flatten(v, key + ".", out, depth + 1, skip)
        else:
            out[key] = v
    return out


class _Reader:
    """Finds a value by its leaf name anywhere in the config (shallowest match wins) and
    records where each value came from, for the `assumptions` list."""

    def __init__(self, conf: Any):
        self.flat = _flatten(conf, skip=_OWN_SECTIONS) if conf is not None else {}
        self.notes: list[str] = []

    def get(self, names: tuple[str, ...], default: Any, what: str) -> Any:
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        for name in names:
            hits = [k for k in self.flat if k == name or k.endswith("." + name)]
            # "auto" and other unresolved values do not count for a number
            hits = [k for k in hits if self.flat[k] is not None and not (
                numeric and not isinstance(self.flat[k], (int, float)))]
            if hits:
                key = min(hits, key=lambda k: (k.count("."), k))
                self.notes.append(f"{what} = {self.flat[key]!r} (from {key})")
                return self.flat[key]
        self.notes.append(f"{what} = {default!r} (default, no key found)")
        return default


@dataclasses.dataclass
class TrainShape:
    """The training settings the estimate depends on, normalized."""
    micro_batch: int = 1
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0
    seq_len: int = 2048
    precision: str = "bf16"          # compute dtype: bf16 | fp16 | fp32
    params_in_half: bool = True      # weights stored in bf16/fp16 (else fp32 + autocast)
    gradient_checkpointing: bool = False
    lora: dict | None = None         # {"r", "targets", "dropout", "dtype"} or None (full)
    backend: str = "single"          # single | ddp | fsdp | zero2 | zero3_offload | ...
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    optimizer: str = "adamw"
    attention: str = "sdpa"          # sdpa | flash_attention_2 | eager
    padded: bool = False             # batches carry an attention mask (no packing)
    kernels: str = "eager"           # eager | liger | compiled (torch.compile; calibrated for full training)
    drop_last: bool = False
    ds: dict = dataclasses.field(default_factory=dict)


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on", "cpu", "nvme")
    return bool(v)


def _compiled(v: Any) -> bool:
    # "cuda" (compile on GPUs) counts: the estimate is for the GPU run
    return str(v).lower() == "cuda" or _as_bool(v)


def _find(conf: Any, names: tuple[str, ...], depth: int = 0) -> Any:
    """The first value (of any type) stored under one of these names, shallowest first."""
    if conf is None or depth > 6:
        return None
    if dataclasses.is_dataclass(conf) and not isinstance(conf, type):
        items = {f.name: getattr(conf, f.name) for f in dataclasses.fields(conf)}
    elif isinstance(conf, dict):
        items = conf
    else:
        return None
    for n in names:
        if items.get(n) is not None:
            return items[n]
    for v in items.values():
        found = _find(v, names, depth + 1)
        if found is not None:
            return found
    return None


def _load_ds_config(v: Any) -> dict:
    if isinstance(v, dict):
        return v
    if isinstance(v, (str, Path)) and str(v):
        from ..runs import project_path
        p = project_path(v)
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
    return {}


def read_train_shape(train_conf: Any, knobs: Knobs | None = None) -> tuple[TrainShape, list[str]]:
    """Normalize a training config (any schema: dataclass, dict, namespace) into a TrainShape."""
    r = _Reader(train_conf)
    s = TrainShape()
    s.micro_batch = int(r.get(("per_device_batch_size", "per_device_train_batch_size", "micro_batch_size",
                               "micro_batch", "batch_size"), 1, "micro batch per device"))
    s.grad_accum = int(r.get(("gradient_accumulation_steps", "grad_accum", "accumulation_steps",
                              "gradient_accumulation"), 1, "gradient accumulation"))
    s.epochs = float(r.get(("epochs", "num_train_epochs", "num_epochs"), 1.0, "epochs"))
    s.max_steps = int(r.get(("max_steps", "total_steps"), 0, "max_steps") or 0)
    s.seq_len = int(r.get(("seq_len", "max_seq_len", "max_length", "block_size", "sequence_length",
                           "cutoff_len", "max_seq_length"), 2048, "sequence length"))
    prec = r.get(("precision", "mixed_precision", "compute_dtype"), None, "precision")
    if prec is None:
        if _as_bool(r.get(("bf16",), False, "bf16 flag")):
            prec = "bf16"
        elif _as_bool(r.get(("fp16",), False, "fp16 flag")):
            prec = "fp16"
        else:
            prec = r.get(("dtype",), "bf16", "dtype")
    prec = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "no": "fp32",
            "float": "fp32", "half": "fp16"}.get(str(prec).lower(), str(prec).lower())
    if prec not in ("bf16", "fp16", "fp32"):
        prec = "bf16"
    s.precision = prec
    model_dtype = r.get(("model_dtype", "torch_dtype", "load_dtype", "param_dtype", "weights_dtype"),
                        None, "weights dtype")
    if knobs is not None and knobs.params_in_half is not None:
        s.params_in_half = knobs.params_in_half
    elif model_dtype is not None and str(model_dtype).lower() not in ("auto", ""):
        s.params_in_half = DTYPE_BYTES.get(str(model_dtype).lower(), 2) == 2
    else:
        s.params_in_half = prec != "fp32"
    s.gradient_checkpointing = _as_bool(r.get(("gradient_checkpointing", "activation_checkpointing",
                                               "grad_checkpointing", "checkpointing"), False,
                                              "gradient checkpointing"))
    # LoRA: an explicit method key wins, then a lora.enabled flag, then a LoRA rank > 0.
    method = r.get(("method", "finetuning_type", "finetune_type", "tuning"), None, "fine-tuning method")
    if method is None:
        task = r.get(("task",), None, "task")
        if task is not None and str(task) != "sft":
            method = "full"  # continued pretraining / pretraining train every weight
        else:
            method = r.get(("sft.mode",), None, "SFT mode")
    r_val = int(r.get(("lora.r", "lora.rank", "lora_r", "lora_rank"), 0, "LoRA rank") or 0)
    enabled = r.get(("lora.enabled", "use_lora", "lora_enabled"), None, "LoRA enabled flag")
    if method is not None and str(method).strip():
        use_lora = "lora" in str(method).lower()
    elif enabled is not None:
        use_lora = _as_bool(enabled)
    else:
        use_lora = r_val > 0
    if use_lora:
        if r_val <= 0:
            r_val = 8  # peft's default rank
            r.notes.append("LoRA rank not given: peft default 8")
        targets = r.get(("lora.target_modules", "lora.targets", "lora_target", "target_modules"),
                        "all-linear", "LoRA targets")
        s.lora = {"r": r_val, "targets": targets,
                  "dropout": float(r.get(("lora.dropout", "lora.lora_dropout", "lora_dropout"), 0.0,
                                         "LoRA dropout") or 0.0),
                  "dtype_bytes": 4}  # peft keeps adapter weights in fp32 on a half base model
    s.backend = str(r.get(("backend", "strategy", "distributed"), "single", "backend")).lower()
    ds_obj = _find(train_conf, ("deepspeed", "ds_config", "deepspeed_config"))
    if isinstance(ds_obj, dict):
        r.notes.append("DeepSpeed config = given as a mapping")
        ds = ds_obj
    else:
        ds = _load_ds_config(r.get(("deepspeed", "ds_config", "deepspeed_config"), None, "DeepSpeed config"))
    s.ds = ds
    zo = ds.get("zero_optimization", {}) if ds else {}
    stage = zo.get("stage")
    if stage is None:
        stage = r.get(("zero_stage", "zero.stage", "deepspeed.stage"), None, "ZeRO stage")
    if stage is None:
        stage = 3 if s.backend.startswith("zero3") else 2 if s.backend.startswith("zero2") else \
            1 if s.backend.startswith("zero1") else 0
    s.zero_stage = int(stage)
    off_opt = (zo.get("offload_optimizer") or {}).get("device") if zo else None
    off_par = (zo.get("offload_param") or {}).get("device") if zo else None
    if off_opt is None:
        off_opt = r.get(("offload_optimizer",), "offload" in s.backend, "optimizer offload")
    if off_par is None:
        off_par = r.get(("offload_param",), "offload" in s.backend and s.zero_stage == 3, "param offload")
    s.offload_optimizer = _as_bool(off_opt) and str(off_opt).lower() != "none"
    s.offload_param = _as_bool(off_par) and str(off_par).lower() != "none" and s.zero_stage == 3
    s.optimizer = str(r.get(("optimizer.name", "optim.name", "optimizer", "optim", "optim.type"),
                            "adamw", "optimizer")).lower()
    s.attention = str(r.get(("attn_implementation", "attention", "attention_impl"), "sdpa",
                            "attention implementation")).lower()
    packing = r.get(("packing", "pack", "packed"), None, "packing")
    s.padded = (not _as_bool(packing)) if packing is not None else False
    s.kernels = "liger" if _as_bool(r.get(("use_liger_kernel", "liger_kernel", "liger", "use_liger"), False,
                                          "Liger kernels")) else "eager"
    if s.kernels == "eager" and _compiled(r.get(("torch_compile", "compile"), False, "torch.compile")):
        s.kernels = "compiled"
    s.drop_last = _as_bool(r.get(("drop_last", "dataloader_drop_last"), False, "drop_last"))
    return s, r.notes


# ----------------------------------------------------------------------------- the model

@dataclasses.dataclass
class ModelDims:
    params: int
    embedding_params: int
    lm_head_params: int              # 0 when tied to the embedding
    tied: bool
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qk_norm: bool
    linear_shapes: dict              # per-layer linear name -> (in, out), names as in the model
    layer_params: int
    largest_param: int
    family: str


def model_dims(model_config: Any) -> ModelDims:
    """Exact parameter counts from the transformers model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    c = model_config
    params = sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    lm_head = 0 if (out is None or tied) else out.weight.numel()
    layers_mod = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == c.num_hidden_layers:
            layers_mod = mod
            break
    shapes: dict = {}
    qk_norm = False
    layer_params = 0
    if layers_mod is not None:
        layer0 = layers_mod[0]
        layer_params = sum(p.numel() for p in layer0.parameters())
        for name, mod in layer0.named_modules():
            if isinstance(mod, torch.nn.Linear):
                shapes[name] = (mod.in_features, mod.out_features)
            if name.endswith("q_norm"):
                qk_norm = True
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return ModelDims(
        params=params, embedding_params=emb.numel(), lm_head_params=lm_head, tied=tied,
        layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=c.intermediate_size, vocab=c.vocab_size, qk_norm=qk_norm,
        linear_shapes=shapes, layer_params=layer_params,
        largest_param=max(p.numel() for p in model.parameters()),
        family=type(model).__name__)


def _lora_targets(targets: Any, dims: ModelDims) -> list[str]:
    names = list(dims.linear_shapes)
    if targets in (None, "", "all-linear", "all_linear", "all") or targets == ["all-linear"]:
        return names
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    return [n for n in names if any(n == t or n.endswith("." + t) or n.split(".")[-1] == t for t in targets)]


def lora_params(dims: ModelDims, lora: dict) -> int:
    r = lora["r"]
    return dims.layers * sum(r * (i + o) for n, (i, o) in dims.linear_shapes.items()
                             if n in _lora_targets(lora["targets"], dims))


# ----------------------------------------------------------------------------- activations

def layer_activations(dims: ModelDims, shape: TrainShape, knobs: Knobs) -> dict:
    """Bytes saved for backward by one decoder layer, per token (HF Llama/Qwen3 code paths).

    e = compute dtype bytes (2 under bf16/fp16), nf = norm output bytes (e with half weights,
    4 with fp32 weights + autocast). h = hidden, q = heads x head_dim, kv = kv_heads x head_dim,
    I = intermediate, nh = heads, s = sequence length.

      RMSNorm (x2)        4h (fp32 upcast kept by pow/mul) + 4 (rsqrt) + nf*h (normalized, kept
                          by a trainable weight)
      q/k/v input         e*h once (half weights: one tensor shared by the 3 linears; fp32 weights
                          + autocast: one bf16 cast per linear, 3e*h); only if a consumer needs it
                          (trainable weight, or a LoRA A without dropout)
      q_norm/k_norm       (Qwen3) 4q + e*q and 4kv + e*kv
      attention, SDPA     q, k, v, out (e*(2q + 2kv)) + logsumexp 4*nh;
                          k and v repeated to q width (e*(2q + 2q)) when the batch has a mask
      attention, eager    q, k, v repeated, fp32 softmax + probs: e*3q + (4 + e)*nh*s
      o_proj input        e*q for eager attention; SDPA's saved output is the same memory
      MLP                 gate, silu(gate), up: 3e*I; down input e*I
      LoRA, per adapted   dropout > 0: mask (1 byte on CUDA) * in; lora_A input e*in (peft casts to
                          the fp32 adapter dtype, autocast back to bf16: one copy per adapter);
                          lora_A output e*r. Layer 0 keeps nothing before its first adapter
                          (the embedding output does not require grad) unless checkpointing.
      Liger kernels       RMSNorm keeps only its input (e*dim); SwiGLU keeps gate and up (2e*I)
    """
    e = DTYPE_BYTES[shape.precision]
    autocast = knobs.autocast if knobs.autocast is not None else shape.precision != "fp32"
    half_weights = shape.params_in_half and shape.precision != "fp32"
    nf = e if half_weights else 4
    h, nh = dims.hidden, dims.heads
    q, kv, inter = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim, dims.intermediate
    s = shape.seq_len
    liger = shape.kernels == "liger"
    full = shape.lora is None
    targets = set(_lora_targets(shape.lora["targets"], dims)) if shape.lora else set()
    r = shape.lora["r"] if shape.lora else 0
    drop = shape.lora["dropout"] if shape.lora else 0.0
    terms: dict[str, float] = {}

    def norm(dim: int) -> float:
        if liger:
            return e * dim + 4  # input + fp32 rstd
        return 4 * dim + 4 + (nf * dim if full else 0)  # fp32 input, fp32 rsqrt, normalized

    def linear_inputs(dim: int, leaves: list[str], from_norm: bool, counted: bool = False) -> float:
        """Saved inputs of the linears that read one tensor (and their LoRA branches)."""
        names = [n for n in dims.linear_shapes if n.split(".")[-1] in leaves]
        x_b = e if (half_weights or not from_norm) else 4  # dtype of the tensor they read
        a_b = e if autocast else 4  # LoRA A input / output as saved: bf16 cast under autocast, else fp32
        total, shared = 0.0, False
        for n in names:
            if full:
                if autocast and x_b != e:
                    total += e * dim  # autocast casts the fp32 norm output once per linear
                else:
                    shared = True
            elif n in targets:
                # peft casts the input to the fp32 adapter dtype; dropout keeps a 1-byte mask
                if drop > 0:
                    total += knobs.dropout_mask_bytes * dim
                if drop > 0 or autocast or x_b != 4:
                    total += a_b * dim
                else:
                    shared = True
                total += a_b * r  # lora_A output, kept by lora_B
        return total + (x_b * dim if shared and not counted else 0)

    terms["norms"] = norm(h) * 2
    terms["qkv_input"] = linear_inputs(h, ["q_proj", "k_proj", "v_proj"], True)
    if dims.qk_norm:
        terms["qk_norm"] = (e * (q + kv)) if liger else (4 + (e if full else 0)) * (q + kv)
    repeat = _repeat_kv(dims, shape, knobs)
    if shape.attention == "eager":
        terms["attention"] = e * 3 * q + (4 + e) * nh * s
    else:
        kvw = q if repeat else kv
        terms["attention"] = e * (2 * q + 2 * kvw) + 4 * nh
    # SDPA/flash return their output in [b, s, heads, d] memory, so the o_proj input is the
    # tensor attention already keeps; eager attention's output is a fresh copy.
    terms["o_input"] = linear_inputs(q, ["o_proj"], False, counted=shape.attention != "eager")
    terms["mlp"] = (2 if liger else 3) * e * inter
    terms["mlp_input"] = linear_inputs(h, ["gate_proj", "up_proj"], True)
    terms["down_input"] = linear_inputs(inter, ["down_proj"], False)
    return terms


def first_layer_free(dims: ModelDims, shape: TrainShape, knobs: Knobs) -> float:
    """Per-token bytes layer 0 does not keep under LoRA: its input norm and the q/k/v dropout
    masks (their inputs do not require grad)."""
    targets = set(_lora_targets(shape.lora["targets"], dims))
    free = 4 * dims.hidden + 4 if shape.kernels != "liger" else DTYPE_BYTES[shape.precision] * dims.hidden + 4
    if shape.lora["dropout"] > 0:
        n = sum(1 for t in targets if t.split(".")[-1] in ("q_proj", "k_proj", "v_proj"))
        free += n * knobs.dropout_mask_bytes * dims.hidden
    return free


def _repeat_kv(dims: ModelDims, shape: TrainShape, knobs: Knobs) -> bool:
    if dims.kv_heads == dims.heads or shape.attention == "flash_attention_2":
        return False
    native = knobs.sdpa_native_gqa if knobs.sdpa_native_gqa is not None else not shape.padded
    return not native


# ----------------------------------------------------------------------------- steps

def estimate_steps(n_items: int, micro_batch: int, world_size: int, grad_accum: int,
                   epochs: float = 1.0, max_steps: int = 0, rounding: str = "ceil") -> dict:
    """Optimizer steps. rounding='floor': complete effective batches only (drop_last);
    'ceil': the HF Trainer's count (last partial micro batch and partial accumulation kept)."""
    if min(micro_batch, world_size, grad_accum) < 1:
        raise ValueError("micro_batch, world_size and grad_accum must be >= 1")
    eff = micro_batch * world_size * grad_accum
    if rounding == "floor":
        per_epoch = n_items // eff
        micro_per_rank = n_items // (micro_batch * world_size)
    else:
        micro_per_rank = math.ceil(n_items / (micro_batch * world_size))
        per_epoch = math.ceil(micro_per_rank / grad_accum)
    total = max_steps if max_steps and max_steps > 0 else math.ceil(epochs * per_epoch)
    return {"items": n_items, "effective_batch": eff, "micro_batches_per_rank_per_epoch": micro_per_rank,
            "steps_per_epoch": per_epoch, "epochs": epochs, "max_steps": max_steps, "steps": int(total),
            "rounding": rounding}


# ----------------------------------------------------------------------------- the estimate

def estimate_run(train_conf: Any, model_config: Any, n_train_items: int, world_size: int,
                 knobs: Knobs | None = None) -> dict:
    """Peak GPU memory per device and optimizer steps for one training run.

    train_conf: the training config (any schema; read by leaf key names, see `read_train_shape`);
    model_config: a transformers PretrainedConfig; n_train_items: training sequences (packed
    blocks or samples); world_size: data-parallel ranks.
    """
    if knobs is None:
        knobs = knobs_from_conf(train_conf)
    shape, notes = read_train_shape(train_conf, knobs)
    world_size = max(1, int(world_size))
    dims = model_dims(model_config)
    assumptions = list(notes)

    # --- steps
    rounding = knobs.steps_rounding
    if rounding == "auto":
        rounding = "floor" if shape.drop_last else "ceil"
    steps = estimate_steps(n_train_items, shape.micro_batch, world_size, shape.grad_accum,
                           shape.epochs, shape.max_steps, rounding)

    # --- parameters and their states
    P = dims.params
    Pt = lora_params(dims, shape.lora) if shape.lora else P
    e = DTYPE_BYTES[shape.precision]
    ds = shape.zero_stage > 0 or shape.backend.startswith("zero") or bool(shape.ds)
    fsdp = shape.backend.startswith("fsdp")
    half = shape.params_in_half and shape.precision != "fp32"
    if ds:
        half = shape.precision != "fp32"  # DeepSpeed casts the module to bf16/fp16
    pb = 2 if half else 4
    # Trainable params: LoRA adapters are fp32; in full training they share the weight dtype.
    tb = shape.lora.get("dtype_bytes", 4) if (shape.lora and not ds) else pb  # DeepSpeed casts adapters too
    opt_states = 0 if shape.optimizer.startswith("sgd") else \
        1 if ("8bit" in shape.optimizer or "adafactor" in shape.optimizer) else 2
    # DeepSpeed keeps fp32 master weights and fp32 optimizer states for half params.
    master_b = 4 if (ds and tb < 4) else 0
    state_b = (4 if ds else tb) * opt_states
    if "8bit" in shape.optimizer:
        state_b = 2  # two 1-byte states
    grad_b = tb
    n = world_size
    stage = shape.zero_stage if ds else (3 if fsdp else 0)
    shard_w = n if stage >= 3 else 1
    shard_g = n if stage >= 2 else 1
    shard_o = n if stage >= 1 else 1

    frozen = P - Pt if shape.lora else 0
    weights = (frozen * pb + Pt * tb) / shard_w
    master = Pt * master_b / shard_o
    optim = Pt * state_b / shard_o
    grads = Pt * grad_b / shard_g
    host = 0.0
    if shape.offload_optimizer:
        host += master + optim + Pt * 4 / shard_g  # fp32 grad partition lives on the host too
        master = optim = 0.0
        grads = 0.0  # reduced straight into host buffers; the buckets below stay on the GPU
    if shape.offload_param:
        host += weights
        weights = 0.0
    autocast_cache = 0.0
    if shape.precision != "fp32" and not half:
        # fp32 weights under autocast: each matmul keeps its bf16 weight copy until backward.
        matmul = dims.layers * sum(i * o for i, o in dims.linear_shapes.values()) + \
            (dims.embedding_params if dims.tied else dims.lm_head_params)
        autocast_cache = matmul * 2 / shard_w
        assumptions.append("fp32 weights + autocast: bf16 weight copies kept for backward")
    elif shape.lora and tb == 4 and shape.precision != "fp32" and \
            (knobs.autocast if knobs.autocast is not None else True):
        autocast_cache = Pt * 2  # bf16 copies of the fp32 adapters under autocast

    buffers: dict[str, float] = {}
    if shape.backend.startswith("ddp") and not ds and n > 1 and knobs.ddp_bucket_copy:
        buffers["ddp_gradient_buckets"] = Pt * grad_b
    if ds:
        zo = (shape.ds or {}).get("zero_optimization", {})
        hid2 = dims.hidden * dims.hidden  # the HF Trainer's "auto" bucket sizes
        rb = _num(zo.get("reduce_bucket_size"), hid2)
        buffers["zero_reduce_bucket"] = rb * pb * (2 if stage < 3 else 1)
        if stage in (1, 2):
            ab = _num(zo.get("allgather_bucket_size"), 5e8)
            buffers["zero_allgather_bucket"] = min(ab, Pt / n) * pb
            # the partition's grads upcast to fp32 for the optimizer step (transient, in step phase)
        if stage == 3:
            pre = _num(zo.get("stage3_prefetch_bucket_size"), 0.9 * hid2)
            persist = _num(zo.get("stage3_param_persistence_threshold"), 10 * dims.hidden)
            small = 2 * dims.hidden * (2 * dims.layers + 1)  # norms stay whole on every rank
            buffers["zero3_gathered_params"] = (dims.largest_param + pre) * pb
            buffers["zero3_persistent_params"] = small * pb if persist >= dims.hidden else 0
    if fsdp and n > 1:
        buffers["fsdp_gathered_unit"] = 2 * max(dims.layer_params, dims.largest_param) * pb

    # --- activations and logits
    b, sq = shape.micro_batch, shape.seq_len
    tokens = b * sq
    per_layer = layer_activations(dims, shape, knobs)
    per_layer_tok = sum(per_layer.values())
    full = shape.lora is None
    nf = pb if half else 4
    resid = e if half else 4
    gc = shape.gradient_checkpointing
    if gc:
        # each layer keeps only its input; backward recomputes one layer at a time, after the
        # loss's logits buffers are gone
        stored_layers = dims.layers * resid * dims.hidden * tokens
        recompute = per_layer_tok * tokens * knobs.activation_scale
        act_note = "checkpointed: L x layer input (resid bytes x h); one layer recomputed in backward"
    else:
        stored_layers = dims.layers * per_layer_tok * tokens
        recompute = 0.0
        act_note = "no checkpointing: L x per-layer bytes"
    final_norm = (e * dims.hidden + 4 if shape.kernels == "liger" else
                  4 * dims.hidden + 4 + (nf * dims.hidden if full else 0)) * tokens
    head_input = (e * dims.hidden * tokens) if full else 0
    mask = tokens * sq if (shape.padded and shape.attention != "flash_attention_2") else 0
    # rotary cos/sin (shared by all layers) and int64 input ids + labels
    shared = 2 * (e if half else 4) * dims.head_dim * sq + 16 * tokens
    if shape.lora and not shape.gradient_checkpointing:
        # layer 0 before its first adapter: nothing requires grad yet
        shared -= first_layer_free(dims, shape, knobs) * tokens
    # the compiled-mode constants were fitted on full training without checkpointing; LoRA and
    # checkpointed compiled runs keep the eager formula (measured below it: an upper bound)
    compiled = shape.kernels == "compiled" and full and not gc
    act_scale = knobs.activation_scale * (knobs.compiled_activation_scale if compiled else 1.0)
    activations = (stored_layers + final_norm + head_input + mask + shared) * act_scale
    per_logit = knobs.compiled_logits_bytes_per_element if compiled else knobs.logits_bytes_per_element
    if shape.kernels == "liger":
        # fused linear + cross entropy: logits are computed in chunks; the hidden-state grad is kept
        logits = e * dims.hidden * tokens
        assumptions.append("Liger fused linear cross-entropy: no full logits tensor")
    else:
        logits = per_logit * tokens * dims.vocab
        if knobs.keep_logits_output:
            logits += e * tokens * dims.vocab

    # --- phases: loss backward (all activations + logits buffers), layer recompute (checkpointing),
    # end of backward, optimizer step. Autocast's bf16 weight copies live as long as the graph
    # keeps them: all through backward without checkpointing; with it they are dropped when
    # the forward's autocast region ends and one layer's are made again while it is recomputed.
    accumulating = shape.grad_accum > 1
    held_grads = grads if accumulating else 0.0
    buf = sum(buffers.values())
    static = weights + master + optim + buf + knobs.workspace_bytes
    phases = {"loss_backward": static + (0.0 if gc else autocast_cache) + held_grads + activations + logits}
    if gc:
        phases["layer_recompute"] = static + grads + activations + recompute + autocast_cache / dims.layers
    phases["end_of_backward"] = static + grads + (e * dims.hidden * tokens)
    step_extra = Pt * knobs.optimizer_step_extra
    if ds and stage in (1, 2) and not shape.offload_optimizer:
        step_extra += Pt * 4 / n  # fp32 upcast of the grad partition
    phases["optimizer_step"] = static + grads + step_extra
    peak = max(phases.values())
    device = peak * (1 + knobs.reserved_overhead) + knobs.cuda_context_bytes

    if shape.lora:
        assumptions.append(f"LoRA r={shape.lora['r']} on {len(_lora_targets(shape.lora['targets'], dims))} "
                           f"linears per layer: {Pt:,} trainable params in fp32; base weights frozen")
    assumptions += [
        f"model {dims.family}: {P:,} params ({'tied' if dims.tied else 'untied'} embeddings)",
        f"weights {'bf16/fp16' if half else 'fp32'}, compute {shape.precision}, "
        f"optimizer {shape.optimizer} with {opt_states} state(s)",
        f"backend {shape.backend}, ZeRO stage {stage}, {n} rank(s)"
        + (", optimizer offloaded" if shape.offload_optimizer else "")
        + (", params offloaded" if shape.offload_param else ""),
        f"activations: {act_note}; attention {shape.attention}"
        + (" with repeated k/v" if _repeat_kv(dims, shape, knobs) else ""),
        "gradients held through the forward" if accumulating else
        "grads are None at the forward of a single micro step (zero_grad set_to_none)",
        "logits: fused with the head (Liger)" if shape.kernels == "liger" else
        f"logits: {per_logit:g} bytes per logit at the loss backward",
        f"steps rounding: {rounding}",
        "peak_memory_bytes ~ torch.cuda.max_memory_allocated(); device_bytes adds CUDA context "
        "and allocator reservation",
        _kernels_note(shape, compiled, knobs),
    ]
    breakdown = {
        "weights": int(weights), "master_weights": int(master), "gradients": int(grads),
        "gradients_held_in_forward": int(held_grads), "optimizer_states": int(optim),
        "autocast_weight_cache": int(autocast_cache), "activations": int(activations),
        "recomputed_layer": int(recompute),
        "logits": int(logits), **{k: int(v) for k, v in buffers.items()},
        "workspace": int(knobs.workspace_bytes), "cuda_context": int(knobs.cuda_context_bytes),
    }
    return {
        "peak_memory_bytes": int(peak),
        "peak_memory_gib": round(peak / GiB, 3),
        "device_bytes": int(device),
        "host_memory_bytes": int(host),
        "steps": steps["steps"],
        "steps_detail": steps,
        "breakdown": breakdown,
        "phases": {k: int(v) for k, v in phases.items()},
        "peak_phase": max(phases, key=phases.get),
        "activation_per_layer_per_token": {k: round(v, 2) for k, v in per_layer.items()},
        # the formulas applied: shape.kernels "compiled" falls back to eager where not calibrated
        "activation_model": "compiled" if compiled else ("liger" if shape.kernels == "liger" else "eager"),
        "params": {"total": P, "trainable": Pt, "embedding": dims.embedding_params,
                   "lm_head": dims.lm_head_params, "non_embedding": P - dims.embedding_params - dims.lm_head_params},
        "shape": dataclasses.asdict(shape) | {"ds": bool(shape.ds)},
        "knobs": dataclasses.asdict(knobs),
        "world_size": world_size,
        "tokens_per_micro_batch": tokens,
        "assumptions": assumptions,
    }


def _kernels_note(shape: TrainShape, compiled: bool, knobs: Knobs) -> str:
    if compiled:
        return (f"torch.compile: activations x {knobs.compiled_activation_scale:g}, "
                f"{knobs.compiled_logits_bytes_per_element:g} bytes per logit (fitted on H200 runs of full training)")
    if shape.kernels == "compiled":
        return "torch.compile with LoRA or checkpointing is not calibrated: the eager estimate, an upper bound"
    return "torch.compile and fused kernels other than Liger are not modelled (they save memory)"


def _num(v: Any, default: float) -> float:
    if v is None or v == "auto":
        return float(default)
    return float(v)


def knobs_from_conf(train_conf: Any) -> Knobs:
    """Knobs from an `estimate` section of the training config, if it has one."""
    sec = getattr(train_conf, "estimate", None)
    if sec is None and isinstance(train_conf, dict):
        sec = train_conf.get("estimate")
    if sec is None:
        return Knobs()
    vals = sec if isinstance(sec, dict) else _flatten(sec)
    names = {f.name for f in dataclasses.fields(Knobs)}
    return Knobs(**{k: v for k, v in vals.items() if k in names})


def format_table(est: dict) -> str:
    """The breakdown as a plain-text table (GiB)."""
    rows = [(k, v) for k, v in est["breakdown"].items() if v or k in ("weights", "activations")]
    w = max(len(k) for k, _ in rows) + 2
    lines = [f"{'term':{w}s}{'GiB':>10s}", "-" * (w + 10)]
    for k, v in rows:
        note = "  (outside the allocator)" if k == "cuda_context" else ""
        lines.append(f"{k:{w}s}{v / GiB:10.3f}{note}")
    lines.append("-" * (w + 10))
    for k, v in est["phases"].items():
        lines.append(f"{'phase ' + k:{w}s}{v / GiB:10.3f}")
    lines.append(f"{'peak (allocated)':{w}s}{est['peak_memory_bytes'] / GiB:10.3f}   at {est['peak_phase']}")
    lines.append(f"{'device (nvidia-smi)':{w}s}{est['device_bytes'] / GiB:10.3f}")
    if est["host_memory_bytes"]:
        lines.append(f"{'host (offload)':{w}s}{est['host_memory_bytes'] / GiB:10.3f}")
    sd = est["steps_detail"]
    lines.append("")
    lines.append(f"steps: {sd['steps']} ({sd['steps_per_epoch']} per epoch x {sd['epochs']:g} epochs; "
                 f"{sd['items']} items / effective batch {sd['effective_batch']}, {sd['rounding']}"
                 + (f"; max_steps {sd['max_steps']}" if sd["max_steps"] else "") + ")")
    lines.append("")
    lines.append("activation bytes per token per layer: " + ", ".join(
        f"{k} {v:g}" for k, v in est["activation_per_layer_per_token"].items()))
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in est["assumptions"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- script helpers

def load_train_conf(paths: list, overrides: list[str]) -> tuple[Any, str]:
    """The training config through its schema (kind 'train'); plain composed YAML when the
    schema is not importable. Returns (config, description)."""
    from .. import cli
    from .. import config as cfg
    from ..runs import project_path
    files = [project_path(p) for p in paths]
    try:
        schema = cli.schema("train")
    except (ImportError, AttributeError):
        schema = None
    if schema is not None and files:
        return cfg.load(schema, files, overrides), "schema train: " + ", ".join(map(str, paths))
    merged: dict = {}
    for f in files:
        cfg._merge(merged, cfg._load_layers(f, {}), str(f), {})
    for item in overrides:
        keys, value = cfg.parse_set(item)
        node = merged
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return merged, ("plain YAML: " + ", ".join(map(str, paths)) if paths else "--set values only")


def _leaf(conf: Any, names: tuple[str, ...]) -> tuple[Any, str | None]:
    flat = _flatten(conf)
    for name in names:
        hits = [k for k in flat if (k == name or k.endswith("." + name)) and flat[k] not in (None, "")]
        if hits:
            key = min(hits, key=lambda k: (k.count("."), k))
            return flat[key], key
    return None, None


def resolve_model_config(conf: Any, model: str | None = None) -> tuple[Any, str]:
    """A transformers config from --model or the training config's model key."""
    from ..model import presets
    from ..runs import project_path
    src = "--model"
    if model is None:
        model, key = _leaf(conf, ("model.preset", "preset", "model.name_or_path", "model_name_or_path",
                                  "model.path", "model_path", "model.name", "model"))
        if model is None:
            raise ConfigError("no model: pass --model PRESET|DIR or set model.name_or_path / model.preset")
        src = f"config key {key}"
    model = str(model)
    vocab = None
    tok, _ = _leaf(conf, ("tokenizer", "tokenizer_path", "tokenizer.path", "model.tokenizer"))
    if tok and project_path(tok).is_dir():
        from transformers import AutoTokenizer
        vocab = len(AutoTokenizer.from_pretrained(project_path(tok)))
    if model in presets.PRESETS or model.endswith((".yaml", ".yml")):
        return presets.build_config(model, vocab_size=vocab), f"{model} ({src})"
    path = project_path(model)
    if path.is_dir():
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(path), f"{path} ({src})"
    raise ConfigError(f"model {model!r} ({src}) is neither a preset ({', '.join(presets.PRESETS)}), "
                     "a configs/model/*.yaml nor a model directory")


def count_items(path: Any) -> tuple[int | None, int | None]:
    """(training items, sequence length or None) of a jsonl file, a directory of jsonl files,
    or a tokenized directory whose meta.json states them (n_blocks / n_rows, seq_len)."""
    from ..runs import project_path
    p = project_path(path)
    if p.is_file() and p.suffix in (".jsonl", ".txt"):
        with open(p, "rb") as f:
            return sum(1 for line in f if line.strip()), None
    if p.is_dir():
        for meta in ("meta.json", "summary.json", "dataset_info.json"):
            if (p / meta).is_file():
                data = json.loads((p / meta).read_text(encoding="utf-8"))
                for k in ("n_blocks", "n_rows", "num_blocks", "num_sequences", "num_rows", "num_samples", "items"):
                    if isinstance(data.get(k), int):
                        seq = data.get("seq_len")
                        return data[k], (int(seq) if isinstance(seq, int) else None)
        files = sorted(p.glob("*.jsonl"))
        if files:
            return sum(count_items(f)[0] or 0 for f in files), None
    return None, None


def resolve_items(conf: Any, items: int | None) -> tuple[int, str, int | None]:
    """(items, where from, sequence length stated by the data or None)."""
    if items is not None:
        return items, "--items", None
    path, key = _leaf(conf, ("train_file", "train_path", "data.train", "dataset_path", "data.path",
                             "train_data", "dataset"))
    if path is not None:
        n, seq = count_items(path)
        if n is not None:
            cap, _ = _leaf(conf, ("max_train_items",))
            note = ""
            if isinstance(cap, int) and cap < n:
                n, note = cap, ", capped by max_train_items"
            return n, f"counted in {path} (config key {key}{note})", seq
        raise ConfigError(f"cannot count training items in {path} (config key {key}); "
                          "build the data first or pass --items N")
    raise ConfigError("no training data in the config; pass --items N")


def resolve_world_size(conf: Any) -> int:
    v, _ = _leaf(conf, ("world_size", "nproc_per_node", "num_gpus", "gpus"))
    try:
        return max(1, int(v)) if v is not None else 1
    except (TypeError, ValueError):
        return 1


# ----------------------------------------------------------------------------- measuring

def measure_peak(train_conf: Any, model_config: Any, steps: int = 3, knobs: Knobs | None = None,
                 log=print) -> dict:
    """Train `steps` optimizer steps on random tokens with the estimate's settings on one CUDA
    GPU and return torch.cuda.max_memory_allocated (the quantity peak_memory_bytes predicts),
    to check or calibrate the estimate on the machine at hand. Single-rank settings only."""
    import torch
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        raise ConfigError("--measure needs a CUDA GPU")
    shape, _ = read_train_shape(train_conf, knobs)
    if shape.zero_stage or shape.backend not in ("single", "ddp"):
        raise ConfigError(f"--measure runs one rank without DeepSpeed/FSDP; backend {shape.backend} "
                          "is measured by a real training run")
    dev = torch.device("cuda")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(shape.precision)
    wdtype = half if (half is not None and shape.params_in_half) else torch.float32
    torch.manual_seed(0)
    with dev:  # initialize on the GPU: fast for billion-parameter shapes
        model = AutoModelForCausalLM.from_config(model_config, dtype=wdtype, attn_implementation=shape.attention)
    if shape.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if shape.lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=shape.lora["r"], lora_alpha=2 * shape.lora["r"],
                                                 lora_dropout=shape.lora["dropout"],
                                                 target_modules=shape.lora["targets"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    autocast = (knobs.autocast if knobs and knobs.autocast is not None else half is not None)
    torch.cuda.reset_peak_memory_stats()
    peaks = []
    for step in range(steps):
        for _ in range(shape.grad_accum):
            ids = torch.randint(0, model_config.vocab_size, (shape.micro_batch, shape.seq_len), device=dev)
            with torch.autocast("cuda", dtype=half or torch.float32, enabled=autocast and half is not None):
                loss = model(input_ids=ids, labels=ids).loss / shape.grad_accum
            loss.backward()
            del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        log(f"step {step + 1}/{steps}: max allocated {peaks[-1] / GiB:.3f} GiB")
    out = {"peak_memory_bytes": max(peaks), "per_step_peaks": peaks,
           "reserved_bytes": torch.cuda.max_memory_reserved(), "device": torch.cuda.get_device_name(0),
           "weights_dtype": str(wdtype).replace("torch.", ""), "autocast": bool(autocast and half is not None)}
    del model, opt
    torch.cuda.empty_cache()
    return out
