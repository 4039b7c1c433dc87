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


def build_model(pre, mc, on_cuda: bool, notices: list[str]):
    from transformers import AutoModelForCausalLM, GenerationConfig, set_seed

    from ..runs import project_path
    conf = pre.conf
    attn = choose_attn(conf.model.attn_implementation, on_cuda, notices)
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
