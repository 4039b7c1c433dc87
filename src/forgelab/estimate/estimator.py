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

Alignment methods (TrainShape fields the method's estimate_terms set):

  sequences      a micro batch of B items trains B x sequences_per_item rows (DPO/ORPO/SimPO:
                 chosen + rejected, 2B); activations and logits scale with the rows
  reference      reference_weights = P x param bytes / N (ZeRO-3/FSDP partition it like the
                 model; the lab loads it fp32 like the policy; on the host with param offload);
                 LoRA runs: 0 (the reference is the base model with the adapters off)
  no-grad fwd    nograd_forward = (one layer's saved-tensor bytes per token of full training +
                 resid x h) x B x nograd_sequences_per_item x s: one layer's working set of the
                 reference forward (DPO: 2B rows) or KTO's KL / reference passes (B rows),
                 transient while the policy's activations are held
  generation     GRPO, transformers generate of G = micro_batch x grad_accum completions of
                 T = prompt (seq_len) + completion_len tokens:
                 generation_kv_cache = 2 (K, V) x L x kv_heads x head_dim x G x T x kv bytes
                 (kv bytes = the weights' dtype: fp32 weights + autocast cache fp32 K/V);
                 generation_logits = G x vocab x (e + 12) (last position, fp32 copy, scaled
                 copy, probabilities); generation_prefill = one layer's working set for the
                 G x prompt tokens + the prompt's KV cache. Transient, freed before the
                 training forward: phase generation = weights + master + optimizer + reference
                 + autocast copies + max(KV cache, prefill) + generation logits (ZeRO-3
                 gathers every weight for generate: + the rest of the weights)

The peak is the largest phase: loss backward (all activations + logits buffers), layer
recompute (checkpointing: the logits buffers are gone, one layer is live again), end of
backward (all gradients), the optimizer step, and for alignment methods the no-grad forward
(policy activations + one reference layer) and generation.

`peak_memory_bytes` predicts `torch.cuda.max_memory_allocated()`. `device_bytes` adds the
CUDA context (outside the allocator) and allocator reservation overhead, i.e. what nvidia-smi
shows.

Steps: micro batches per rank per epoch = ceil(items / (micro_batch x world_size)) (the HF
Trainer keeps the last partial batch), optimizer steps per epoch = ceil(that / accumulation);
with `drop_last` both are floors (items // (micro x world x accumulation)). max_steps > 0 wins.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..model.dims import lora_params, lora_targets, model_dims
from .activations import first_layer_free, layer_activations, repeat_kv
from .knobs import GiB, Knobs, knobs_from_conf
from .shape import DTYPE_BYTES, TrainShape, read_train_shape


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
                 knobs: Knobs | None = None, notes: list[str] | None = None) -> dict:
    """Peak GPU memory per device and optimizer steps for one training run.

    train_conf: a `TrainShape` (the lab's runs: `TrainShape.from_train_config`), or a training
    config of any schema, read by leaf key names (`read_train_shape`); model_config: a transformers PretrainedConfig; n_train_items: training sequences (packed
    blocks or samples); world_size: data-parallel ranks.
    """
    if knobs is None:
        knobs = Knobs() if isinstance(train_conf, TrainShape) else knobs_from_conf(train_conf)
    if isinstance(train_conf, TrainShape):
        shape, notes = train_conf, list(notes or [])
    else:
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
    # a full-weight alignment run's frozen reference: partitioned and offloaded like the model
    # (TRL's prepare_deepspeed / prepare_fsdp), in the model's weight dtype (the lab loads both fp32)
    ref_weights = (P * pb / shard_w) if (shape.reference_model and not shape.lora) else 0.0
    if shape.offload_param:
        host += weights + ref_weights
        weights = ref_weights = 0.0
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
    gen = shape.generation
    completion = int(gen.get("completion_len", 0)) if gen else 0
    b, sq = shape.micro_batch * max(1, int(shape.sequences_per_item)), shape.seq_len + completion
    tshape = dataclasses.replace(shape, seq_len=sq) if completion else shape  # the trained rows
    tokens = b * sq
    per_layer = layer_activations(dims, tshape, knobs)
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
    if shape.fp8 and full and not gc:
        # torchao's float8 linears keep float8 (1-byte) copies of their inputs for backward instead
        # of the bf16 ones: one per input tensor (q/k/v share theirs, gate/up theirs) plus the o_proj
        # input, whose bf16 original attention keeps anyway. Taken off at face value, outside the
        # compiled scale: the matmul inputs are the saved tensors inductor cannot recompute.
        kept = 2 * dims.hidden + dims.intermediate + dims.heads * dims.head_dim
        bf16_inputs = per_layer.get("qkv_input", 0) + per_layer.get("mlp_input", 0) + per_layer.get("down_input", 0)
        activations -= max(0.0, bf16_inputs - kept) * dims.layers * tokens
        assumptions.append("FP8 linears (runtime.fp8): float8 copies of the linears' inputs saved for backward")
    per_logit = knobs.compiled_logits_bytes_per_element if compiled else knobs.logits_bytes_per_element
    if shape.kernels == "liger" or shape.fused_lm_head:
        # fused linear + cross entropy: logits are computed in chunks; the hidden-state grad is kept
        logits = e * dims.hidden * tokens
        assumptions.append("Liger fused linear cross-entropy: no full logits tensor" if shape.kernels == "liger"
                           else "TRL's fused LM head: log-probs computed in tiles, no full logits tensor")
    elif shape.loss_chunk_tokens and n == 1 and shape.loss_chunk_tokens < tokens:
        # train/chunked_loss.py: one chunk's logits (eager bytes per logit: the chunk runs outside
        # the compiled blocks), the hidden states' gradient and the head's fp32 gradient
        logits = (knobs.logits_bytes_per_element * shape.loss_chunk_tokens * dims.vocab + e * dims.hidden * tokens
                  + (4 * dims.vocab * dims.hidden if full else 0))
        assumptions.append(f"chunked loss: logits of {shape.loss_chunk_tokens} tokens at a time, gradients taken in "
                           "the forward (runtime.loss_chunk_tokens)")
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
    static = weights + ref_weights + master + optim + buf + knobs.workspace_bytes
    phases = {"loss_backward": static + (0.0 if gc else autocast_cache) + held_grads + activations + logits}
    if gc:
        phases["layer_recompute"] = static + grads + activations + recompute + autocast_cache / dims.layers
    phases["end_of_backward"] = static + grads + (e * dims.hidden * tokens)
    step_extra = Pt * knobs.optimizer_step_extra
    if ds and stage in (1, 2) and not shape.offload_optimizer:
        step_extra += Pt * 4 / n  # fp32 upcast of the grad partition
    phases["optimizer_step"] = static + grads + step_extra

    # --- alignment: a forward without grad while the policy's activations are held (DPO's
    # reference on the 2B rows, KTO's KL and reference passes on B), and GRPO's generation
    resid_h = resid * dims.hidden
    nograd = 0.0
    if shape.nograd_sequences_per_item > 0:
        nograd = nograd_layer_bytes(dims, tshape, knobs, resid_h) * \
            shape.micro_batch * shape.nograd_sequences_per_item * sq
        phases["nograd_forward"] = static + held_grads + (0.0 if gc else autocast_cache) + activations + nograd
    gen_terms: dict[str, float] = {}
    if gen and gen.get("engine", "transformers") == "transformers":
        G, prompt = int(gen.get("batch") or shape.micro_batch * shape.grad_accum), shape.seq_len
        kv_b = pb  # K/V as cached: the weights' dtype (fp32 weights + autocast promote them to fp32)
        gen_terms["generation_kv_cache"] = kv_cache_bytes(dims, G * sq, kv_b)
        gen_terms["generation_prefill"] = nograd_layer_bytes(dims, dataclasses.replace(tshape, seq_len=prompt),
                                                             knobs, resid_h) * G * prompt + \
            kv_cache_bytes(dims, G * prompt, kv_b)
        gen_terms["generation_logits"] = G * dims.vocab * (e + 12)
        # ZeRO-3 gathers every weight for generate (ds3_gather_for_generation); FSDP summons them
        full_w = frozen * pb + Pt * tb
        gen_terms["generation_gathered_weights"] = max(0.0, full_w - weights) if stage >= 3 else 0.0
        phases["generation"] = static + gen_terms["generation_gathered_weights"] + autocast_cache + \
            max(gen_terms["generation_kv_cache"], gen_terms["generation_prefill"]) + gen_terms["generation_logits"]
        assumptions.append(f"generation: {G} completions per device of {prompt} prompt + {completion} answer "
                           f"tokens (transformers generate), KV cache {kv_b} bytes per element; freed before "
                           "the training forward")
    elif gen:
        assumptions.append("generation with vLLM: its memory (align.vllm_gpu_memory_utilization of the GPU when "
                           "colocated) is not modelled")
    if shape.reference_model:
        assumptions.append("reference model: a frozen copy of the weights in the model's dtype"
                           + (", partitioned like the model" if stage >= 3 else ""))
    elif shape.lora and shape.nograd_sequences_per_item:
        assumptions.append("reference: the base model with the adapters off (no extra weights)")
    if shape.sequences_per_item != 1:
        assumptions.append(f"{shape.sequences_per_item} sequences per item: {b} rows per micro batch")
    peak = max(phases.values())
    device = peak * (1 + knobs.reserved_overhead) + knobs.cuda_context_bytes

    if shape.lora:
        assumptions.append(f"LoRA r={shape.lora['r']} on {len(lora_targets(shape.lora['targets'], dims))} "
                           f"linears per layer: {Pt:,} trainable params in fp32; base weights frozen")
    assumptions += [
        f"model {dims.family}: {P:,} params ({'tied' if dims.tied else 'untied'} embeddings)",
        f"weights {'bf16/fp16' if half else 'fp32'}, compute {shape.precision}, "
        f"optimizer {shape.optimizer} with {opt_states} state(s)",
        f"backend {shape.backend}, ZeRO stage {stage}, {n} rank(s)"
        + (", optimizer offloaded" if shape.offload_optimizer else "")
        + (", params offloaded" if shape.offload_param else ""),
        f"activations: {act_note}; attention {shape.attention}"
        + (" with repeated k/v" if repeat_kv(dims, shape, knobs) else ""),
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
    if shape.reference_model or shape.nograd_sequences_per_item or gen:  # alignment methods only
        breakdown |= {"reference_weights": int(ref_weights), "nograd_forward": int(nograd),
                      **{k: int(v) for k, v in gen_terms.items()}}
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


def nograd_layer_bytes(dims, shape: TrainShape, knobs: Knobs, resid_h: float) -> float:
    """Per-token working set of one decoder layer in a forward without grad: what full training
    would save for that layer (an upper bound on what is live inside it) + its residual input."""
    full = dataclasses.replace(shape, lora=None) if shape.lora else shape
    return (sum(layer_activations(dims, full, knobs).values()) + resid_h) * knobs.activation_scale


def kv_cache_bytes(dims, tokens: int, bytes_per_element: int) -> float:
    """KV cache of generation: 2 (K and V) x layers x kv_heads x head_dim x tokens x bytes."""
    return 2 * dims.layers * dims.kv_heads * dims.head_dim * tokens * bytes_per_element


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
