"""The model a run trains: its transformers config (pretraining: built from the preset with the
tokenizer's size and special tokens) and the model itself, on the resolved attention kernel,
with the method's trainable parameters (LoRA adapters, or every weight)."""
from __future__ import annotations

import os

import torch

from .runtime import choose_attn


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


def qlora_load_kwargs(conf, on_cuda: bool) -> dict:
    """from_pretrained arguments of a QLoRA base (lora.quantize_base: nf4): 4-bit NF4 weights with
    double quantization and bf16 compute, through bitsandbytes. {} when the base is not quantized."""
    from ..config import ConfigError
    if conf.lora.quantize_base == "none":
        return {}
    if conf.method.trainable != "lora":
        raise ConfigError("key 'lora.quantize_base': nf4 quantizes the frozen base of a LoRA run; this task "
                          "trains every weight")
    if not on_cuda:
        raise ConfigError("key 'lora.quantize_base': nf4 (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels "
                          "do not train on CPU. Set lora.quantize_base: none here (plain LoRA)")
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("key 'lora.quantize_base': nf4 needs bitsandbytes (pip install bitsandbytes)") from None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": local}}


def _qlora_model(path, attn: str, kw: dict):
    """The NF4 base, prepared for k-bit training (norms in fp32, input grads for the adapters)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=attn, **kw)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build_model(pre, mc, on_cuda: bool, notices: list[str]):
    from transformers import AutoModelForCausalLM, GenerationConfig, set_seed

    from ..runs import project_path
    conf = pre.conf
    attn = choose_attn(conf.model.attn_implementation, on_cuda, notices)
    qkw = qlora_load_kwargs(conf, on_cuda)
    if qkw:
        path = project_path(conf.model.path) if not conf.random_init else _random_init_dir(conf, mc)
        notices.append("QLoRA: the base is loaded in 4-bit NF4 (bitsandbytes, double quantization, bf16 compute)")
        model = _qlora_model(path, attn, qkw)
        model.config.use_cache = False
        return conf.method.prepare_model(model, conf)
    if conf.random_init:
        if not conf.method.builds_from_config:
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
    return conf.method.prepare_model(model, conf)  # which parameters train


def _random_init_dir(conf, mc):
    """A random-init benchmark shape written once to local disk: bitsandbytes quantizes while
    from_pretrained loads, so a QLoRA run of a preset shape loads it from there."""
    import hashlib
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM, set_seed
    key = hashlib.sha256((mc.to_json_string() + str(conf.model.init_seed or conf.seed)).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"forgelab-init-{key}"
    if not (out / "config.json").is_file():
        set_seed(conf.model.init_seed if conf.model.init_seed is not None else conf.seed)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        AutoModelForCausalLM.from_config(mc, dtype=torch.bfloat16).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def build_reference(pre, mc, on_cuda: bool):
    """The frozen reference model of a full-weight alignment run: the starting model again (a
    random-init benchmark shape: the same seed gives the same weights), in eval mode."""
    from transformers import AutoModelForCausalLM, set_seed

    from ..runs import project_path
    conf = pre.conf
    attn = choose_attn(conf.model.attn_implementation, on_cuda, [])
    if conf.random_init:
        set_seed(conf.model.init_seed if conf.model.init_seed is not None else conf.seed)
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_cuda and conf.backend in (
            "single", "ddp") else torch.device("cpu")
        with dev:
            ref = AutoModelForCausalLM.from_config(mc, dtype=torch.float32, attn_implementation=attn)
    else:
        ref = AutoModelForCausalLM.from_pretrained(project_path(conf.model.path), dtype=torch.float32,
                                                   attn_implementation=attn)
    ref.config.use_cache = False
    ref.requires_grad_(False)
    return ref.eval()
