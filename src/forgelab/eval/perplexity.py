"""Perplexity of held-out text with sliding windows.

The documents are tokenized and joined (by the end token, or a literal separator) into one
stream t[0..N-1]. Every token but the first is a target, scored exactly once:

- window 0 is t[0 : min(L, N)] and scores targets 1 .. end0-1 (all it can);
- window k ends `stride` tokens after window k-1 (end_k = min(end_{k-1} + stride, N)), is
  t[end_k - L : end_k], and scores only the targets end_{k-1} .. end_k - 1.

So each target after the first window sees at least L - stride tokens of context (stride must
be < L for the first scored token of a window to have any). Token-level perplexity is
exp(sum of target NLLs / number of targets). With document groups (e.g. sources), each group
is a stream of its own and the overall figure pools all their targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tqdm.auto import tqdm

from .runtime import Batcher, LoadedModel, auto_batch_size, empty_cache_fn


@dataclass(frozen=True)
class Window:
    begin: int   # first input token
    end: int     # one past the last input token
    n_targets: int  # the last n_targets input tokens are scored


def windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length - 1], got stride={stride}, max_length={max_length}")
    end = min(max_length, n_tokens)
    out = [Window(0, end, end - 1)]
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        out.append(Window(new_end - max_length, new_end, new_end - end))  # end >= max_length here
        end = new_end
    return out


def token_stream(lm: LoadedModel, texts: list[str], separator: str, max_tokens: int) -> list[int]:
    """Documents tokenized, each followed by the separator, into one stream cut at max_tokens (0 = all)."""
    tok = lm.tokenizer
    if separator == "eos":  # as CPT packing does: the end token after every document
        sep = [tok.eos_token_id if tok.eos_token_id is not None else lm.eos_ids[0]]
    else:
        sep = tok(separator, add_special_tokens=False)["input_ids"] if separator else []
    stream: list[int] = []
    for text in texts:
        stream.extend(tok(text, add_special_tokens=False)["input_ids"] + sep)
        if max_tokens and len(stream) >= max_tokens:
            return stream[:max_tokens]
    return stream


def window_nlls(lm: LoadedModel, tokens: list[int], batch: list[Window]) -> list[list[float]]:
    """Per-target NLLs (nats) of each window; windows of one batch have equal length, so no padding."""
    import torch
    import torch.nn.functional as F

    lengths = {w.end - w.begin for w in batch}
    if len(lengths) != 1:
        raise ValueError(f"windows of one batch must have one length, got {sorted(lengths)}")
    keep = max(w.n_targets for w in batch) + 1  # logits are needed only where targets are
    ids = torch.tensor([tokens[w.begin:w.end] for w in batch], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
    out = []
    for row, w in enumerate(batch):
        # logits[row, j] predicts the token after input position (L - keep + j)
        pred = logits[row, keep - 1 - w.n_targets: keep - 1].float()
        tgt = ids[row, ids.shape[1] - w.n_targets:]
        out.append(F.cross_entropy(pred, tgt, reduction="none").tolist())
    return out


def perplexity(lm: LoadedModel, tokens: list[int], max_length: int, stride: int, runtime,
               desc: str = "perplexity") -> dict:
    """Sliding-window perplexity of a token stream; returns the numbers and per-target NLLs."""
    wins = windows(len(tokens), max_length, stride)
    seq = wins[0].end - wins[0].begin
    bs = auto_batch_size(lm, runtime, seq, min(seq, stride + 1) if len(wins) > 1 else seq)
    batcher = Batcher(bs, empty_cache_fn(lm.device))
    # window 0 may score more targets than the rest: it gets a batch of its own
    groups = [wins[:1], wins[1:]] if len(wins) > 1 else [wins]
    nlls: list[float] = []
    with tqdm(total=len(wins), desc=desc, unit="win") as bar:
        for g in groups:
            for per_window in batcher.run(g, lambda b: window_nlls(lm, tokens, b), bar):
                nlls.extend(per_window)
    total = float(sum(nlls))
    n = len(nlls)
    return {"perplexity": math.exp(total / n), "nll_per_token": total / n, "tokens_scored": n,
            "tokens_in_stream": len(tokens), "windows": len(wins), "max_length": max_length,
            "stride": stride, "min_context_after_first_window": max_length - stride,
            "batch_size": batcher.batch_size, "nlls": nlls}


def evaluate(lm: LoadedModel, texts: list[str], groups: list[str] | None, conf, runtime,
             desc: str = "perplexity") -> tuple[dict, list[dict]]:
    """Perplexity of held-out documents. With groups (e.g. the source of each document), each
    group is a stream of its own with an equal share of max_tokens, so a short cut still
    covers every source; the overall figure pools the NLLs of all groups. Returns the numbers
    and one record per window."""
    names = sorted(set(groups)) if groups else ["all"]
    budget = conf.max_tokens // len(names) if conf.max_tokens else 0
    total, n, n_windows, by_group, records = 0.0, 0, 0, {}, []
    for g in names:
        docs = [t for t, gg in zip(texts, groups) if gg == g] if groups else texts
        tokens = token_stream(lm, docs, conf.doc_separator, budget)
        r = perplexity(lm, tokens, conf.max_length, conf.stride, runtime, desc=f"{desc} {g}")
        nlls, k = r.pop("nlls"), 0
        for w in windows(len(tokens), conf.max_length, conf.stride):
            records.append({"group": g, "begin": w.begin, "end": w.end, "targets": w.n_targets,
                            "nll_sum": round(sum(nlls[k:k + w.n_targets]), 6)})
            k += w.n_targets
        total += sum(nlls)
        n += len(nlls)
        n_windows += r["windows"]
        by_group[g] = {"perplexity": r["perplexity"], "tokens_scored": r["tokens_scored"],
                       "windows": r["windows"], "documents": len(docs)}
        batch = r["batch_size"]
    return ({"perplexity": math.exp(total / n), "nll_per_token": total / n, "tokens_scored": n,
             "windows": n_windows, "max_length": conf.max_length, "stride": conf.stride,
             "min_context_after_first_window": conf.max_length - conf.stride, "tokens_per_group": budget,
             "batch_size": batch, "by_group": by_group}, records)
