"""Batch inference over an OpenAI-compatible server: a JSONL of prompts (or message lists) in,
a JSONL of answers out, keyed by id.

Resumable: answers are appended one whole line at a time (flushed and synced) from a single
writer, so an interrupted run leaves complete lines plus at most one torn last line. A re-run
cuts the torn line, skips every id already answered and sends only the rest, so no id is
answered twice. Failed requests (after retries) go to <output>.errors.jsonl, not to the
output, so the next run tries them again.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ..jsonl import BadLine, cut_torn_tail, iter_jsonl
from ..runs import atomic_write_text
from .client import Endpoint, RequestError, chat_once


class BatchError(ValueError):
    """Unusable input or output file; the message names file:line."""


@dataclass
class BatchItem:
    id: str
    messages: list[dict]
    params: dict


def read_inputs(path: Path) -> list[BatchItem]:
    """Lines: {"id"?, "prompt": str} or {"id"?, "messages": [...]}, optionally max_tokens /
    temperature / top_p / stop / seed. Without an id, a line is known by its line number."""
    if not path.exists():
        raise BatchError(f"input file not found: {path}")
    items, seen = [], {}
    for n, rec in iter_jsonl(path, error=BatchError):
        where = f"{path}:{n}"
        if not isinstance(rec, dict):
            raise BatchError(f"{where}: expected an object with 'prompt' or 'messages'")
        rid = str(rec["id"]) if rec.get("id") is not None else f"line-{n}"
        if rid in seen:
            raise BatchError(f"{where}: duplicate id {rid!r} (first at line {seen[rid]})")
        seen[rid] = n
        if isinstance(rec.get("messages"), list) and rec["messages"]:
            msgs = rec["messages"]
        elif isinstance(rec.get("prompt"), str):
            msgs = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise BatchError(f"{where}: needs a string 'prompt' or a non-empty 'messages' list")
        params = {k: rec[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed") if k in rec}
        items.append(BatchItem(rid, msgs, params))
    return items


def done_ids(path: Path, log=None) -> set[str]:
    """Ids already answered in an output file; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return set()
    cut_torn_tail(path, log)
    ids = set()
    for n, rec in iter_jsonl(path, bad="keep", error=BatchError):
        if not isinstance(rec, dict) or "id" not in rec:
            why = f" ({rec.reason})" if isinstance(rec, BadLine) else ""
            raise BatchError(f"{path}:{n}: not an answer line of this tool{why}; refusing to append")
        ids.add(str(rec["id"]))
    return ids


def infer_one(ep: Endpoint, item: BatchItem, defaults: dict, retries: int, timeout: float) -> dict:
    """One request with retries on transient failures (connection, timeout, 5xx, 408, 429)."""
    params = {**defaults, **item.params}
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        try:
            r = chat_once(ep, item.messages, timeout=timeout, **params)
            choice = (r.get("choices") or [{}])[0]
            return {"id": item.id, "output": (choice.get("message") or {}).get("content"),
                    "finish_reason": choice.get("finish_reason"), "usage": r.get("usage"),
                    "model": r.get("model"), "latency_s": round(time.perf_counter() - t0, 4),
                    "attempts": attempt + 1}
        except RequestError as e:
            if not e.retryable or attempt == retries:
                return {"id": item.id, "error_kind": e.kind, "error": e.message, "attempts": attempt + 1}
            time.sleep(min(2 ** attempt, 30))
    raise AssertionError("unreachable")


def run_batch(ep: Endpoint, input_path: Path, output_path: Path, concurrency: int = 4,
              retries: int = 3, timeout: float = 300.0, defaults: dict | None = None,
              log=None, progress: bool = True) -> dict:
    from tqdm import tqdm
    items = read_inputs(input_path)
    done = done_ids(output_path, log)
    unknown = done - {i.id for i in items}
    if unknown and log:
        log.warning("%d ids in %s are not in %s", len(unknown), output_path, input_path)
    todo = [i for i in items if i.id not in done]
    if log:
        log.info("%d inputs, %d already answered, %d to send (concurrency %d)",
                 len(items), len(items) - len(todo), len(todo), concurrency)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    errors: list[dict] = []
    written = 0
    window = max(1, concurrency) * 4  # bounded in-flight futures for very large inputs
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="batch", unit="req",
               disable=not progress)
    with open(output_path, "a", encoding="utf-8") as out, \
            ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        pending: set[Future] = set()
        it = iter(todo)

        def collect(fs) -> None:
            nonlocal written
            for f in fs:
                rec = f.result()
                if "error" in rec:
                    errors.append(rec)
                else:
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    written += 1
                bar.update(1)

        for item in it:
            pending.add(pool.submit(infer_one, ep, item, defaults or {}, retries, timeout))
            if len(pending) >= window:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                collect(finished)
        finished, _ = wait(pending)
        collect(finished)
    bar.close()
    err_path = output_path.with_name(output_path.name + ".errors.jsonl")
    if errors:
        atomic_write_text(err_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    elif err_path.exists():
        err_path.unlink()
    return {"inputs": len(items), "already_done": len(items) - len(todo), "answered": written,
            "failed": len(errors), "errors_file": str(err_path) if errors else None,
            "output": str(output_path)}
