"""Stage 02: build the continued-pretraining (CPT) corpus.

sources (jsonl / text lines / POS-tagged lines)
  -> documents (consecutive records grouped: e.g. one KJV chapter, or newspaper paragraphs
     joined up to a size)
  -> normalize (ANSI + control characters out, NFKC, whitespace collapsed)
  -> filter (length, symbol ratio, digit ratio, language by script)
  -> exact dedup (sha1 of the normalized text) -> near dedup (MinHash LSH)
  -> mix sources by ratio (of characters or documents) with a seeded, order-free sample
  -> held-out split -> data/cleaned/cpt/{train,heldout}.jsonl  ({"id","source","lang","text"})

Every dropped document is counted under one reason, per source.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from ..components import component_fingerprints, load_components
from ..config import ConfigError, field
from ..runs import fingerprint_paths, project_path, sha256_file
from . import clean

REASONS = ("bad_record", "too_short", "too_long", "symbol_ratio", "digit_ratio",
           "wrong_language", "exact_dup", "near_dup", "sampled_out")


class CorpusError(ValueError):
    """Bad input, with file:line in the message."""


@dataclass
class SourceConfig:
    name: str = field(help="source name (document ids start with it)")
    path: str = field(help="input file, e.g. data/raw/kjv/kjv.jsonl")
    format: Literal["jsonl", "text", "pos_tagged"] = field(
        "jsonl", help="jsonl: one JSON object a line; text: plain text lines; "
                      "pos_tagged: lines of WORD/TAG tokens (People's Daily style), tags stripped")
    lang: str = field("en", help="expected language (en, zh, ...; 'any' skips the language check)")
    ratio: float = field(1.0, help="share of the mix (relative to the other sources' ratios)")
    text_field: str = field("text", help="jsonl: the field holding the text")
    group_by: list[str] = field([], help="jsonl: consecutive records with equal values of these "
                                         "fields form one document (e.g. [book, chapter])")
    title: str = field("", help="jsonl: format string for a first line of a grouped document, "
                                "from the first record's fields, e.g. '{book} {chapter}'")
    group_max_chars: int = field(0, help="join consecutive records into one document up to this many "
                                         "characters (0: no size grouping; with group_by: no cap)")
    join: str = field("\n", help="separator between records inside one document")


@dataclass
class FilterConfig:
    min_chars: int = field(50, help="documents shorter than this (after normalization) -> too_short")
    max_chars: int = field(100_000, help="documents longer than this -> too_long")
    max_symbol_ratio: float = field(0.25, help="punctuation+symbols over non-space chars above this -> symbol_ratio")
    max_digit_ratio: float = field(0.15, help="digits over non-space chars above this -> digit_ratio")
    min_script_share: float = field(0.7, help="share of letters in the source language's script "
                                              "(CJK for zh/ja/ko, Latin otherwise) below this -> wrong_language")
    keep: list[str] = field([], help="plug-in filters after the ones above: dotted paths (module:name or "
                                     "path/file.py:name) of keep(record: dict) -> bool, called on each "
                                     "normalized document {id, source, lang, text}; False drops it, counted "
                                     "under the function's name; docs/components.md")


@dataclass
class DedupConfig:
    exact: bool = field(True, help="drop documents whose normalized text was seen before (exact_dup)")
    near: bool = field(True, help="drop near duplicates found by MinHash LSH (near_dup)")
    threshold: float = field(0.8, help="estimated Jaccard similarity of shingle sets that counts as near duplicate")
    num_perm: int = field(128, help="MinHash permutations")
    bands: int = field(16, help="LSH bands (num_perm/bands rows each); more bands find lower similarities")
    word_ngram: int = field(5, help="shingle size in words (non-CJK languages)")
    char_ngram: int = field(5, help="shingle size in characters (zh/ja/ko, which have no spaces)")

    def validate(self) -> None:
        if self.num_perm % self.bands:
            raise ConfigError(f"key 'dedup.bands': {self.bands} does not divide num_perm {self.num_perm}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"key 'dedup.threshold': {self.threshold} is not in (0, 1]")


@dataclass
class MixConfig:
    by: Literal["chars", "docs"] = field("chars", help="what the ratios and the target count")
    target: int = field(0, help="total size of the mix in `by` units (0: as much as the ratios allow "
                                "with every source's kept documents)")


@dataclass
class CorpusConfig:
    sources: list[SourceConfig] = field([], help="the input sources")
    out_dir: str = field("data/cleaned/cpt", help="train.jsonl and heldout.jsonl go here")
    unicode_form: Optional[str] = field("NFKC", help="Unicode normalization form (NFKC, NFC, ...; null: none)")
    filters: FilterConfig = field(FilterConfig, help="quality filters")
    dedup: DedupConfig = field(DedupConfig, help="duplicate removal")
    mix: MixConfig = field(MixConfig, help="source mixing")
    heldout_fraction: float = field(0.02, help="share of each source's sampled documents held out")
    seed: int = field(0, help="seed of sampling, split and output order")
    on_bad_record: Literal["error", "skip"] = field(
        "error", help="a malformed input line: stop with file:line (error) or count it as bad_record (skip)")

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("key 'sources': at least one source is needed")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"key 'sources': duplicate names {dup}")
        for i, s in enumerate(self.sources):
            if s.ratio <= 0:
                raise ConfigError(f"key 'sources[{i}].ratio': must be > 0, got {s.ratio}")
            if s.format != "jsonl" and (s.group_by or s.title):
                raise ConfigError(f"key 'sources[{i}].group_by': only jsonl sources have fields to group by")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"key 'heldout_fraction': {self.heldout_fraction} is not in [0, 1)")
        if self.unicode_form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ConfigError(f"key 'unicode_form': {self.unicode_form!r} is not NFC, NFKC, NFD, NFKD or null")
        for i, name in enumerate(load_components("filter", self.filters.keep, "filters.keep")):
            if name in REASONS:
                raise ConfigError(f"key 'filters.keep[{i}]': filter {name!r} has the name of a built-in "
                                  f"drop reason; rename the function")


@dataclass
class Doc:
    id: str
    source: str
    lang: str
    text: str


# ----------------------------------------------------------------------------- reading

def _bad(src: SourceConfig, where: str, msg: str, on_bad: str, counts: Counter, log) -> None:
    if on_bad == "error":
        raise CorpusError(f"{where}: {msg} (source '{src.name}'; set on_bad_record=skip to count and skip)")
    counts["bad_record"] += 1
    if counts["bad_record"] <= 5:
        log.warning("%s: %s (skipped)", where, msg)


def _records(src: SourceConfig, path: Path, on_bad: str, counts: Counter, log) -> Iterator[tuple[int, str, tuple, dict]]:
    """(line number, text, group key, record) per input record; blank text lines yield text ''."""
    from tqdm import tqdm

    from ..jsonl import BadJson, decode_line, loads_line
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"read {src.name}",
                                      file=sys.stderr, leave=False) as bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            where = f"{path}:{lineno}"
            try:
                line = decode_line(raw)
            except BadJson as e:  # reason: "not UTF-8 (<reason> at column <byte column>)"
                _bad(src, where, e.reason, on_bad, counts, log)
                continue
            if src.format == "text":
                yield lineno, line.rstrip("\n"), (), {}
            elif src.format == "pos_tagged":
                try:
                    yield lineno, clean.strip_pos_tags(line, where), (), {}
                except ValueError as e:
                    _bad(src, where, str(e).split(": ", 1)[1], on_bad, counts, log)
            else:
                if not line.strip():
                    continue
                try:
                    rec = loads_line(line)
                except BadJson as e:  # reason: "invalid JSON (<msg>, column <c>)"
                    _bad(src, where, e.reason, on_bad, counts, log)
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get(src.text_field), str):
                    _bad(src, where, f"no string field '{src.text_field}'", on_bad, counts, log)
                    continue
                missing = [k for k in src.group_by if k not in rec]
                if missing:
                    _bad(src, where, f"group_by field(s) {missing} missing", on_bad, counts, log)
                    continue
                yield lineno, rec[src.text_field], tuple(rec[k] for k in src.group_by), rec


def read_documents(src: SourceConfig, on_bad: str, counts: Counter, log) -> Iterator[Doc]:
    """Group consecutive records into raw (not yet normalized) documents.

    A document is a run of consecutive records with the same group_by key; without group_by
    each record is one document unless group_max_chars > 0, which joins records up to that
    size. A blank text line always ends a document.
    """
    path = project_path(src.path)
    if not path.is_file():
        raise CorpusError(f"source '{src.name}': input file not found: {path} (run stage 01 first?)")
    parts: list[str] = []
    size, first, last, key, title = 0, 0, 0, None, ""

    def flush() -> Doc | None:
        if not parts:
            return None
        body = src.join.join(parts)
        text = f"{title}\n{body}" if title else body
        ident = f"{src.name}:{first}" if first == last else f"{src.name}:{first}-{last}"
        return Doc(ident, src.name, src.lang, text)

    grouping = bool(src.group_by) or src.group_max_chars > 0
    for lineno, text, k, rec in _records(src, path, on_bad, counts, log):
        counts["records"] += 1
        boundary = (not text.strip()) or not grouping or k != key or (
            src.group_max_chars > 0 and parts and size + len(text) > src.group_max_chars)
        if boundary and parts:
            doc = flush()
            parts, size = [], 0
            if doc:
                yield doc
        if not text.strip():
            counts["blank_records"] += 1
            continue
        if not parts:
            first, key = lineno, k
            try:
                title = src.title.format(**rec) if src.title else ""
            except (KeyError, IndexError, ValueError) as e:
                raise CorpusError(f"{path}:{lineno}: title {src.title!r} of source '{src.name}' "
                                  f"cannot be filled from this record: {e!r}") from None
        parts.append(text)
        size += len(text) + len(src.join)
        last = lineno
    doc = flush()
    if doc:
        yield doc


# ----------------------------------------------------------------------------- filtering

def filter_reason(text: str, lang: str, f: FilterConfig) -> str | None:
    """The first filter a normalized document fails, or None."""
    if len(text) < f.min_chars:
        return "too_short"
    if len(text) > f.max_chars:
        return "too_long"
    st = clean.text_stats(text)
    if st.symbol_ratio > f.max_symbol_ratio:
        return "symbol_ratio"
    if st.digit_ratio > f.max_digit_ratio:
        return "digit_ratio"
    if lang != "any" and clean.script_share(st, lang) < f.min_script_share:
        return "wrong_language"
    return None


def _plugin_reason(keep: dict, d: Doc) -> str | None:
    """The name of the first plug-in filter that drops a document, or None."""
    for name, fn in keep.items():
        try:
            ok = fn({"id": d.id, "source": d.source, "lang": d.lang, "text": d.text})
        except Exception as e:
            raise CorpusError(f"document {d.id}: filter {name!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(ok, bool) and type(ok).__name__ != "bool_":
            raise CorpusError(f"document {d.id}: filter {name!r} returned {ok!r}; expected True or False")
        if not ok:
            return name
    return None


def _order_key(seed: int, salt: str, doc_id: str) -> bytes:
    # A per-document hash: a document's rank never depends on which other documents exist.
    return hashlib.sha1(f"{seed}:{salt}:{doc_id}".encode()).digest()


def _size(doc: Doc, by: str) -> int:
    return len(doc.text) if by == "chars" else 1


def mix_quotas(totals: dict[str, int], ratios: dict[str, float], target: int) -> dict[str, float]:
    """Per-source quota in mix units. target 0: the largest mix the available documents allow."""
    s = sum(ratios.values())
    shares = {k: r / s for k, r in ratios.items()}
    if target <= 0:
        scale = min(totals[k] / shares[k] for k in shares)
        return {k: shares[k] * scale for k in shares}
    return {k: shares[k] * target for k in shares}


def sample_source(docs: list[Doc], quota: float, by: str, seed: int) -> list[Doc]:
    """Documents in seeded hash order until the quota is reached (the last may cross it)."""
    taken, total = [], 0
    for d in sorted(docs, key=lambda d: _order_key(seed, "mix", d.id)):
        if total >= quota:
            break
        taken.append(d)
        total += _size(d, by)
    return taken


def split_heldout(docs: list[Doc], fraction: float, seed: int) -> tuple[list[Doc], list[Doc]]:
    """Exactly round(fraction * n) documents (at least 1 when fraction > 0 and n > 1) held out."""
    if fraction <= 0 or len(docs) < 2:
        return list(docs), []
    n_h = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    ranked = sorted(docs, key=lambda d: _order_key(seed, "heldout", d.id))
    held = {d.id for d in ranked[:n_h]}
    return [d for d in docs if d.id not in held], [d for d in docs if d.id in held]


def write_jsonl(path: Path, docs: list[Doc]) -> None:
    """Atomic: a temp file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "source": d.source, "lang": d.lang, "text": d.text},
                               ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the stage

def build_corpus(conf: CorpusConfig, log) -> dict:
    """Run the whole stage; returns the summary (also describes the outputs)."""
    from tqdm import tqdm

    per: dict[str, dict] = {}
    kept: dict[str, list[Doc]] = {}
    keep = load_components("filter", conf.filters.keep, "filters.keep")
    k = REASONS.index("wrong_language") + 1  # plug-in filters run after the built-in ones
    reasons = REASONS[:k] + tuple(keep) + REASONS[k:]
    for src in conf.sources:
        counts: Counter = Counter()
        docs = []
        n_docs = 0
        for d in read_documents(src, conf.on_bad_record, counts, log):
            n_docs += 1
            d.text = clean.normalize(d.text, conf.unicode_form)
            reason = filter_reason(d.text, src.lang, conf.filters)
            if not reason and keep:
                reason = _plugin_reason(keep, d)
            if reason:
                counts[reason] += 1
            else:
                docs.append(d)
        kept[src.name] = docs
        per[src.name] = {"path": src.path, "sha256": sha256_file(project_path(src.path)),
                         "records": counts.pop("records", 0), "blank_records": counts.pop("blank_records", 0),
                         "documents": n_docs,
                         "dropped": counts}
        log.info("%s: %d records -> %d documents, %d pass the filters", src.name,
                 per[src.name]["records"], n_docs, len(docs))

    # Dedup over all sources in config order (keep-first), before sampling, so a sample never
    # holds two copies and the held-out split never shares text with train.
    seen: set[str] = set()
    index = clean.NearDupIndex(conf.dedup.num_perm, conf.dedup.bands, conf.dedup.threshold, conf.seed)
    near_examples = []
    all_docs = [d for s in conf.sources for d in kept[s.name]]
    survivors: dict[str, list[Doc]] = {s.name: [] for s in conf.sources}
    for d in tqdm(all_docs, desc="dedup", unit="doc", file=sys.stderr, leave=False):
        if conf.dedup.exact:
            h = clean.text_hash(d.text)
            if h in seen:
                per[d.source]["dropped"]["exact_dup"] += 1
                continue
            seen.add(h)
        if conf.dedup.near:
            sh = clean.shingle_hashes(d.text, d.lang, conf.dedup.word_ngram, conf.dedup.char_ngram)
            match = index.add_or_match(d.id, sh)
            if match:
                per[d.source]["dropped"]["near_dup"] += 1
                if len(near_examples) < 10:
                    near_examples.append({"dropped": d.id, "kept": match[0], "similarity": round(match[1], 3)})
                continue
        survivors[d.source].append(d)

    by = conf.mix.by
    totals = {k: sum(_size(d, by) for d in v) for k, v in survivors.items()}
    empty = [k for k, v in totals.items() if v == 0]
    if empty:
        raise CorpusError(f"source(s) {empty}: no document survived filtering and dedup; "
                          f"see the dropped counts in the log")
    ratios = {s.name: s.ratio for s in conf.sources}
    quotas = mix_quotas(totals, ratios, conf.mix.target)
    train, heldout = [], []
    for src in conf.sources:
        docs = survivors[src.name]
        if quotas[src.name] > totals[src.name]:
            log.warning("%s: asked for %.0f %s, only %d available after filtering: the mix falls short",
                        src.name, quotas[src.name], by, totals[src.name])
        sample = sample_source(docs, quotas[src.name], by, conf.seed)
        per[src.name]["dropped"]["sampled_out"] += len(docs) - len(sample)
        tr, ho = split_heldout(sample, conf.heldout_fraction, conf.seed)
        train += tr
        heldout += ho
        p = per[src.name]
        p.update(after_dedup_docs=len(docs), after_dedup_chars=sum(len(d.text) for d in docs),
                 sampled_docs=len(sample), sampled_chars=sum(len(d.text) for d in sample),
                 train_docs=len(tr), heldout_docs=len(ho), quota=round(quotas[src.name]))

    # Interleave sources so fixed-length packing later mixes them within the stream.
    rng = np.random.default_rng(conf.seed)
    train = [train[i] for i in rng.permutation(len(train))]
    heldout = [heldout[i] for i in rng.permutation(len(heldout))]
    out = project_path(conf.out_dir)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)

    achieved = {k: per[k]["sampled_chars"] if by == "chars" else per[k]["sampled_docs"] for k in per}
    total = sum(achieved.values())
    dropped_total: Counter = Counter()
    for p in per.values():
        dropped_total.update(p["dropped"])
        p["dropped"] = {r: p["dropped"].get(r, 0) for r in reasons}
    summary = {
        "sources": per,
        "dropped": {r: dropped_total.get(r, 0) for r in reasons},
        "mix": {"by": by, "target": conf.mix.target,
                "target_ratio": {k: round(r / sum(ratios.values()), 4) for k, r in ratios.items()},
                "achieved_ratio": {k: round(v / total, 4) if total else 0.0 for k, v in achieved.items()},
                "achieved_total": total},
        "near_dup_examples": near_examples,
        "outputs": {
            "train": {"path": str(out / "train.jsonl"), "docs": len(train), "chars": sum(len(d.text) for d in train)},
            "heldout": {"path": str(out / "heldout.jsonl"), "docs": len(heldout),
                        "chars": sum(len(d.text) for d in heldout)},
        },
        "output_fingerprint": fingerprint_paths([out / "train.jsonl", out / "heldout.jsonl"]),
    }
    if keep:
        summary["components"] = component_fingerprints(conf.filters.keep)
    return summary


def format_summary(s: dict) -> str:
    """A small table for the log / terminal."""
    reasons = tuple(s["dropped"])  # REASONS, with plug-in filters after the built-in filters
    cols = ("documents",) + reasons + ("train_docs", "heldout_docs", "sampled_chars")
    lines = ["source | " + " | ".join(cols), "---|" + "---|" * len(cols)]
    for name, p in s["sources"].items():
        vals = [p["documents"]] + [p["dropped"][r] for r in reasons] + [p["train_docs"], p["heldout_docs"],
                                                                       p["sampled_chars"]]
        lines.append(f"{name} | " + " | ".join(str(v) for v in vals))
    m = s["mix"]
    lines.append(f"mix by {m['by']}: target {m['target_ratio']} achieved {m['achieved_ratio']} "
                 f"(total {m['achieved_total']:,})")
    return "\n".join(lines)
