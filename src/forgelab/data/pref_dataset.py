"""Stage 03b: preference sources (pairs, LLaMA-Factory ranking datasets, KTO labels; jsonl,
json array or parquet) -> TRL's conversational schemas in ``<out_dir>/{pairs,kto}_{train,val}.jsonl``.

Built the way stage 03 builds SFT data: the same readers (locations are file:line), bad
records counted per reason (``strict`` makes the first one an error), exact duplicates
dropped, a hash split, atomic writes and a run summary. Two checks are preference-specific:
identical chosen/rejected answers are dropped and counted, and every record must render
through the tokenizer's chat template so that ``prompt + answer`` starts with exactly the
ids of the prompt with a generation prompt (otherwise the trainer's prompt/answer boundary
would be wrong). A template that breaks this for every record fails the stage.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, field
from ..model.tokenizer_info import tokenizer_fingerprint
from ..runs import fingerprint_paths, project_path, sha256_file
from .pref_formats import FORMATS, KINDS, PREF_REASONS, BadRecord, convert
from .sft_dataset import _unit_hash, _write_jsonl_atomic, check_selection, is_val, selection
from .sft_formats import SFTFileError, iter_records, template_fields

LOG_BAD_LIMIT = 20


class PrefDataError(RuntimeError):
    """A data problem that stops the stage (strict mode, unreadable file, broken template)."""


@dataclass
class PrefSource:
    path: str = field(help="jsonl, json array or parquet file (relative to the project root)")
    format: Literal["pairs", "alpaca_ranking", "sharegpt_ranking", "kto"] = field(
        "pairs", help="pairs (prompt|messages + chosen/rejected), alpaca_ranking (instruction/input + "
                      "chosen/rejected), sharegpt_ranking (conversations + chosen/rejected messages), "
                      "kto (prompt|messages|conversations + completion or last assistant turn + "
                      "label|kto_tag)")
    columns: dict[str, str] = field({}, help="format field -> field name in the file, e.g. {chosen: good}")
    system: Optional[str] = field(None, help="system prompt added to records that have none")
    user_template: str = field("{instruction}\n\n{input}", help="alpaca_ranking: how instruction and a "
                                                               "non-empty input form the user turn")
    optional: bool = field(False, help="a missing file is reported and skipped instead of failing")
    license: str = field("", help="license of the source, for the record")

    def validate(self) -> None:
        allowed = FORMATS[self.format][1]
        for k in self.columns:
            if k not in allowed:
                raise ConfigError(f"key 'columns.{k}': not a field of format {self.format!r} "
                                  f"(fields: {', '.join(allowed)})")
        if template_fields(self.user_template) != {"instruction", "input"}:
            raise ConfigError("key 'user_template': must use exactly {instruction} and {input}")


@dataclass
class PrefDataConfig:
    sources: dict[str, PrefSource] = field({}, help="named sources (see the sources[] keys)")
    use: list[str] = field([], help="sources to build, in order (empty: all); 'name#N' takes N "
                                    "records, chosen deterministically by seed")
    seed: int = field(42, help="seed of name#N sampling and of the train/val split hash")
    val_fraction: float = field(0.05, help="share of prompts in val (by hash of the prompt, so all "
                                           "answers to one prompt land in one split)")
    dedup: bool = field(True, help="drop exact duplicate records (counted per source)")
    strict: bool = field(False, help="fail on the first bad record, naming file:line (identical "
                                     "answers stay counted drops)")
    tokenizer: Optional[str] = field("model/smollm2-135m-instruct",
                                     help="model or tokenizer dir whose chat template is checked "
                                          "(null: skip the check)")
    out_dir: str = field("data/cleaned/pref", help="where {pairs,kto}_{train,val}.jsonl are written")

    def validate(self) -> None:
        check_selection(self.use, self.sources, self.val_fraction)

    def selection(self) -> list[tuple[str, int | None]]:
        return selection(self.use, self.sources)


def _hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Drops:
    """Dropped records by reason: count and first file:line; the first few logged one by one."""

    def __init__(self, log):
        self.log, self.count, self.first = log, Counter(), {}
        self.records: list[dict] = []

    def add(self, source: str, where: str, reason: str, detail: str, rec=None) -> None:
        self.count[reason] += 1
        self.first.setdefault(reason, where)
        self.records.append({"source": source, "where": where, "reason": reason, "detail": detail,
                             "record": None if rec is None or isinstance(rec, BadRecord)
                             else json.dumps(rec, ensure_ascii=False, default=str)[:500]})
        if self.count[reason] <= LOG_BAD_LIMIT:
            self.log.warning("dropped %s: %s: %s", where, reason, detail)

    def summary(self) -> dict:
        return {r: {"count": self.count[r], "first": self.first[r]} for r in PREF_REASONS if self.count[r]}


def _read_source(name: str, src: PrefSource, strict: bool, drops: _Drops) -> tuple[list, Counter]:
    """(rows with their file:line, bad counts by reason) of one source."""
    rows, bad = [], Counter()
    try:
        for line, rec in iter_records(project_path(src.path)):
            where = f"{src.path}:{line}"
            try:
                kind, prompt, answers = convert(rec, src.format, src.columns, src.user_template)
            except BadRecord as e:
                if strict and e.reason != "identical_answers":
                    raise PrefDataError(f"{where}: bad record ({e.reason}): {e.detail} "
                                        f"[strict mode]") from None
                bad[e.reason] += 1
                drops.add(name, where, e.reason, e.detail, rec)
                continue
            if src.system and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": src.system.strip()}] + prompt
            row = {"id": _hash({"prompt": prompt, **answers}), "source": name, "prompt": prompt, **answers}
            rows.append((kind, where, row))
    except SFTFileError as e:
        raise PrefDataError(str(e)) from None
    return rows, bad


def _sample(rows: list, n_take: int | None, seed: int, name: str, log) -> list:
    """The n_take rows with the smallest hash(seed, name, id): independent of file order."""
    if n_take is None:
        return rows
    if n_take > len(rows):
        log.warning("source %s: asked for %d records, only %d available: took all", name, n_take, len(rows))
    order = sorted(rows, key=lambda r: (_unit_hash(seed, "sample", name, r[2]["id"]), r[2]["id"]))
    keep = {id(r) for r in order[:n_take]}
    return [r for r in rows if id(r) in keep]


# ----------------------------------------------------------------------------- template check

def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                        tokenize=True, return_dict=True)
    return list(out["input_ids"])


def prefix_breaks(tokenizer, row: dict) -> list[str]:
    """The answers of a row whose rendering does not start with the prompt's generation-prompt ids."""
    head = _ids(tokenizer, row["prompt"], True)
    answers = ("chosen", "rejected") if "chosen" in row else ("completion",)
    return [a for a in answers if _ids(tokenizer, row["prompt"] + row[a], False)[:len(head)] != head]


def _template_name(tokenizer, path: str) -> str:
    t = tokenizer.chat_template
    digest = hashlib.sha256((t if isinstance(t, str) else json.dumps(t)).encode()).hexdigest()[:12]
    return f"the chat template of {path} (sha256 {digest})"


def check_template(rows: list, tok_path: str, strict: bool, drops: _Drops, log) -> tuple[list, dict]:
    """Drop (and count) the rows the chat template cannot split at the prompt; fail when it
    splits none of them, since then the template, not the data, is at fault."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(project_path(tok_path))
    if not tokenizer.chat_template:
        raise PrefDataError(f"tokenizer {tok_path}: has no chat template")
    kept, checked, failed = [], Counter(), 0
    for kind, where, row in rows:
        checked[kind] += 1
        broken = prefix_breaks(tokenizer, row)
        if not broken:
            kept.append((kind, where, row))
            continue
        failed += 1
        detail = (f"apply_chat_template(prompt + {'/'.join(broken)}) does not start with "
                  f"apply_chat_template(prompt, add_generation_prompt=True)")
        if strict:
            raise PrefDataError(f"{where}: bad record (chat_template_prefix): {detail} [strict mode]")
        drops.add(row["source"], where, "chat_template_prefix", detail)
    if rows and not kept:
        raise PrefDataError(f"{_template_name(tokenizer, tok_path)} is not prefix-stable: for all "
                            f"{len(rows)} records the prompt renders differently when an answer follows "
                            f"(first: {rows[0][1]})")
    return kept, {"tokenizer": tok_path, "checked_pairs": checked["pairs"],
                  "checked_kto": checked["kto"], "failed": failed}


# ----------------------------------------------------------------------------- the stage

def _write_outputs(out_dir: Path, splits: dict, log) -> dict[str, str]:
    """Write <kind>_<split>.jsonl for the kinds present; remove a stale file of an absent kind."""
    outputs = {}
    for kind in KINDS:
        for split in ("train", "val"):
            path = out_dir / f"{kind}_{split}.jsonl"
            if splits[kind]["train"] or splits[kind]["val"]:
                _write_jsonl_atomic(path, splits[kind][split])
                outputs[f"{kind}_{split}"] = str(path)
            elif path.exists():
                log.info("no %s records: removing the stale %s", kind, path)
                path.unlink()
    return outputs


def build_pref_dataset(conf: PrefDataConfig, run) -> dict:
    """Build the preference files; returns (and puts into run.summary) the stage summary."""
    drops = _Drops(run.log)
    seen: set[str] = set()
    rows_all: list = []
    per_source: dict[str, dict] = {}
    keys: dict[str, str] = {}  # source name -> its key in per_source ('name' or 'name#N')
    inputs: list[Path] = []
    for name, n_take in conf.selection():
        src = conf.sources[name]
        key = keys[name] = name if n_take is None else f"{name}#{n_take}"
        path = project_path(src.path)
        if not path.is_file():
            if src.optional:
                run.log.warning("optional source %s: %s not found, skipped", name, src.path)
                per_source[key] = {"path": src.path, "status": "missing (optional, skipped)"}
                continue
            raise PrefDataError(f"source {name!r}: file not found: {src.path} (mark it optional: true "
                                f"to skip it when missing)")
        inputs.append(path)
        rows, bad = _read_source(name, src, conf.strict, drops)
        n_read = len(rows) + sum(bad.values())
        unique = []
        for r in rows:  # dedup against what is already kept (earlier sources and this one)
            if not (conf.dedup and r[2]["id"] in seen):
                seen.add(r[2]["id"])
                unique.append(r)
        dups = len(rows) - len(unique)
        unique = _sample(unique, n_take, conf.seed, name, run.log)
        rows_all += unique
        per_source[key] = {"path": src.path, "format": src.format, "status": "ok", "records": n_read,
                           "bad": dict(bad), "duplicates": dups, "requested": n_take,
                           "taken": len(unique), "sha256": sha256_file(path), "license": src.license}
        run.log.info("source %s: %d records, %d dropped, %d duplicates -> %d taken",
                     key, n_read, sum(bad.values()), dups, len(unique))

    template = None
    if conf.tokenizer:
        rows_all, template = check_template(rows_all, conf.tokenizer, conf.strict, drops, run.log)
        run.tokenizer_fingerprint = tokenizer_fingerprint(project_path(conf.tokenizer))
    else:
        run.log.warning("tokenizer: null: the chat-template prefix check is skipped")
    if not rows_all:
        raise PrefDataError("no preference records: every selected source is missing, empty or dropped")

    splits = {k: {"train": [], "val": []} for k in KINDS}
    for kind, _, row in rows_all:
        # Split by prompt: answers to one prompt never straddle train and val.
        split = "val" if is_val(_hash(row["prompt"]), conf.seed, conf.val_fraction) else "train"
        splits[kind][split].append(row)
        st = per_source[keys[row["source"]]]
        st[f"{kind}_{split}"] = st.get(f"{kind}_{split}", 0) + 1

    out_dir = project_path(conf.out_dir)
    outputs = _write_outputs(out_dir, splits, run.log)
    bad_path = Path(run.dir) / "bad_records.jsonl"
    _write_jsonl_atomic(bad_path, drops.records)
    summary = {
        **{f"{k}_{s}": len(splits[k][s]) for k in KINDS for s in ("train", "val")},
        "dropped": sum(drops.count.values()),
        "dropped_by_reason": drops.summary(),
        "bad_records_file": str(bad_path),
        "duplicates": sum(s.get("duplicates", 0) for s in per_source.values()),
        "template_check": template,
        "sources": per_source,
        "outputs": outputs,
        "input_fingerprint": fingerprint_paths(inputs),
        "output_fingerprint": fingerprint_paths([Path(p) for p in outputs.values()]),
    }
    run.summary.update(summary)
    run.data_fingerprint = summary["output_fingerprint"]
    counts = {name: summary[name] for name in outputs}
    run.log.info("wrote %s to %s", ", ".join(f"{k} {n}" for k, n in counts.items()), out_dir)
    return summary
