"""Activation memory of one decoder layer per token: the tensors autograd saves for backward
(HF Llama/Qwen3 code paths), the part layer 0 does not keep under LoRA, and whether SDPA
repeats k/v. The formulas are explained term by term in `layer_activations`."""
from __future__ import annotations

from ..model.dims import ModelDims, lora_targets
from .knobs import Knobs
from .shape import DTYPE_BYTES, TrainShape

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
    targets = set(lora_targets(shape.lora["targets"], dims)) if shape.lora else set()
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
    repeat = repeat_kv(dims, shape, knobs)
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
    targets = set(lora_targets(shape.lora["targets"], dims))
    free = 4 * dims.hidden + 4 if shape.kernels != "liger" else DTYPE_BYTES[shape.precision] * dims.hidden + 4
    if shape.lora["dropout"] > 0:
        n = sum(1 for t in targets if t.split(".")[-1] in ("q_proj", "k_proj", "v_proj"))
        free += n * knobs.dropout_mask_bytes * dims.hidden
    return free


def repeat_kv(dims: ModelDims, shape: TrainShape, knobs: Knobs) -> bool:
    if dims.kv_heads == dims.heads or shape.attention == "flash_attention_2":
        return False
    native = knobs.sdpa_native_gqa if knobs.sdpa_native_gqa is not None else not shape.padded
    return not native
