"""Model loading and batch sizing for eval.

Eval sizes its own batches: a first guess from free memory (RAM on CPU, where running out
kills the process instead of raising, so the guess is what protects it; free GPU memory on
CUDA), then halving on an out-of-memory error and retrying the same batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..runs import project_path
from .config import RuntimeConfig

log = logging.getLogger("forgelab.eval")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: object
    tokenizer: object
    device: str
    dtype: str

    @property
    def eos_ids(self) -> list[int]:
        """End tokens that stop generation: the tokenizer's and the generation config's."""
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is not None:
            ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return sorted(ids)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0])


def resolve_device(runtime: RuntimeConfig) -> tuple[str, str]:
    import torch
    device = runtime.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
    dtype = runtime.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def load_model(name: str, path: str, runtime: RuntimeConfig) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = project_path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model '{name}': no Hugging Face model at {p} (models[].path)")
    from ..manifest import require_intact
    require_intact(p, f"model '{name}':")  # a training run's final/ carries a manifest
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    device, dtype = resolve_device(runtime)
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=getattr(torch, dtype)).to(device).eval()
    log.info("loaded %s from %s (%s, %s, %.1fM params)", name, p, device, dtype,
             sum(t.numel() for t in model.parameters()) / 1e6)
    return LoadedModel(name, p, model, tok, device, dtype)


# ----------------------------------------------------------------------------- batch size

def is_oom(e: BaseException) -> bool:
    import torch
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    import psutil
    return int(psutil.virtual_memory().available)


def bytes_per_sequence(model, seq_len: int, logit_positions: int, dtype_bytes: int) -> int:
    """Activation memory of one sequence in a no-grad forward (with KV cache): per token the
    cache, the widest transient tensors (MLP intermediate, q/k/v/out) and one attention row;
    plus the float32 logits kept and their log-softmax."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    hidden = c.hidden_size
    layers = c.num_hidden_layers
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = getattr(c, "num_key_value_heads", heads) * head_dim
    inter = getattr(c, "intermediate_size", 4 * hidden)
    per_token = dtype_bytes * (2 * layers * kv + 4 * hidden + 3 * inter + heads * seq_len)
    return seq_len * per_token + logit_positions * c.vocab_size * 4 * 3


def auto_batch_size(lm: LoadedModel, runtime: RuntimeConfig, seq_len: int, logit_positions: int) -> int:
    """runtime.batch_size when set, else the largest power of two whose estimated activations
    fit memory_fraction of free memory, capped by max_batch_size."""
    if runtime.batch_size:
        return runtime.batch_size
    import torch
    dtype_bytes = torch.finfo(getattr(torch, lm.dtype)).bits // 8
    need = bytes_per_sequence(lm.model, seq_len, logit_positions, dtype_bytes)
    budget = free_memory_bytes(lm.device) * runtime.memory_fraction
    bs = 1
    while bs * 2 <= runtime.max_batch_size and bs * 2 * need <= budget:
        bs *= 2
    return bs


class Batcher:
    """Runs fn over items in batches; an out-of-memory error halves the batch size and retries
    the same items, down to 1 (then the error is raised). The size that worked is kept."""

    def __init__(self, batch_size: int, empty_cache: Callable[[], None] | None = None):
        self.batch_size = max(1, int(batch_size))
        self.ceiling: int | None = None  # set for good by an out-of-memory error
        self.halvings = 0
        self._empty = empty_cache

    def resize(self, batch_size: int) -> None:
        """A new estimate for longer or shorter inputs, never above a size that ran out of memory."""
        self.batch_size = max(1, min(int(batch_size), self.ceiling or int(batch_size)))

    def run(self, items: Sequence, fn: Callable[[list], list], progress=None) -> list:
        out: list = []
        i = 0
        while i < len(items):
            chunk = list(items[i:i + self.batch_size])
            try:
                res = fn(chunk)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
                if not is_oom(e) or self.batch_size == 1:
                    raise
                self.batch_size //= 2
                self.ceiling = self.batch_size
                self.halvings += 1
                log.warning("out of memory at batch %d; retrying with batch %d", len(chunk), self.batch_size)
                if self._empty:
                    self._empty()
                continue
            if len(res) != len(chunk):
                raise RuntimeError(f"batch function returned {len(res)} results for {len(chunk)} items")
            out.extend(res)
            i += len(chunk)
            if progress is not None:
                progress.update(len(chunk))
        return out


def empty_cache_fn(device: str) -> Callable[[], None] | None:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.empty_cache
    return None
