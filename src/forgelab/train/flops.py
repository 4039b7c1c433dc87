"""Model FLOPs per token and MFU.

Full training (cpt, pretrain, sft full), per token:

    flops_per_token = 6 * (N_nonemb + N_head) + 12 * L * A * S

  N_nonemb  parameters outside the input embedding (attention, MLP, norms)
  N_head    the LM head's matmul, vocab * hidden; counted even when tied to the embedding,
            because the matmul runs either way
  L         layers;  A = attention width = heads * head_dim (query side)
  S         attention span: the block length for CPT; for packed SFT rows the mean span
            sum(len_i^2) / sum(len_i) over samples, since a token only attends inside its sample
  6         2 (multiply-add) * 3 (forward, gradient w.r.t. inputs, gradient w.r.t. weights)
  12*L*A*S  the QK^T and AV matmuls, forward (4*L*A*S) plus backward (8*L*A*S); the causal
            mask's saving is not subtracted (the usual convention)

LoRA (sft lora), per token, counting only the work that runs:

    flops_per_token = 4 * (N_nonemb + N_head) + 6 * N_lora + 12 * L * A * S

  frozen weights cost a forward (2) and the gradient w.r.t. their inputs (2) but no weight
  gradient; adapters (N_lora trainable parameters) cost all three (6); attention is unchanged
  because gradients flow back through every layer to the first adapter.

Alignment (dpo, kto) adds the reference model's forward per token, 2 * (N_nonemb + N_head) +
4 * L * A * S, unless its log-probs were precomputed; grpo adds the generation forward of its
sampled answers (train/methods/grpo.py says how it is counted).

  MFU = tokens_per_s * flops_per_token / (peak_flops_per_device * devices)

Activation recomputation (gradient checkpointing) is not counted: MFU measures useful model
FLOPs, not hardware FLOPs. Peak FLOP/s: ``metrics.peak_flops``, or the table below on CUDA
(dense bf16/fp16 tensor-core peaks); on CPU there is no MFU unless a peak is configured.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model import base_model

# dense bf16 tensor-core peak per device (no sparsity); matched by substring of the device name
GPU_PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A6000", 155e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A10", 125e12),
)


@dataclass
class ModelCounts:
    params: int
    non_embedding_params: int
    head_params: int
    trainable_params: int
    lora_params: int
    layers: int
    attention_width: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def count_model(model, lora: bool = False) -> ModelCounts:
    """Parameter counts of a transformers causal LM (peft-wrapped or not), ties counted once."""
    base = base_model(model)
    conf = base.config
    text_conf = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    seen, total, trainable, lora_n = set(), 0, 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
            if "lora_" in name:
                lora_n += n
    emb = base.get_input_embeddings()
    emb_n = sum(_numel(p) for p in emb.parameters())
    out = base.get_output_embeddings()
    head_n = _numel(out.weight) if out is not None else emb_n
    tied = out is not None and out.weight is emb.weight
    # non-embedding = everything but the input embedding and an untied head
    non_emb = total - emb_n - (0 if tied or out is None else head_n)
    if lora:
        non_emb -= lora_n  # adapters are counted on their own term
    heads = int(text_conf.num_attention_heads)
    head_dim = int(getattr(text_conf, "head_dim", None) or text_conf.hidden_size // heads)
    return ModelCounts(params=total, non_embedding_params=non_emb, head_params=head_n,
                       trainable_params=trainable, lora_params=lora_n,
                       layers=int(text_conf.num_hidden_layers), attention_width=heads * head_dim)


def _numel(p) -> int:
    # ZeRO-3 partitions parameters to empty tensors and keeps the real size in ds_numel; a
    # bitsandbytes 4-bit weight (QLoRA) packs two values per byte and keeps its shape in quant_state
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        import math
        return int(math.prod(qs.shape))
    return int(getattr(p, "ds_numel", 0) or p.numel())


def flops_per_token(c: ModelCounts, span: float, lora: bool = False) -> float:
    attn = 12.0 * c.layers * c.attention_width * span
    if lora:
        return 4.0 * (c.non_embedding_params + c.head_params) + 6.0 * c.lora_params + attn
    return 6.0 * (c.non_embedding_params + c.head_params) + attn


def forward_flops_per_token(c: ModelCounts, span: float) -> float:
    """One forward pass of the frozen model (a reference model's log-probs, or generation):
    2 * (N_nonemb + N_head) + 4 * L * A * S."""
    return 2.0 * (c.non_embedding_params + c.head_params) + 4.0 * c.layers * c.attention_width * span


def peak_flops(configured: float | None, device_name: str | None, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it came from)."""
    if configured:
        return float(configured), "metrics.peak_flops"
    if not device_name:
        return None, "none (CPU: set metrics.peak_flops to report MFU)"
    for key, peak in GPU_PEAK_BF16:
        if key in device_name:
            if precision == "fp32":
                return peak, f"{key} bf16 table peak (run is fp32: MFU is against the bf16 peak)"
            return peak, f"{key} bf16 dense table peak"
    return None, f"unknown GPU {device_name!r}: set metrics.peak_flops"


def mfu(tokens_per_s: float | None, fpt: float, peak: float | None, devices: int) -> float | None:
    if not tokens_per_s or not peak:
        return None
    return tokens_per_s * fpt / (peak * devices)
