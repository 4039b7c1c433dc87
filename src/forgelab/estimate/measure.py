"""A measured peak to check the estimate against: a few optimizer steps on random tokens on one
CUDA GPU with the estimate's settings (scripts/estimate.py --measure)."""
from __future__ import annotations

from typing import Any

from ..config import ConfigError
from .knobs import GiB, Knobs
from .shape import read_train_shape


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
