"""Exact checks against llama-server's native endpoints (not the OpenAI ones): token ids, the
prompt its GGUF chat template renders, greedy decoding with per-token log-probabilities, and
teacher-forced log-probabilities of given tokens.

Every function takes the lab's Endpoint (e.g. `server.endpoint_from_state(state)`); the native
routes live at the server root (/tokenize, /apply-template, /completion), beside /v1. The API
key, when set, is sent as for every other request.

Log-probabilities: llama-server's `n_probs` gives, per generated token, the probability of the
token it picked and the top `n_probs` alternatives. With `post_sampling_probs` false (the default,
kept here) they are *pre-sampling*: a softmax of the model's raw logits over the whole vocabulary
(`get_token_probabilities` in tools/server/server-common.cpp), so neither temperature, top-k nor
logit_bias changes them; the server returns them as `logprob` (natural log).
"""
from __future__ import annotations

from .client import Endpoint, RequestError, request

FORCE_BIAS = 1000.0  # logit_bias that makes the greedy pick the forced token


def tokenize(ep: Endpoint, text: str, add_special: bool = False, timeout: float = 60.0) -> list[int]:
    """Token ids of `text` from the GGUF's own tokenizer (POST /tokenize). Special-token text such
    as <|im_start|> is parsed as the special token (as HF tokenizers do); no BOS/EOS is added
    unless add_special."""
    out = request(ep, "POST", "/tokenize", {"content": text, "add_special": add_special,
                                            "parse_special": True}, timeout=timeout)
    return [int(t) for t in out["tokens"]]


def detokenize(ep: Endpoint, ids: list[int], timeout: float = 60.0) -> str:
    return request(ep, "POST", "/detokenize", {"tokens": list(ids)}, timeout=timeout)["content"]


def apply_template(ep: Endpoint, messages: list[dict], add_generation_prompt: bool = True,
                   timeout: float = 60.0) -> str:
    """The prompt text llama-server renders from the GGUF's chat template (--jinja) for these
    messages (POST /apply-template), as it would for a chat completion."""
    out = request(ep, "POST", "/apply-template", {"messages": messages,
                                                  "add_generation_prompt": add_generation_prompt},
                  timeout=timeout)
    return out["prompt"]


def _complete(ep: Endpoint, prompt_ids: list[int], n: int, timeout: float, **extra) -> dict:
    body = {"prompt": [int(t) for t in prompt_ids], "n_predict": n, "temperature": 0.0,
            "n_probs": 1, "post_sampling_probs": False, "return_tokens": True,
            "cache_prompt": True, "stream": False, **extra}
    return request(ep, "POST", "/completion", body, timeout=timeout)


def greedy(ep: Endpoint, prompt_ids: list[int], n: int, ignore_eos: bool = False,
           timeout: float = 300.0) -> dict:
    """Greedy decoding of up to `n` tokens after the prompt given as token ids (POST /completion,
    temperature 0). Returns {"ids", "logprobs" (pre-sampling, natural log, one per id; None when
    a character spans several tokens, see below), "text",
    "stop_type" ("eos", "limit", "word"), "timings" (llama-server's: prompt_ms,
    predicted_per_second, ...)}. With ignore_eos the model's end token does not stop it."""
    out = _complete(ep, prompt_ids, n, timeout, ignore_eos=ignore_eos)
    probs = out.get("completion_probabilities") or []
    ids = [int(t) for t in out.get("tokens") or []]
    logprobs = [float(p["logprob"]) for p in probs]
    if len(probs) != len(ids):
        # llama-server reports one probability per complete UTF-8 piece: byte tokens of one
        # character (Chinese through a byte-level BPE) share one entry. The ids are still exact;
        # per-token log-probabilities then come from prompt_logprobs (teacher forcing).
        logprobs = None
    elif [int(p["id"]) for p in probs] != ids:
        raise RequestError("protocol", "/completion: token ids and probability ids disagree")
    return {"ids": ids, "logprobs": logprobs, "text": out.get("content", ""),
            "stop_type": out.get("stop_type", ""), "timings": out.get("timings", {})}


def prompt_logprobs(ep: Endpoint, ids: list[int], timeout: float = 120.0) -> list[float | None]:
    """Teacher-forced log-probabilities: element i-1 is log p(ids[i] | ids[:i]) for i = 1..len-1.

    llama-server does not return prompt log-probabilities: /v1/completions refuses `echo`
    ("Only no echo is supported", server-common.cpp) and /completion reports probabilities of
    generated tokens only. So each position is one /completion of one token after ids[:i], with
    the next true token forced by logit_bias; its reported logprob is pre-sampling (raw logits,
    full vocabulary), so the bias does not change it. The prompt cache (cache_prompt) makes each
    request evaluate one new token: len(ids) requests of O(1) work each, fine for checks on
    hundreds of tokens (llama-perplexity is the tool for corpora).

    A forced token that ends inside a UTF-8 character (a byte token of a Chinese character) gets
    no probability back: the server reports per complete piece. Its element is None; callers
    compare only the positions scored."""
    out: list[float] = []
    for i in range(1, len(ids)):
        want = int(ids[i])
        r = _complete(ep, ids[:i], 1, timeout, logit_bias=[[want, FORCE_BIAS]])  # no ignore_eos: it bans EOG ids
        probs = r.get("completion_probabilities") or []
        if not probs and [int(t) for t in r.get("tokens") or []] == [want]:
            out.append(None)  # a partial UTF-8 piece: generated, but its probability withheld
            continue
        if len(probs) != 1 or int(probs[0]["id"]) != want:
            got = probs[0]["id"] if probs else None
            raise RequestError("protocol", f"position {i}: forced token {want}, server returned {got}")
        out.append(float(probs[0]["logprob"]))
    return out
