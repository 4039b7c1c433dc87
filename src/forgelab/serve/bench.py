"""Serving benchmark: an OpenAI-compatible load generator and its metrics.

Requests are streamed chat completions. Arrivals follow a gamma process (Poisson when
burstiness is 1) or come all at once (rate inf); a thread pool bounds the requests in flight.
Per request it records the time of every streamed chunk that carries text, from which:

- TTFT: request sent -> first chunk with generated text
- ITL:  gaps between consecutive chunks with text (a chunk holding several tokens is one gap)
- E2EL: request sent -> stream finished
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token

Output tokens come from the usage the server reports in its last chunk, else from tokenizing
the text. A failed request never stops the run: it is counted by kind (connection, timeout,
http_<status>, protocol, stream_error, client_error) and the run goes on.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..jsonl import BadLine, iter_jsonl
from .bench_config import BenchServingConfig
from .client import Endpoint, RequestError, chat_body, delta_text, finish_reason, get_json, stream_events


class BenchError(RuntimeError):
    """The benchmark cannot run (no server, no prompts); the message says why."""


@dataclass
class BenchRequest:
    idx: int
    messages: list[dict]
    max_tokens: int
    prompt_len: int          # prompt tokens as the chat template renders them, by our tokenizer
    model: str = ""          # mixed-adapter workload: the `model` this request sends ("" : the endpoint's)


@dataclass
class RequestResult:
    idx: int
    ok: bool
    error_kind: str | None = None
    error: str | None = None
    start: float = 0.0       # seconds after the run began (when the request was sent)
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    tokens_from: str = ""    # "usage" or "tokenizer"
    finish_reason: str | None = None
    max_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # seconds after the run began
    model: str = ""          # the request's own `model` (mixed-adapter workload), else ""

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ----------------------------------------------------------------------------- workloads

def _chat_len(tok, messages: list[dict]) -> int:
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False))


def _random_text(tok, length: int, rng: np.random.Generator, vocab: np.ndarray) -> str:
    """Text of about `length` tokens made of real tokens of the served tokenizer.

    Decoding random ids and encoding the text again rarely gives the same count, so the ids
    are trimmed or extended until the round trip matches (or is close after a few tries)."""
    ids = list(rng.choice(vocab, size=length))
    text = tok.decode(ids)
    for _ in range(8):
        again = tok.encode(text, add_special_tokens=False)
        if len(again) == length:
            break
        if len(again) > length:
            again = again[:length]
        else:
            again = again + list(rng.choice(vocab, size=length - len(again)))
        text = tok.decode(again)
    return text


def random_requests(tok, conf: BenchServingConfig, n: int, rng: np.random.Generator) -> list[BenchRequest]:
    r = conf.random
    special = set(tok.all_special_ids)
    vocab = np.array([i for i in range(len(tok)) if i not in special])

    def lengths(mean: int) -> np.ndarray:
        lo = max(1, int(math.floor(mean * (1 - r.range_ratio))))
        hi = max(lo, int(math.ceil(mean * (1 + r.range_ratio))))
        return rng.integers(lo, hi + 1, size=n)

    in_lens, out_lens = lengths(r.input_len), lengths(r.output_len)
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": _random_text(tok, int(in_lens[i]), rng, vocab)}]
        out.append(BenchRequest(i, msgs, int(out_lens[i]), _chat_len(tok, msgs)))
    return out


_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


def _records(path: Path):
    """(where, record) from a JSON list (or {"data": [...]}) or a JSONL file."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}: invalid JSON: {e}") from None
        if isinstance(data, dict):
            data = data.get("data") or data.get("conversations") or []
        for i, rec in enumerate(data):
            yield f"{path}[{i}]", rec
        return
    for n, rec in iter_jsonl(path, bad="keep", error=BenchError):  # a bad line stays in place as a BadLine
        yield f"{path}:{n}", rec


def to_messages(rec) -> list[dict] | None:
    """A record as chat messages (OpenAI roles), or None when it is not a conversation."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("messages"), list):
        msgs = rec["messages"]
        ok = all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                 and isinstance(m.get("content"), str) for m in msgs)
        return [{"role": m["role"], "content": m["content"]} for m in msgs] if ok else None
    if isinstance(rec.get("conversations"), list):
        out = []
        for m in rec["conversations"]:
            if not isinstance(m, dict) or _ROLE.get(str(m.get("from", "")).lower()) is None \
                    or not isinstance(m.get("value"), str):
                return None
            out.append({"role": _ROLE[str(m["from"]).lower()], "content": m["value"]})
        return out
    return None


def conversation_requests(tok, conf: BenchServingConfig, n: int, rng: np.random.Generator,
                          log=None) -> list[BenchRequest]:
    """Prompt = the messages before a conversation's last assistant turn; max_tokens = the
    length of that reference answer (clipped to the configured range), or a fixed count."""
    from ..runs import project_path
    c = conf.conversations
    path = project_path(c.path)
    if not path.exists():
        raise BenchError(f"conversation file not found: {path}")
    records = list(_records(path))
    order = rng.permutation(len(records))
    out: list[BenchRequest] = []
    skipped = Counter()
    first_bad = None
    for j in order:
        where, rec = records[j]
        msgs = to_messages(rec) if not isinstance(rec, BadLine) else None
        if msgs is None:
            skipped["not a conversation"] += 1
            first_bad = first_bad or where
            continue
        last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        prompt = msgs[:last]
        if last < 1 or not any(m["role"] == "user" for m in prompt):
            skipped["no user turn before an answer"] += 1
            continue
        ref_len = len(tok.encode(msgs[last]["content"], add_special_tokens=False))
        if ref_len < c.min_output_tokens:
            skipped["answer too short"] += 1
            continue
        plen = _chat_len(tok, prompt)
        if plen > c.max_prompt_tokens:
            skipped["prompt too long"] += 1
            continue
        want = c.fixed_output_tokens or min(ref_len, c.max_output_tokens)
        out.append(BenchRequest(len(out), prompt, want, plen))
        if len(out) == n:
            break
    if log and skipped:
        log.info("conversations skipped: %s%s", dict(skipped),
                 f" (first unusable record: {first_bad})" if first_bad else "")
    if not out:
        raise BenchError(f"{path}: no usable conversation (skipped: {dict(skipped)})")
    if len(out) < n:  # fewer conversations than requests: reuse them in order
        if log:
            log.info("only %d usable conversations; reusing them for %d requests", len(out), n)
        out = [BenchRequest(i, out[i % len(out)].messages, out[i % len(out)].max_tokens,
                            out[i % len(out)].prompt_len) for i in range(n)]
    return out


def build_requests(tok, conf: BenchServingConfig, log=None) -> list[BenchRequest]:
    """Warm-up requests first, then the measured ones (same distribution, one seed)."""
    rng = np.random.default_rng(conf.seed)
    n = conf.num_prompts + conf.warmup_requests
    if conf.workload == "random":
        reqs = random_requests(tok, conf, n, rng)
    else:
        reqs = conversation_requests(tok, conf, n, rng, log)
    assign_models(reqs, conf)
    return reqs


def assign_models(reqs: list[BenchRequest], conf: BenchServingConfig) -> None:
    """Mixed-adapter workload: each request's `model` from conf.adapters, round-robin (warm-up
    and measured requests each starting at the first name) or drawn by adapter_weights."""
    names = conf.adapters
    if not names:
        return
    w = conf.warmup_requests
    if conf.adapter_weights:
        p = np.asarray(conf.adapter_weights, dtype=float)
        picks = np.random.default_rng(conf.seed + 2).choice(len(names), size=len(reqs), p=p / p.sum())
    else:
        picks = [(i if i < w else i - w) % len(names) for i in range(len(reqs))]
    for r, k in zip(reqs, picks):
        r.model = names[int(k)]


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s after start): gamma inter-arrivals with mean 1/rate, shape = burstiness."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


# ----------------------------------------------------------------------------- requests

def request_extras(profile: str, conf: BenchServingConfig) -> dict:
    """Optional request fields the backend accepts (transformers serve answers 422 to others;
    it always reports usage in its last chunk)."""
    if profile == "transformers":
        return {}
    extras: dict = {"stream_options": {"include_usage": True}}
    if profile == "vllm" and conf.ignore_eos:
        extras["ignore_eos"] = True
    return extras


def run_one(ep: Endpoint, req: BenchRequest, extras: dict, conf: BenchServingConfig, tok,
            t0: float) -> RequestResult:
    body = chat_body(ep, req.messages, max_tokens=req.max_tokens, temperature=conf.temperature,
                     stream=True, **extras)
    if req.model:
        body["model"] = req.model
    res = RequestResult(req.idx, ok=False, max_tokens=req.max_tokens, model=req.model)
    text: list[str] = []
    usage = None
    st = time.perf_counter()
    res.start = st - t0
    last = st
    try:
        for t, chunk in stream_events(ep, "chat/completions", body, timeout=conf.request_timeout_s,
                                      deadline=st + conf.request_timeout_s):
            if chunk.get("usage"):
                usage = chunk["usage"]
            piece = delta_text(chunk)
            if piece:
                if res.ttft is None:
                    res.ttft = t - st
                else:
                    res.itl.append(t - last)
                last = t
                res.chunk_times.append(t - t0)
                text.append(piece)
            res.finish_reason = finish_reason(chunk) or res.finish_reason
        res.latency = time.perf_counter() - st
        if res.finish_reason is None:
            raise RequestError("protocol", "stream ended without a finish_reason")
    except RequestError as e:
        res.error_kind, res.error = e.kind, e.message
        res.latency = time.perf_counter() - st
        return res
    res.ok = True
    if usage and usage.get("completion_tokens") is not None:
        res.output_tokens, res.tokens_from = int(usage["completion_tokens"]), "usage"
    else:
        res.output_tokens = len(tok.encode("".join(text), add_special_tokens=False))
        res.tokens_from = "tokenizer"
    res.prompt_tokens = int(usage["prompt_tokens"]) if usage and usage.get("prompt_tokens") \
        else req.prompt_len
    return res


def run_load(ep: Endpoint, reqs: list[BenchRequest], offsets: np.ndarray, concurrency: int,
             extras: dict, conf: BenchServingConfig, tok, desc: str = "requests",
             progress: bool = True, max_duration_s: float = 0.0) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time (pool-bounded), none after ``max_duration_s``
    (0: no limit); returns the results of the requests sent and the duration."""
    from tqdm import tqdm
    bar = tqdm(total=len(reqs), desc=desc, unit="req", disable=not progress)
    lock = threading.Lock()
    results: list[RequestResult] = []

    def task(req: BenchRequest, t0: float) -> None:
        try:
            r = run_one(ep, req, extras, conf, tok, t0)
        except Exception as e:  # noqa: BLE001 - a client-side fault must be counted, not lost in the pool
            r = RequestResult(req.idx, ok=False, error_kind="client_error",
                              error=f"{type(e).__name__}: {e}", max_tokens=req.max_tokens, model=req.model)
        with lock:
            results.append(r)
            bar.update(1)
            if not r.ok:
                bar.set_postfix(failed=sum(not x.ok for x in results))

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench") as pool:
        # Start every worker thread before the clock does: on a busy machine creating threads
        # one per submit visibly delays the first requests.
        ready = threading.Barrier(concurrency + 1)
        for _ in range(concurrency):
            pool.submit(ready.wait)
        ready.wait()
        t0 = time.perf_counter()
        for req, off in zip(reqs, offsets):
            if max_duration_s and time.perf_counter() - t0 >= max_duration_s:
                break
            wait = t0 + off - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            pool.submit(task, req, t0)
    duration = time.perf_counter() - t0
    bar.close()
    results.sort(key=lambda r: r.idx)
    return results, duration


# ----------------------------------------------------------------------------- metrics

def stats(values: list[float], percentiles: list[float], scale: float = 1000.0) -> dict:
    """count, mean, median, std, min, max and percentiles; seconds become ms by default."""
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=float) * scale
    out = {"count": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
           "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(a, p))
    return out


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    """A successful request within every SLO (ms). TPOT is undefined for one-token answers,
    which then pass that SLO."""
    got = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}
    for k, limit in slo.items():
        v = got[k]
        if v is None:
            if k == "tpot":
                continue
            return False
        if v * 1000.0 > limit:
            return False
    return True


def peak_concurrency(results: list[RequestResult]) -> int:
    events = []
    for r in results:
        if r.latency is not None:
            events += [(r.start, 1), (r.start + r.latency, -1)]
    peak = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        peak = max(peak, cur)
    return peak


def summarize(results: list[RequestResult], duration: float, conf: BenchServingConfig) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    pct = conf.percentiles
    s = {
        "requests": len(results), "completed": len(ok), "failed": len(failed),
        "failures_by_kind": dict(Counter(r.error_kind for r in failed)),
        "duration_s": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "peak_concurrency": peak_concurrency(results),
        "output_tokens_from": dict(Counter(r.tokens_from for r in ok)),
        "ttft_ms": stats([r.ttft for r in ok if r.ttft is not None], pct),
        "tpot_ms": stats([r.tpot for r in ok if r.tpot is not None], pct),
        "itl_ms": stats([g for r in ok for g in r.itl], pct),
        "e2el_ms": stats([r.latency for r in ok if r.latency is not None], pct),
        "output_len": stats([r.output_tokens for r in ok], pct, scale=1.0),
    }
    if conf.slo:
        good = sum(meets_slo(r, conf.slo) for r in ok)
        s["slo_ms"] = dict(conf.slo)
        s["good_requests"] = good
        s["goodput"] = good / duration if duration > 0 else 0.0
    if failed:
        s["first_errors"] = {k: next(r.error for r in failed if r.error_kind == k)
                             for k in s["failures_by_kind"]}
    if conf.adapters:
        s["per_adapter"] = {name: adapter_summary([r for r in results if r.model == name], duration, pct)
                            for name in conf.adapters}
    return s


def adapter_summary(results: list[RequestResult], duration: float, pct: list[float]) -> dict:
    """One adapter's share of a mixed run; throughputs divide by the whole run's wall time, so
    the adapters' rows add up to the totals."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    failed = [r for r in results if not r.ok]
    return {"requests": len(results), "completed": len(ok), "failed": len(failed),
            "failures_by_kind": dict(Counter(r.error_kind for r in failed)),
            "first_error": failed[0].error if failed else None,
            "total_output_tokens": out_tokens,
            "request_throughput": len(ok) / duration if duration > 0 else 0.0,
            "output_throughput": out_tokens / duration if duration > 0 else 0.0,
            "ttft_ms": stats([r.ttft for r in ok if r.ttft is not None], pct),
            "tpot_ms": stats([r.tpot for r in ok if r.tpot is not None], pct),
            "itl_ms": stats([g for r in ok for g in r.itl], pct),
            "e2el_ms": stats([r.latency for r in ok if r.latency is not None], pct)}


# ----------------------------------------------------------------------------- the run

def server_alive(ep: Endpoint) -> bool:
    try:
        get_json(ep, "/health", timeout=5)
        return True
    except RequestError:
        return False


def failure_notes(results: list[RequestResult], alive_after: bool) -> list[str]:
    """Plain-language notes on failures, e.g. the server dying mid-run."""
    notes = []
    failed = [r for r in results if not r.ok]
    if not failed:
        return notes
    conn = [r for r in failed if r.error_kind == "connection"]
    if not alive_after:
        first = min((r.start + (r.latency or 0.0) for r in conn), default=None)
        done_before = sum(r.ok for r in results if first is None or
                          (r.start + (r.latency or 0.0)) <= first)
        notes.append(
            "The server stopped answering during the run"
            + (f" (first connection failure {first:.1f} s after the start, {done_before} "
               f"requests had completed)" if first is not None else "")
            + f"; it was still down afterwards. The {len(failed)} requests that did not "
            "complete are counted as failures.")
    else:
        notes.append(f"{len(failed)} requests failed while the server stayed up; see failures by kind.")
    return notes


def run_benchmark(ep: Endpoint, tok, conf: BenchServingConfig, profile: str, log,
                  progress: bool = True) -> tuple[dict, list[RequestResult], list[BenchRequest]]:
    reqs = build_requests(tok, conf, log)
    warm, measured = reqs[:conf.warmup_requests], reqs[conf.warmup_requests:]
    extras = request_extras(profile, conf)
    conc = conf.concurrency_limit()
    if warm:
        log.info("warm-up: %d requests", len(warm))
        wres, _ = run_load(ep, warm, np.zeros(len(warm)), min(conc, len(warm)), extras, conf, tok,
                           desc="warm-up", progress=progress)
        if not any(r.ok for r in wres):
            raise BenchError(f"every warm-up request failed; first error: {wres[0].error_kind}: "
                             f"{wres[0].error}")
    offsets = arrival_offsets(len(measured), conf.rate(), conf.burstiness,
                              np.random.default_rng(conf.seed + 1))
    log.info("measuring %d requests: rate %s req/s, burstiness %g, concurrency limit %d",
             len(measured), conf.request_rate, conf.burstiness, conc)
    results, duration = run_load(ep, measured, offsets, conc, extras, conf, tok, progress=progress,
                                 max_duration_s=conf.max_duration_s)
    summary = summarize(results, duration, conf)
    summary["not_sent"] = not_sent = len(measured) - len(results)
    summary["server_alive_after_run"] = alive = server_alive(ep)
    summary["notes"] = failure_notes(results, alive)
    if not_sent:
        summary["notes"].append(f"{not_sent} of {len(measured)} requests were not sent: max_duration_s "
                                f"({conf.max_duration_s:g} s) was reached; the metrics cover the {len(results)} sent")
    summary["request_profile"] = profile
    summary["request_extras"] = extras
    summary["concurrency_limit"] = conc
    return summary, results, measured


def result_rows(results: list[RequestResult]) -> list[dict]:
    rows = []
    for r in results:
        d = asdict(r)
        d["tpot"] = r.tpot
        rows.append(d)
    return rows
