"""The packing guarantee, checked on any device and attention kernel: every sample of a packed
row gets the same logits as when it runs alone, because its position ids restart at 0 and the
model builds a block-diagonal causal mask from them (sdpa: a dense mask; flex_attention: a
block mask that skips the other samples' blocks). The same rows with positions running on
(naive packing) must differ, which shows that the check can fail.

Used by tests/test_packing.py on CPU and by scripts/check_packing.py on a GPU.
"""
from __future__ import annotations

import torch

from ..data.sft_store import check_packed_forward, collate_sft


def sample_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sample in a packed row, from its position ids."""
    pos = position_ids.tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return list(zip(starts, starts[1:]))


@torch.no_grad()
def packed_vs_alone(model, rows: list[dict], pad_token_id: int, device: str | torch.device,
                    pad_to_multiple_of: int | None = 64, max_samples: int | None = None,
                    pad_alone_to: int | None = None) -> dict:
    """Run ``rows`` (SFT store items) as one padded batch, the way training does, then every
    sample alone; returns the worst |logit diff| and, for contrast, the smallest diff naive
    packing gives on a sample that follows another one. ``pad_alone_to`` right-pads each lone
    sample to a multiple of it (causal attention: padding after a token cannot change its
    logits), so that compiled kernels see a few shapes instead of one per sample."""
    check_packed_forward(model)
    batch = collate_sft(rows, pad_token_id, pad_to_multiple_of)
    assert "attention_mask" not in batch
    ids = batch["input_ids"].to(device)
    packed = model(input_ids=ids, position_ids=batch["position_ids"].to(device)).logits.float()
    naive = model(input_ids=ids).logits.float()
    worst, naive_min, n = 0.0, float("inf"), 0
    for r, row in enumerate(rows):
        for k, (a, b) in enumerate(sample_spans(row["position_ids"])):
            if max_samples is not None and n >= max_samples:
                break
            alone = _alone(model, row["input_ids"][a:b], pad_token_id, device, pad_alone_to)
            worst = max(worst, (packed[r, a:b] - alone).abs().max().item())
            if k > 0:
                naive_min = min(naive_min, (naive[r, a:b] - alone).abs().max().item())
            n += 1
    return {"rows": len(rows), "samples": n, "row_lengths": [len(x["input_ids"]) for x in rows],
            "max_abs_logit_diff": worst,
            "naive_packing_min_abs_logit_diff": None if naive_min == float("inf") else naive_min}


def _alone(model, ids: torch.Tensor, pad_token_id: int, device, pad_to: int | None) -> torch.Tensor:
    n = len(ids)
    if pad_to:
        ids = torch.cat([ids, ids.new_full((-n % pad_to,), pad_token_id)])
    return model(input_ids=ids[None].to(device)).logits[0, :n].float()
