"""Served LoRA adapters against PEFT: does vLLM's answer for `"model": <adapter>` equal what the
base model with that adapter gives in this process?

For each served name (an adapter, or the base model itself) and each prompt (chat messages
rendered through the model's own chat template), both sides decode greedily for exactly
`max_new_tokens` tokens (vLLM with ignore_eos, PEFT without stopping at the end token):

- vLLM: POST /v1/completions with the prompt's token ids, temperature 0, logprobs=1 and
  return_token_ids (the generated ids and each chosen token's logprob);
- PEFT: the base model in float32 with the adapter active (`disable_adapter()` for the base).

A row per served name says where the generated ids first diverge (None: never), the max and
mean absolute logprob difference over the common prefix, and which other names gave the very
same tokens on every prompt (`same_as`): adapters that all answer alike prove nothing.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .client import Endpoint, RequestError, request


class AdapterCheckError(RuntimeError):
    """The check cannot run (bad adapter dir, server refused a request); the message says why."""


def _as_messages(p) -> list[dict]:
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


def served_ids(ep: Endpoint, model: str, prompt_ids: list[int], max_new_tokens: int,
               timeout: float = 300.0) -> tuple[list[int], list[float]]:
    """vLLM's greedy continuation of token ids: (generated ids, logprob of each)."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_new_tokens, "temperature": 0.0,
            "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": 1, "ignore_eos": True,
            "return_token_ids": True, "skip_special_tokens": False, "stream": False}
    try:
        r = request(ep, "POST", "completions", body, timeout=timeout)
    except RequestError as e:
        raise AdapterCheckError(f"{ep.base_url} model {model!r}: {e}") from e
    c = r["choices"][0]
    ids = c.get("token_ids")
    if ids is None:
        raise AdapterCheckError(f"{ep.base_url} returned no token_ids (return_token_ids): is it vLLM?")
    lps = (c.get("logprobs") or {}).get("token_logprobs") or []
    return [int(i) for i in ids], [float(x) for x in lps]


def _greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens (no end-token stop) and the log-probability of each, with a KV cache."""
    import torch
    ids = torch.tensor([prompt_ids])
    out, lps, past = [], [], None
    with torch.no_grad():
        for _ in range(n):
            o = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logp = torch.log_softmax(o.logits[0, -1].float(), dim=-1)
            nxt = int(torch.argmax(logp))
            out.append(nxt)
            lps.append(float(logp[nxt]))
            ids = torch.tensor([[nxt]])
    return out, lps


def _compare(v_ids, v_lps, p_ids, p_lps) -> dict:
    n = min(len(v_ids), len(p_ids))
    div = next((i for i in range(n) if v_ids[i] != p_ids[i]), None)
    if div is None and len(v_ids) != len(p_ids):
        div = n
    common = n if div is None else div
    # logprobs are compared where both chose the same tokens so far (the divergent token too:
    # there both sides scored the same context)
    upto = min(n, common + (1 if div is not None and div < n else 0), len(v_lps), len(p_lps))
    diffs = [abs(v_lps[i] - p_lps[i]) for i in range(upto)] if upto else []
    return {"first_divergence": div, "common_prefix": common, "diffs": diffs}


def check_adapters(endpoint: Endpoint, base_dir, adapters: dict[str, str | None], prompts: list,
                   max_new_tokens: int, tokenizer_dir=None) -> list[dict]:
    """One row per served name in `adapters` (name -> adapter dir; None or "" is the base model
    served under that name): vLLM's greedy output against PEFT's on every prompt.

    Row keys: model, adapter, prompts, tokens, agree (prompts with identical ids), first_divergence
    (per prompt: token index or None), max_abs_logprob_diff, mean_abs_logprob_diff, same_as
    (other names whose tokens equal these on every prompt), distinct (same_as is empty), and
    `outputs` (per prompt: vllm and peft ids)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..eval.generation import encode
    base_dir = Path(base_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or base_dir)
    encoded = [encode(tok, _as_messages(p)).ids for p in prompts]
    named = {n: (str(d) if d else None) for n, d in adapters.items()}
    for n, d in named.items():
        if d and not (Path(d) / "adapter_config.json").is_file():
            raise AdapterCheckError(f"adapter {n!r}: {d} has no adapter_config.json")

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    peft_model = None
    for n, d in named.items():
        if d is None:
            continue
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, d, adapter_name=n)
        else:
            peft_model.load_adapter(d, adapter_name=n)
    if peft_model is not None:
        peft_model.eval()

    rows = []
    for n, d in named.items():
        if d is None:
            ctx = peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()
            runner = peft_model if peft_model is not None else model
        else:
            peft_model.set_adapter(n)
            ctx, runner = contextlib.nullcontext(), peft_model
        outs, divs, diffs = [], [], []
        with ctx:
            for ids in encoded:
                p_ids, p_lps = _greedy(runner, ids, max_new_tokens)
                v_ids, v_lps = served_ids(endpoint, n, ids, max_new_tokens)
                c = _compare(v_ids, v_lps, p_ids, p_lps)
                divs.append(c["first_divergence"])
                diffs += c["diffs"]
                outs.append({"vllm": v_ids, "peft": p_ids})
        rows.append({"model": n, "adapter": d or "(base)", "prompts": len(encoded),
                     "tokens": max_new_tokens, "agree": sum(x is None for x in divs),
                     "first_divergence": divs,
                     "max_abs_logprob_diff": max(diffs) if diffs else None,
                     "mean_abs_logprob_diff": sum(diffs) / len(diffs) if diffs else None,
                     "outputs": outs})
    for r in rows:
        mine = [o["vllm"] for o in r["outputs"]]
        r["same_as"] = [o["model"] for o in rows if o is not r and [x["vllm"] for x in o["outputs"]] == mine]
        r["distinct"] = not r["same_as"]
    return rows


def format_rows(rows: list[dict]) -> str:
    """A markdown table of check_adapters rows."""
    lines = ["| model | adapter | prompts agree | first divergence | max abs logprob diff | "
             "mean abs logprob diff | same tokens as |", "|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
    for r in rows:
        div = [d for d in r["first_divergence"] if d is not None]
        lines.append(f"| {r['model']} | {r['adapter']} | {r['agree']} / {r['prompts']} | "
                     f"{min(div) if div else 'none'} | {fmt(r['max_abs_logprob_diff'])} | "
                     f"{fmt(r['mean_abs_logprob_diff'])} | {', '.join(r['same_as']) or '-'} |")
    return "\n".join(lines)


def rows_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)
