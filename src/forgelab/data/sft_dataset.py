"""Stage 03: SFT sources (alpaca / sharegpt / messages; jsonl, json array or parquet) -> one
messages schema in ``<out_dir>/train.jsonl`` and ``val.jsonl``.

Every record gets a stable id (a hash of its messages), so the train/val split (by a hash of
the id) and ``name#N`` sampling (the N smallest hashes of the id) do not depend on file order,
and adding data never moves existing records between splits. Bad records are reported with
file:line and reason, counted per reason and written to ``bad_records.jsonl`` in the run dir;
a line with bytes that are not UTF-8 is one such record (``not_utf8``, with its byte column),
never a reason to drop the file. ``strict`` stops at the first bad record of any kind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from tqdm import tqdm

from ..components import component_fingerprints, load_components
from ..config import ConfigError, field
from ..runs import fingerprint_paths, project_path, sha256_file
from .sft_formats import (FORMAT_FIELDS, REASONS, SHAREGPT_ROLES, BadRecord, SFTFileError, convert,
                          iter_records, template_fields)

USE_RE = re.compile(r"^([A-Za-z0-9_.\-]+)(?:#(\d+))?$")
LOG_BAD_LIMIT = 20  # bad records logged one by one; the rest are in bad_records.jsonl


class SFTDataError(RuntimeError):
    """A data problem that stops the stage (strict mode, unreadable file, missing source)."""


@dataclass
class SFTSource:
    path: str = field(help="jsonl, json array or parquet file (relative to the project root)")
    format: Literal["alpaca", "sharegpt", "messages"] = field(
        "alpaca", help="record format: alpaca (instruction/input/output), sharegpt "
                       "(conversations of from/value), messages (OpenAI role/content)")
    columns: dict[str, str] = field({}, help="format field -> field name in the file, "
                                             "e.g. {instruction: question, output: answer}")
    roles: dict[str, str] = field({}, help="extra role tags -> a role of the format, e.g. {bing: gpt}")
    system: Optional[str] = field(None, help="system prompt added to records that have none")
    user_template: str = field("{instruction}\n\n{input}", help="alpaca: how instruction and a "
                                                               "non-empty input form the user turn")
    optional: bool = field(False, help="a missing file is reported and skipped instead of failing")
    license: str = field("", help="license of the source, for the record")
    preprocess: list[str] = field([], help="plug-in preprocessors, in order: dotted paths (module:name or "
                                           "path/file.py:name) of preprocess(record: dict) -> dict | None, "
                                           "applied to each raw record before format conversion; None "
                                           "drops it (counted per preprocessor); docs/components.md")

    def validate(self) -> None:
        allowed = FORMAT_FIELDS[self.format]
        for k in self.columns:
            if k not in allowed:
                raise ConfigError(f"key 'columns.{k}': not a field of format {self.format!r} "
                                  f"(fields: {', '.join(allowed)})")
        tags = SHAREGPT_ROLES if self.format == "sharegpt" else \
            {"system", "user", "assistant", "tool"} if self.format == "messages" else None
        if self.roles and tags is None:
            raise ConfigError("key 'roles': only for the sharegpt and messages formats")
        for k, v in self.roles.items():
            if v not in tags:
                raise ConfigError(f"key 'roles.{k}': {v!r} is not a role of format "
                                  f"{self.format!r} ({', '.join(tags)})")
        if template_fields(self.user_template) != {"instruction", "input"}:
            raise ConfigError("key 'user_template': must use exactly {instruction} and {input}")


@dataclass
class SFTDataConfig:
    sources: dict[str, SFTSource] = field({}, help="named sources (see the sources[] keys)")
    use: list[str] = field([], help="sources to build, in order (empty: all); 'name#N' takes N "
                                    "records, chosen deterministically by seed")
    seed: int = field(42, help="seed of name#N sampling and of the train/val split hash")
    val_fraction: float = field(0.05, help="share of records in val.jsonl (by hash of the record id)")
    dedup: bool = field(True, help="drop exact duplicate conversations (counted per source)")
    strict: bool = field(False, help="fail on the first bad record, naming file:line")
    out_dir: str = field("data/cleaned/sft", help="where train.jsonl and val.jsonl are written")
    keep: list[str] = field([], help="plug-in filters: dotted paths of keep(record: dict) -> bool, called on "
                                     "each converted conversation {id, source, messages[, tools]} before "
                                     "dedup; False drops it (counted per filter); docs/components.md")

    def validate(self) -> None:
        for name, src in self.sources.items():  # a wrong path fails here, before any data is read
            load_components("preprocessor", src.preprocess, f"sources.{name}.preprocess")
        load_components("filter", self.keep, "keep")
        check_selection(self.use, self.sources, self.val_fraction)

    def selection(self) -> list[tuple[str, int | None]]:
        return selection(self.use, self.sources)


def check_selection(use: list[str], sources: dict, val_fraction: float) -> None:
    """The keys every data stage with named sources shares: val_fraction, sources, use."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"key 'val_fraction': {val_fraction} not in [0, 1)")
    if not sources:
        raise ConfigError("key 'sources': no sources defined")
    for item in use:
        m = USE_RE.match(item)
        if not m:
            raise ConfigError(f"key 'use': {item!r} is not 'name' or 'name#N'")
        if m.group(1) not in sources:
            raise ConfigError(f"key 'use': no source named {m.group(1)!r} "
                              f"(sources: {', '.join(sources)})")
        if m.group(2) is not None and int(m.group(2)) <= 0:
            raise ConfigError(f"key 'use': {item!r}: N must be positive")


def selection(use: list[str], sources: dict) -> list[tuple[str, int | None]]:
    """(source name, N or None for all) for each 'name' / 'name#N' of use (all sources when empty)."""
    out = []
    for item in use or list(sources):
        m = USE_RE.match(item)
        out.append((m.group(1), int(m.group(2)) if m.group(2) else None))
    return out


def record_id(messages: list[dict], tools: list | None) -> str:
    blob = json.dumps({"messages": messages, "tools": tools}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from the parts (stable across runs and machines)."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_val(rid: str, seed: int, val_fraction: float) -> bool:
    return _unit_hash(seed, "split", rid) < val_fraction


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _preprocess(fns: dict, rec, where: str, dropped: Counter):
    """A raw record through the source's preprocessors; None when one of them drops it."""
    for pname, fn in fns.items():
        try:
            out = fn(rec)
        except Exception as e:
            raise SFTDataError(f"{where}: preprocessor {pname!r} raised {type(e).__name__}: {e}") from e
        if out is None:
            dropped[pname] += 1
            return None
        if not isinstance(out, dict):
            raise SFTDataError(f"{where}: preprocessor {pname!r} returned {type(out).__name__}; "
                               f"expected a dict or None")
        rec = out
    return rec


def _kept(fns: dict, row: dict, where: str, dropped: Counter) -> bool:
    """False when one of the filters drops the converted conversation."""
    for fname, fn in fns.items():
        try:
            ok = fn(row)
        except Exception as e:
            raise SFTDataError(f"{where}: filter {fname!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(ok, bool) and type(ok).__name__ != "bool_":
            raise SFTDataError(f"{where}: filter {fname!r} returned {ok!r}; expected True or False")
        if not ok:
            dropped[fname] += 1
            return False
    return True


def _read_source(name: str, src: SFTSource, conf: SFTDataConfig, run, bad_out: list) -> tuple[list, dict]:
    """Convert every record of one source; bad ones go to bad_out (or raise in strict mode)."""
    path = project_path(src.path)
    stats = {"path": src.path, "format": src.format, "records": 0, "blank_lines": 0,
             "bad": Counter(), "converted": 0}
    pre = load_components("preprocessor", src.preprocess, f"sources.{name}.preprocess")
    keep = load_components("filter", conf.keep, "keep")
    by_pre, by_keep = Counter(), Counter()
    rows = []
    logged = Counter()
    try:
        records = iter_records(path)
        for line, rec in tqdm(records, desc=f"sft {name}", unit="rec", mininterval=2.0):
            stats["records"] += 1
            if pre and isinstance(rec, dict):
                rec = _preprocess(pre, rec, f"{src.path}:{line}", by_pre)
                if rec is None:
                    continue
            try:
                messages, tools = convert(rec, src.format, src.columns, src.roles,
                                          src.user_template, src.system)
            except BadRecord as e:
                where = f"{src.path}:{line}"
                if conf.strict:
                    raise SFTDataError(f"{where}: bad record ({e.reason}): {e.detail} "
                                       f"[strict mode]") from None
                stats["bad"][e.reason] += 1
                raw = rec if not isinstance(rec, BadRecord) else None
                bad_out.append({"source": name, "file": src.path, "line": line, "where": where,
                                "reason": e.reason, "detail": e.detail,
                                "record": None if raw is None else
                                json.dumps(raw, ensure_ascii=False, default=str)[:500]})
                logged[e.reason] += 1
                if logged[e.reason] <= LOG_BAD_LIMIT:
                    run.log.warning("bad record %s: %s: %s", where, e.reason, e.detail)
                continue
            rid = record_id(messages, tools)
            row = {"id": rid, "source": name, "messages": messages}
            if tools:
                row["tools"] = tools
            if keep and not _kept(keep, row, f"{src.path}:{line}", by_keep):
                continue
            rows.append(row)
    except SFTFileError as e:
        raise SFTDataError(str(e)) from None
    stats["converted"] = len(rows)
    if pre:
        stats["dropped_by_preprocessor"] = {p: by_pre[p] for p in pre}
    if keep:
        stats["dropped_by_filter"] = {f: by_keep[f] for f in keep}
    for what, counts in (("preprocessor", by_pre), ("filter", by_keep)):
        for cname, n in counts.items():
            run.log.info("source %s: %d records dropped by %s %s", name, n, what, cname)
    for reason, n in logged.items():
        if n > LOG_BAD_LIMIT:
            run.log.warning("%s: %d more '%s' records (see bad_records.jsonl)",
                            src.path, n - LOG_BAD_LIMIT, reason)
    return rows, stats


def build_sft_dataset(conf: SFTDataConfig, run) -> dict:
    """Build train/val jsonl files; returns (and puts into run.summary) the stage summary."""
    out_dir = project_path(conf.out_dir)
    bad: list[dict] = []
    seen: set[str] = set()
    train, val = [], []
    per_source: dict[str, dict] = {}
    inputs: list[Path] = []
    for name, n_take in conf.selection():
        src = conf.sources[name]
        path = project_path(src.path)
        key = name if n_take is None else f"{name}#{n_take}"
        if not path.is_file():
            if src.optional:
                run.log.warning("optional source %s: %s not found, skipped", name, src.path)
                per_source[key] = {"path": src.path, "status": "missing (optional, skipped)"}
                continue
            raise SFTDataError(f"source {name!r}: file not found: {src.path} "
                               f"(run scripts/01_download_data.py, or mark it optional: true)")
        inputs.append(path)
        rows, stats = _read_source(name, src, conf, run, bad)
        # Dedup against what is already kept (earlier sources and this one).
        unique, dups = [], 0
        for r in rows:
            if conf.dedup and r["id"] in seen:
                dups += 1
                continue
            seen.add(r["id"])
            unique.append(r)
        if dups:
            run.log.info("source %s: %d duplicate conversations dropped", name, dups)
        if n_take is not None:
            if n_take > len(unique):
                run.log.warning("source %s: asked for %d records, only %d available: took all",
                                name, n_take, len(unique))
            keep = set(sorted((r["id"] for r in unique),
                              key=lambda rid: (_unit_hash(conf.seed, "sample", name, rid), rid))[:n_take])
            # Records not taken leave the dedup set, so a later source may still use them.
            seen.difference_update(r["id"] for r in unique if r["id"] not in keep)
            unique = [r for r in unique if r["id"] in keep]
        n_val = 0
        for r in unique:
            if is_val(r["id"], conf.seed, conf.val_fraction):
                val.append(r)
                n_val += 1
            else:
                train.append(r)
        stats.update(status="ok", duplicates=dups, requested=n_take, taken=len(unique),
                     train=len(unique) - n_val, val=n_val, bad=dict(stats["bad"]),
                     sha256=sha256_file(path))
        per_source[key] = stats
        run.log.info("source %s: %d records, %d bad, %d duplicates -> %d taken (%d train, %d val)",
                     key, stats["records"], sum(stats["bad"].values()), dups, len(unique),
                     len(unique) - n_val, n_val)

    if not train:
        raise SFTDataError("no training records: every selected source is missing or empty")
    if not val and conf.val_fraction > 0:
        run.log.warning("val split is empty (%d records, val_fraction %.3f)", len(train), conf.val_fraction)
    train_path, val_path = out_dir / "train.jsonl", out_dir / "val.jsonl"
    _write_jsonl_atomic(train_path, train)
    _write_jsonl_atomic(val_path, val)
    bad_path = Path(run.dir) / "bad_records.jsonl"
    _write_jsonl_atomic(bad_path, bad)

    by_reason = Counter(b["reason"] for b in bad)
    summary = {
        "train": len(train), "val": len(val),
        "bad_records": len(bad),
        "bad_by_reason": {r: by_reason[r] for r in REASONS if by_reason[r]},
        "bad_records_file": str(bad_path),
        "duplicates": sum(s.get("duplicates", 0) for s in per_source.values()),
        "sources": per_source,
        "outputs": {"train": str(train_path), "val": str(val_path)},
        "input_fingerprint": fingerprint_paths(inputs),
        "output_fingerprint": fingerprint_paths([train_path, val_path]),
    }
    for what in ("dropped_by_preprocessor", "dropped_by_filter"):  # only when components are configured
        total: Counter = Counter()
        for st in per_source.values():
            total.update(st.get(what, {}))
        if any(what in st for st in per_source.values()):
            summary[what] = dict(total)
    specs = [s for n, _ in conf.selection() for s in conf.sources[n].preprocess] + conf.keep
    if specs:
        summary["components"] = component_fingerprints(specs)
    run.summary.update(summary)
    run.data_fingerprint = summary["output_fingerprint"]
    if bad:
        run.log.warning("%d bad records (%s) listed in %s", len(bad),
                        ", ".join(f"{k}={v}" for k, v in summary["bad_by_reason"].items()), bad_path)
    run.log.info("wrote %d train + %d val conversations to %s", len(train), len(val), out_dir)
    return summary
