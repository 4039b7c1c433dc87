"""LM head + cross-entropy over chunks of tokens, never holding the full logits.

The logits of a 151,936-token vocabulary are the largest tensor of a small model's step
(micro batch 4 x 2048 tokens: 2.5 GB in bf16, 5 GB once upcast, again for their gradient). Here
the forward pass walks the tokens in chunks: logits of one chunk, their loss, and at once their
gradient (softmax - one-hot), turned into the gradients of the hidden states and of the head
weight; only those are kept. The backward pass then just scales them. Same loss and gradients as
the model's own head + ``ForCausalLMLoss`` (tested in float32), with memory for one chunk.

``runtime.loss_chunk_tokens`` turns it on (the ForgeTrainer calls ``causal_lm_loss``); it works
with eager models and ``runtime.compile_scope: blocks`` (the whole-model compile wraps the forward
this bypasses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import base_model

IGNORE = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype):
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        w = weight.to(compute_dtype)
        total = hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, n, chunk):
            h = hidden[a:a + chunk].to(compute_dtype)
            t = targets[a:a + chunk]
            logits = (h @ w.t()).float()
            total += F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum")
            # d(sum of CE)/d logits = softmax - one_hot, zero on ignored positions
            g = torch.softmax(logits, dim=-1)
            valid = t != IGNORE
            g[valid, t[valid]] -= 1.0
            g[~valid] = 0.0
            g = g.to(compute_dtype)
            grad_h[a:a + chunk] = (g @ w).to(hidden.dtype)
            grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int) -> torch.Tensor:
    """Sum over tokens of CE(hidden @ weight.T, targets), ignoring -100; hidden [N, H]."""
    dtype = torch.get_autocast_dtype("cuda") if hidden.is_cuda and torch.is_autocast_enabled("cuda") \
        else hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, dtype)


def causal_lm_loss(model, inputs: dict, chunk: int, num_items_in_batch=None) -> torch.Tensor:
    """The model's next-token loss through the chunked head: the decoder runs as usual, the
    head and the loss run here. Labels shift like transformers' ForCausalLMLoss."""
    base = base_model(model)
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = base.model(**kwargs).last_hidden_state
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    total = linear_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), base.lm_head.weight,
                                     targets.reshape(-1).to(hidden.device), chunk)
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom
