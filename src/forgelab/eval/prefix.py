"""Shared-prefix batches: the few-shot part of a prompt is the same for every question of a
task (or MMLU subject), so its key/value cache is computed once and reused by every batch.

Prompts are tokenized whole, and the shared prefix is the longest common run of token ids,
so the model sees exactly the tokens of the full prompt. Each batch is laid out as
[prefix][left padding][suffix] with an attention mask that hides the padding and position ids
counted over the unmasked tokens (what `generate` derives from the mask, and what
`batch_inputs` passes for scoring), so every row is computed as if it were alone.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token in every sequence."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(max(n, 0)):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return max(n, 0)


@dataclass
class Prefix:
    ids: list[int]
    cache: object | None  # a transformers Cache for batch size 1, or None for an empty prefix

    def expanded(self, batch_size: int):
        """A fresh copy of the cache for a batch (the forward pass appends to the cache)."""
        if self.cache is None:
            return None
        c = copy.deepcopy(self.cache)
        if batch_size > 1:
            c.batch_repeat_interleave(batch_size)
        return c


def build_prefix(lm, ids: list[int]) -> Prefix:
    import torch
    from transformers import DynamicCache

    if not ids:
        return Prefix([], None)
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([ids], device=lm.device), past_key_values=cache,
                 use_cache=True, logits_to_keep=1)
    return Prefix(list(ids), cache)


def batch_inputs(prefix: Prefix, suffixes: list[list[int]], pad_id: int, device: str) -> dict:
    """Model inputs for a batch of suffixes after a cached prefix: left-padded suffix ids, the
    mask over prefix + suffix, and position ids that skip the padding."""
    import torch

    width = max(len(s) for s in suffixes)
    p = len(prefix.ids)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), p + width), dtype=torch.long)
    mask[:, :p] = 1
    for i, s in enumerate(suffixes):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, p + width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device),
            "past_key_values": prefix.expanded(len(suffixes))}
