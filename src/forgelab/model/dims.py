"""Model dimensions read off the transformers model a config builds (on the meta device: no
memory): parameter counts, layer shapes and the LoRA adapter sizes they imply. The memory
estimate (forgelab.estimate) and the presets' parameter counts both read them."""
from __future__ import annotations

import dataclasses
from typing import Any

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


def lora_targets(targets: Any, dims: ModelDims) -> list[str]:
    names = list(dims.linear_shapes)
    if targets in (None, "", "all-linear", "all_linear", "all") or targets == ["all-linear"]:
        return names
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    return [n for n in names if any(n == t or n.endswith("." + t) or n.split(".")[-1] == t for t in targets)]


def lora_params(dims: ModelDims, lora: dict) -> int:
    r = lora["r"]
    return dims.layers * sum(r * (i + o) for n, (i, o) in dims.linear_shapes.items()
                             if n in lora_targets(lora["targets"], dims))
