"""AdamW parameter groups and the Trainer's optimizer/scheduler arguments.

Weight decay pulls weights towards zero; that is wanted for matmul weights only. Norm gains,
biases and embeddings (a lookup table whose rows see few updates) get no decay.
"""
from __future__ import annotations

from torch import nn


def _shape(p) -> tuple:
    # ZeRO-3 replaces partitioned parameters by empty 1-D tensors and keeps the shape in ds_shape
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def no_decay_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        if isinstance(module, nn.Embedding) or is_norm:
            ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if len(_shape(p)) < 2 or name.endswith(".bias") or "norm" in name.rsplit(".", 2)[-2].lower():
            ids.add(id(p))
    return ids


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: 2-D+ weights outside norms and embeddings.

    A tied LM head shares its tensor with the input embedding, so it gets no decay either.
    """
    skip = no_decay_ids(model)
    return [n for n, p in model.named_parameters() if id(p) not in skip]


def optimizer_name(fused: str, on_cuda: bool, offload: bool) -> str:
    """The Trainer's ``optim`` value: torch AdamW, fused when on CUDA (not with ZeRO offload,
    whose optimizer step runs on host copies of the parameters)."""
    use_fused = fused == "on" or (fused == "auto" and on_cuda and not offload)
    return "adamw_torch_fused" if use_fused else "adamw_torch"


def scheduler_args(scheduler: str, min_lr_ratio: float) -> tuple[str, dict]:
    if scheduler == "cosine_with_min_lr":
        return scheduler, {"min_lr_rate": min_lr_ratio}
    return scheduler, {}
