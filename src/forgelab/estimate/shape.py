"""The training settings an estimate depends on (`TrainShape`), and the ways to get them.

- `TrainShape.from_train_config`: the typed front door, from the lab's own resolved TrainConfig
  and what the run resolved (precision, sequence length, kernels, the method's trainable part);
- `TrainShape.from_record`: the shape a finished run recorded (`estimate.predicted.shape`), so a
  report re-estimates it with today's formulas without loading any training code;
- `read_train_shape`: any other schema (a dict from another tool's YAML: LLaMA-Factory-style
  `per_device_train_batch_size`, `cutoff_len`, ...), read by leaf key names. scripts/estimate.py
  uses it for configs that are not the lab's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .knobs import Knobs

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "half": 2, "float": 4}

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
    # alignment methods (Method.estimate_terms): a second frozen copy of the weights (full-weight
    # DPO/KTO, GRPO with a KL term); sequences per micro-batch item that train (2: chosen +
    # rejected) and that run the largest forward without grad (a reference forward, KTO's KL
    # pass; 0: none); GRPO's generation {"batch": completions per device, "num_generations",
    # "completion_len", "engine": transformers | vllm}, whose sequences are seq_len (the prompt)
    # + completion_len
    reference_model: bool = False
    sequences_per_item: int = 1
    nograd_sequences_per_item: int = 0
    fused_lm_head: bool = False      # the trainer computes log-probs in tiles (TRL's fused LM head): no logits tensor
    loss_chunk_tokens: int = 0       # LM head + loss in chunks of this many tokens (runtime.loss_chunk_tokens, one rank)
    fp8: bool = False                # float8 training linears (runtime.fp8): their saved inputs in 1 byte
    generation: dict | None = None
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

    @classmethod
    def from_train_config(cls, conf: Any, *, precision: str, seq_len: int, kernels: str,
                          trainable: dict | None = None, ds_config: dict | None = None,
                          params_in_half: bool | None = None) -> tuple["TrainShape", list[str]]:
        """The shape of one of the lab's runs: its typed TrainConfig plus what the run resolved.

        precision: the compute dtype the run uses; seq_len: the length a batch row can reach
        (the data's block length, or the longest sample of unpadded SFT); kernels: eager,
        liger or compiled; trainable: the method's estimator terms (``{"lora": {...}}`` for
        adapters, ``{}`` for full training; alignment methods add ``reference_model``,
        ``sequences_per_item``, ``nograd_sequences_per_item`` and ``generation``); ds_config:
        the DeepSpeed JSON the run loads. The lab loads fp32 weights and trains under autocast
        (params_in_half False) unless a knob says otherwise. Returns (shape, where each value came from)."""
        st, rt, backend = conf.steps, conf.runtime, conf.backend
        terms = dict(trainable or {})
        ds = dict(ds_config or {})
        zo = ds.get("zero_optimization", {})
        stage = zo.get("stage")
        if stage is None:
            stage = 3 if backend.startswith("zero3") else 2 if backend.startswith("zero2") else \
                1 if backend.startswith("zero1") else 0
        off_opt = (zo.get("offload_optimizer") or {}).get("device")
        off_par = (zo.get("offload_param") or {}).get("device")
        shape = cls(
            micro_batch=st.micro_batch_size, grad_accum=st.grad_accum, epochs=1.0, max_steps=st.max_steps,
            seq_len=int(seq_len), precision=precision,
            params_in_half=bool(params_in_half) if params_in_half is not None else False,
            gradient_checkpointing=bool(rt.gradient_checkpointing), lora=terms.get("lora"),
            reference_model=bool(terms.get("reference_model", False)),
            sequences_per_item=int(terms.get("sequences_per_item", 1)),
            nograd_sequences_per_item=int(terms.get("nograd_sequences_per_item", 0)),
            fused_lm_head=bool(terms.get("fused_lm_head", False)),
            loss_chunk_tokens=int(getattr(rt, "loss_chunk_tokens", 0) or 0),
            fp8=bool(getattr(rt, "fp8", None)),
            generation=dict(terms["generation"]) if terms.get("generation") else None,
            backend=backend, zero_stage=int(stage),
            offload_optimizer=(off_opt not in (None, "none")) if zo else "offload" in backend,
            offload_param=int(stage) == 3 and ((off_par not in (None, "none")) if zo else "offload" in backend),
            optimizer="adamw_torch", attention=str(conf.model.attn_implementation).lower(), padded=False,
            kernels=kernels, drop_last=True, ds=ds)
        notes = [f"micro batch {shape.micro_batch} x accumulation {shape.grad_accum}, max_steps {shape.max_steps} "
                 "(steps.*)", f"sequence length {shape.seq_len} (the data's, as the run resolved it)",
                 f"precision {precision} (runtime.precision resolved), kernels {kernels}",
                 f"backend {backend}" + (f", DeepSpeed config {conf.dist.deepspeed}" if ds else "")]
        if shape.reference_model or shape.sequences_per_item != 1 or shape.nograd_sequences_per_item \
                or shape.generation:
            notes.append(f"task {conf.task}: {shape.sequences_per_item} sequence(s) per item with grad, "
                         f"{shape.nograd_sequences_per_item} per item in the largest no-grad forward"
                         + (", a frozen reference copy of the weights" if shape.reference_model else "")
                         + (f", generation {shape.generation}" if shape.generation else "")
                         + " (the method's estimate_terms)")
        return shape, notes

    @classmethod
    def from_record(cls, recorded: dict, ds_config: dict | None = None) -> "TrainShape":
        """The shape a run recorded in train_summary.json (estimate.predicted.shape); the record
        keeps only whether a DeepSpeed config was used, so its dict is passed back in."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in recorded.items() if k in names and k != "ds"}
        return cls(**kw, ds=dict(ds_config or {}))


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
    s.loss_chunk_tokens = int(r.get(("loss_chunk_tokens",), 0, "chunked loss tokens") or 0)
    s.fp8 = r.get(("fp8", "float8"), None, "float8 linears") not in (None, False, "none", "null")
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
