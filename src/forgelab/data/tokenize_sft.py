"""Stage 05: SFT conversations -> token ids with the model's own chat template, labels only
on assistant turns, optional packing, written as the SFT store (see sft_store.py).

Assistant spans are found by rendering prefixes of the conversation with the same template
(``apply_chat_template``) and checking that their ids are a prefix of the full ids: tokens
after the prompt of turn i (``...<|im_start|>assistant\\n``) up to and including the turn's
end token are labelled; the header and everything else is -100. A template that is not
prefix-stable (e.g. one that rewrites earlier turns) fails loudly.
"""
from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from tqdm import tqdm

from ..components import load_component
from ..config import ConfigError, field
from ..model.tokenizer_info import tokenizer_fingerprint, tokenizer_fingerprint_with_template
from ..runs import display_path, fingerprint_paths, project_path
from .sft_formats import BadRecord, check_conversation
from .sft_store import IGNORE_INDEX, write_store

POLICIES = ("drop", "truncate_left_context", "truncate_right")


class TemplateError(RuntimeError):
    """The chat template cannot be used for assistant-only labels."""


class SFTTokenizeError(RuntimeError):
    """Bad input to stage 05 (missing files, unreadable lines), with file:line where known."""


@dataclass
class TokenizeSFTConfig:
    tokenizer: str = field("model/smollm2-135m-instruct", help="model or tokenizer directory; "
                                                              "its chat template is used unless chat_template is set")
    chat_template: Optional[str] = field(None, help="plug-in chat template: dotted path (module:name or "
                                                    "path/file.py:name) of a Jinja str or a template() -> str "
                                                    "function, set on the tokenizer before tokenizing and "
                                                    "recorded in meta.json and the tokenizer fingerprint "
                                                    "(null: the tokenizer's own); docs/components.md")
    data_dir: str = field("data/cleaned/sft", help="stage 03 output (<split>.jsonl files)")
    splits: list[str] = field(["train", "val"], help="splits to tokenize")
    out_dir: str = field("data/tokenized/sft", help="output: <out_dir>/<split>/ stores")
    seq_len: int = field(512, help="maximum tokens per row (and per sample)")
    truncation: Literal["drop", "truncate_left_context", "truncate_right"] = field(
        "drop", help="samples longer than seq_len: drop; truncate_left_context (remove the "
                     "oldest exchanges, keep system + last turns; drop if still too long); "
                     "truncate_right (cut the end)")
    packing: bool = field(True, help="place whole samples into rows of <= seq_len (best-fit "
                                     "decreasing); false: one sample per row")
    end_token: Optional[str] = field(None, help="token that ends an assistant turn and is "
                                                "learned (default: the tokenizer's eos token)")
    waste_batch_size: int = field(8, help="batch size for the padding-waste figure in meta.json")
    seed: int = field(0, help="seed of the shuffled-order padding-waste estimate")

    def validate(self) -> None:
        if self.seq_len < 8:
            raise ConfigError(f"key 'seq_len': {self.seq_len} is too small")
        if self.waste_batch_size < 1:
            raise ConfigError("key 'waste_batch_size': must be >= 1")
        if not self.splits:
            raise ConfigError("key 'splits': empty")
        if self.chat_template is not None:
            load_component("chat_template", self.chat_template, "chat_template")


def chat_template_info(conf: TokenizeSFTConfig, tokenizer) -> dict | None:
    """With conf.chat_template: set it on the tokenizer and return what meta.json records
    (path, sha256, the template text, the fingerprints with and without it); else None."""
    if conf.chat_template is None:
        return None
    template = load_component("chat_template", conf.chat_template, "chat_template")
    tokenizer.chat_template = template
    tok_dir = project_path(conf.tokenizer)
    return {"path": conf.chat_template, "sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
            "template": template, "base_tokenizer_fingerprint": tokenizer_fingerprint(tok_dir),
            "tokenizer_fingerprint": tokenizer_fingerprint_with_template(tok_dir, template)}


def _with_template(fp: str, info: dict | None) -> str:
    """A data fingerprint that also names the chat template (unchanged without one)."""
    return fp if info is None else hashlib.sha256(f"{fp}:{info['sha256']}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- one conversation

def _ids(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                        tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _end_token_id(tokenizer, end_token: str | None) -> int:
    if end_token is None:
        if tokenizer.eos_token_id is None:
            raise TemplateError("tokenizer has no eos token: set end_token")
        return tokenizer.eos_token_id
    tid = tokenizer.convert_tokens_to_ids(end_token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise TemplateError(f"end_token {end_token!r} is not a token of this tokenizer")
    return tid


def render_labels(tokenizer, messages: list[dict], tools=None, end_token_id: int | None = None
                  ) -> tuple[list[int], list[int]]:
    """Full ids of a conversation and labels that keep only assistant content + end token."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError("tokenizer has no chat template")
    end_id = _end_token_id(tokenizer, None) if end_token_id is None else end_token_id
    full = _ids(tokenizer, messages, tools, False)
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _ids(tokenizer, messages[:i], tools, True)
        upto = full if i == len(messages) - 1 else _ids(tokenizer, messages[:i + 1], tools, False)
        for name, part in (("prompt", head), ("conversation", upto)):
            if full[:len(part)] != part:
                raise TemplateError(
                    f"chat template is not prefix-stable: the {name} up to message {i} does not "
                    f"tokenize to a prefix of the whole conversation, so assistant spans cannot be "
                    f"located (a template that rewrites earlier turns?)")
        ends = [j for j in range(len(head), len(upto)) if full[j] == end_id]
        if not ends:
            raise TemplateError(f"assistant message {i}: end token id {end_id} not found in its "
                                f"span; set end_token to the token that closes a turn")
        stop = ends[-1] + 1  # what follows the end token (a newline in ChatML) stays masked
        labels[len(head):stop] = full[len(head):stop]
    return full, labels


def _encode(tokenizer, messages, max_len, policy, tools=None, end_token_id=None):
    """-> (result | None, status) with status 'ok', 'truncated' or 'dropped:<why>'."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} not in {POLICIES}")
    ids, labels = render_labels(tokenizer, messages, tools, end_token_id)
    if max_len is None or len(ids) <= max_len:
        return {"input_ids": ids, "labels": labels}, "ok"
    if policy == "drop":
        return None, "dropped:too_long"
    if policy == "truncate_right":
        ids, labels = ids[:max_len], labels[:max_len]
        if all(x == IGNORE_INDEX for x in labels):
            return None, "dropped:no_labels_left"
        return {"input_ids": ids, "labels": labels}, "truncated"
    # truncate_left_context: drop the oldest exchanges (user turn up to the next user turn),
    # keeping the system message, until it fits or one exchange is left.
    sys_msgs = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(sys_msgs):]
    while True:
        starts = [k for k, m in enumerate(body) if m["role"] == "user"]
        if len(starts) < 2:
            return None, "dropped:too_long_after_context_truncation"
        body = body[starts[1]:]
        ids, labels = render_labels(tokenizer, sys_msgs + body, tools, end_token_id)
        if len(ids) <= max_len:
            return {"input_ids": ids, "labels": labels}, "truncated"


def encode_conversation(tokenizer, messages: list[dict], max_len: int | None = None,
                        policy: str = "drop", tools: list | None = None) -> dict | None:
    """Token ids and assistant-only labels of one conversation with the tokenizer's own chat
    template; None when the policy drops it (too long). The prompt of a served request is
    ``apply_chat_template(messages[:i], add_generation_prompt=True)``, which this checks is a
    prefix of these ids."""
    return _encode(tokenizer, messages, max_len, policy, tools)[0]


# ----------------------------------------------------------------------------- packing

def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: sample indices per row, deterministic.

    Longest first (ties by index); each goes to the open row with the least room that fits it
    (ties by row index), else a new row.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens > capacity {capacity}")
        k = bisect_left(free, (n, -1))
        if k == len(free):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room, b = free.pop(k)
        bins[b].append(i)
        if room - n > 0:
            insort(free, (room - n, b))
    return bins


def padding_waste(row_lengths: list[int], batch_size: int, seed: int) -> dict:
    """Share of padding if consecutive rows were batched and padded to the longest row."""
    def waste(lengths: np.ndarray) -> tuple[int, float]:
        pad = total = 0
        for s in range(0, len(lengths), batch_size):
            chunk = lengths[s:s + batch_size]
            pad += int(chunk.max() * len(chunk) - chunk.sum())
            total += int(chunk.max() * len(chunk))
        return pad, (pad / total if total else 0.0)

    lengths = np.asarray(row_lengths, dtype=np.int64)
    pad, frac = waste(lengths)
    _, frac_shuf = waste(lengths[np.random.default_rng(seed).permutation(len(lengths))])
    return {"batch_size": batch_size, "pad_tokens": pad, "fraction": round(frac, 4),
            "fraction_shuffled": round(frac_shuf, 4)}


# ----------------------------------------------------------------------------- one split

def _control_tokens(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def read_conversations(path: Path):
    """Yield (line, record) of a stage 03 jsonl file; malformed lines stop with file:line."""
    from ..jsonl import iter_jsonl
    for n, rec in iter_jsonl(path, error=SFTTokenizeError):
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in rec["messages"]):
            raise SFTTokenizeError(f"{path}:{n}: expected an object with 'messages' of "
                                   f"{{role, content}} strings (stage 03 output)")
        try:
            check_conversation(rec["messages"], allow_tool_runs=True)
        except BadRecord as e:
            raise SFTTokenizeError(f"{path}:{n}: {e} (stage 03 output expected)") from None
        yield n, rec


def tokenize_split(conf: TokenizeSFTConfig, tokenizer, src: Path, dst: Path, log) -> dict:
    """Tokenize one split file into a store; returns its meta. With conf.chat_template the
    tokenizer is given that template first."""
    template = chat_template_info(conf, tokenizer)
    end_id = _end_token_id(tokenizer, conf.end_token)
    controls = _control_tokens(tokenizer)
    samples: list[tuple[list[int], list[int]]] = []
    status = Counter()
    tools_ignored = 0
    with open(src, "rb") as f:  # bytes: an undecodable line is read_conversations' file:line error
        lines = sum(1 for _ in f)
    for n, rec in tqdm(read_conversations(src), total=lines, desc=f"tokenize {src.stem}",
                       unit="conv", mininterval=2.0):
        messages, tools = rec["messages"], rec.get("tools")
        hit = next((t for m in messages for t in controls if t in m["content"]), None)
        if hit is not None:
            # A control token inside content would be read as structure, not text.
            res, st = None, "dropped:control_token_in_content"
        else:
            if tools and tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == \
                    tokenizer.apply_chat_template(messages, tokenize=False):
                tools_ignored += 1
            try:
                res, st = _encode(tokenizer, messages, conf.seq_len, conf.truncation, tools, end_id)
            except TemplateError as e:
                raise TemplateError(f"{src}:{n}: {e}") from None
        status[st] += 1
        if res is None:
            n_dropped = sum(v for k, v in status.items() if k.startswith("dropped:"))
            if n_dropped <= 10:  # the first few by location; all of them are counted in meta.json
                log.warning("%s:%d: %s (seq_len %d, policy %s%s)", src, n, st, conf.seq_len,
                            conf.truncation, f", token {hit!r}" if hit else "")
            continue
        if res["labels"][0] != IGNORE_INDEX:
            # Packed rows rely on it: a sample's first token is never a target, so no loss
            # term ever crosses from one packed sample into the next.
            raise TemplateError(f"{src}:{n}: the first token is labelled; cannot pack safely")
        samples.append((res["input_ids"], res["labels"]))
    if tools_ignored:
        log.warning("%s: %d conversations carry tools that the chat template does not render",
                    src, tools_ignored)

    lengths = [len(s[0]) for s in samples]
    rows = pack_best_fit(lengths, conf.seq_len) if conf.packing else [[i] for i in range(len(samples))]
    row_lengths = [sum(lengths[i] for i in r) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(row_lengths)
    n_tokens = int(offsets[-1])
    input_ids = np.empty(n_tokens, dtype=np.int32)
    labels = np.empty(n_tokens, dtype=np.int32)
    positions = np.empty(n_tokens, dtype=np.int32)
    pos = 0
    for r in rows:
        for i in r:
            ids, lab = samples[i]
            input_ids[pos:pos + len(ids)] = ids
            labels[pos:pos + len(ids)] = lab
            positions[pos:pos + len(ids)] = np.arange(len(ids))
            pos += len(ids)

    dropped = {k.split(":", 1)[1]: v for k, v in status.items() if k.startswith("dropped:")}
    content = hashlib.sha256()
    for arr in (input_ids, labels, positions, offsets):
        content.update(arr.tobytes())
    meta = {
        "format_version": 1,
        "split": src.stem,
        "seq_len": conf.seq_len,
        "packed": conf.packing,
        "n_rows": len(rows),
        "n_samples": len(samples),
        "n_tokens": n_tokens,
        "n_label_tokens": int((labels != IGNORE_INDEX).sum()),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id,
        "eos_token_id": tokenizer.eos_token_id,
        "end_token_id": end_id,
        "truncation": {"policy": conf.truncation, "truncated": status["truncated"],
                       "dropped": sum(dropped.values()), "dropped_by_reason": dropped},
        "padding_waste": padding_waste(row_lengths, conf.waste_batch_size, conf.seed),
        "row_fill": round(n_tokens / (len(rows) * conf.seq_len), 4) if rows else 0.0,
        "sample_tokens": _stats(lengths),
        "samples_per_row": round(len(samples) / len(rows), 3) if rows else 0.0,
        "tools_ignored_by_template": tools_ignored,
        "conversations_read": sum(status.values()),
        "tokenizer_path": conf.tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(project_path(conf.tokenizer)),
        "data_fingerprint": fingerprint_paths([src]),
        "source_file": display_path(src),
        "content_sha256": content.hexdigest()[:16],
    }
    if template is not None:  # training sets this template on the tokenizer it saves with the model
        meta["tokenizer_fingerprint"] = template["tokenizer_fingerprint"]
        meta["data_fingerprint"] = _with_template(meta["data_fingerprint"], template)
        meta["chat_template"] = template
    write_store(dst, input_ids, labels, positions, offsets, meta)
    return meta


def _stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"mean": 0, "p50": 0, "p90": 0, "max": 0}
    a = np.asarray(lengths)
    return {"mean": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)),
            "p90": int(np.percentile(a, 90)), "max": int(a.max())}


def tokenize_sft(conf: TokenizeSFTConfig, run) -> dict:
    """Tokenize every split; returns (and puts into run.summary) the per-split meta."""
    from transformers import AutoTokenizer

    tok_dir = project_path(conf.tokenizer)
    if not tok_dir.is_dir():
        raise SFTTokenizeError(f"tokenizer directory not found: {conf.tokenizer} "
                               f"(run scripts/01_download_data.py)")
    srcs = {s: project_path(conf.data_dir) / f"{s}.jsonl" for s in conf.splits}
    for s, p in srcs.items():
        if not p.is_file():
            raise SFTTokenizeError(f"split {s!r}: {p} not found (run scripts/03_build_sft_dataset.py)")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    out = {}
    for s, p in srcs.items():
        meta = tokenize_split(conf, tokenizer, p, project_path(conf.out_dir) / s, run.log)
        t = meta["truncation"]
        run.log.info("%s: %d samples -> %d rows (%s), %d tokens, %d labelled; truncated %d, "
                     "dropped %d; fill %.1f%%, padding waste %.1f%% at batch %d",
                     s, meta["n_samples"], meta["n_rows"], "packed" if meta["packed"] else "unpacked",
                     meta["n_tokens"], meta["n_label_tokens"], t["truncated"], t["dropped"],
                     100 * meta["row_fill"], 100 * meta["padding_waste"]["fraction"],
                     meta["padding_waste"]["batch_size"])
        out[s] = meta
    run.summary.update({"splits": out, "out_dir": conf.out_dir})
    run.tokenizer_fingerprint = next(iter(out.values()))["tokenizer_fingerprint"]
    run.data_fingerprint = _with_template(fingerprint_paths(list(srcs.values())),
                                          next(iter(out.values())).get("chat_template"))
    return out
