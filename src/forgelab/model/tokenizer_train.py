"""Train a byte-level BPE tokenizer (HF `tokenizers`) on text or jsonl files and save it as a
transformers tokenizer directory (tokenizer.json, tokenizer_config.json, ChatML chat template)
that AutoTokenizer loads, for pretraining a preset from scratch.

Byte-level means every string round-trips exactly: text is split by a regex (words, single
digits, punctuation runs, whitespace), mapped to bytes, and merges never cross those splits.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

from ..config import ConfigError, field
from ..jsonl import iter_jsonl
from ..runs import fingerprint_paths, project_path
from .tokenizer_info import tokenizer_fingerprint

# ChatML, the format SmolLM2 and Qwen use; generation prompt opens an assistant turn.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Words with an optional leading non-letter (" the", "'s" handled as contractions), single
# digits (numbers stay compositional), punctuation runs, newlines, other whitespace.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class TextSource:
    path: str = field(help="a .jsonl file (one JSON object a line) or a text file (one document a line)")
    format: Literal["auto", "jsonl", "text", "pos_tagged"] = field(
        "auto", help="auto = by suffix (.jsonl -> jsonl); pos_tagged = 'word/tag' tokens, tags stripped")
    text_field: str = field("text", help="jsonl: the key holding the text")


@dataclass
class TokenizerTrainConfig:
    sources: list[TextSource] = field(
        [{"path": "data/cleaned/cpt/train.jsonl", "format": "jsonl", "text_field": "text"}],
        help="training text (the CPT corpus of stage 02 by default)")
    fallback_sources: list[TextSource] = field(
        [{"path": "data/raw/kjv/kjv.jsonl", "format": "jsonl", "text_field": "text"},
         {"path": "data/raw/peoples_daily/199801.txt", "format": "pos_tagged"}],
        help="used (with a warning) when a file of `sources` is missing; [] = fail instead")
    vocab_size: int = field(16384, help="target vocabulary size, special tokens and the 256 bytes included")
    min_frequency: int = field(2, help="a pair must occur this often to be merged")
    special_tokens: list[str] = field(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
                                      help="special tokens, ids 0.. in this order; never split")
    eos_token: str = field("<|endoftext|>", help="end of document (put between CPT documents)")
    pad_token: str = field("<|pad|>", help="padding token")
    bos_token: Optional[str] = field(None, help="beginning of sequence token (none by default)")
    chat_template: str = field(CHATML, help="Jinja chat template saved with the tokenizer (ChatML)")
    model_max_length: int = field(2048, help="tokenizer_config.json model_max_length")
    max_chars_per_source: Optional[int] = field(None, help="read at most this many characters of each source "
                                                           "(null = all)")
    output: str = field("model/tokenizer-scratch", help="output tokenizer directory (configs/train/pretrain.yaml reads it)")
    check_samples: int = field(200, help="texts of the input re-encoded to check the exact round trip")

    def validate(self) -> None:
        if self.vocab_size < 256 + len(self.special_tokens) + 1:
            raise ConfigError(f"key 'vocab_size' must be > 256 + {len(self.special_tokens)} special tokens, "
                              f"got {self.vocab_size}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError("key 'special_tokens' has duplicates")
        for key in ("eos_token", "pad_token", "bos_token"):
            v = getattr(self, key)
            if v is not None and v not in self.special_tokens:
                raise ConfigError(f"key '{key}': {v!r} is not in special_tokens {self.special_tokens}")
        if not self.sources:
            raise ConfigError("key 'sources' is empty")


def _format(src: TextSource) -> str:
    if src.format != "auto":
        return src.format
    return "jsonl" if src.path.endswith(".jsonl") else "text"


def iter_texts(src: TextSource) -> Iterator[str]:
    """Texts of one source; a bad record stops with file:line."""
    from ..data.clean import strip_pos_tags
    path = project_path(src.path)
    fmt = _format(src)
    if fmt == "jsonl":
        for i, rec in iter_jsonl(path, error=ConfigError):
            text = rec.get(src.text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"{path}:{i}: no string field {src.text_field!r}")
            yield text
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if fmt == "pos_tagged":
                try:
                    text = strip_pos_tags(line, f"{path}:{i}")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
                if text:
                    yield text
            else:
                yield line.rstrip("\n")


def resolve_sources(conf: TokenizerTrainConfig, log) -> tuple[list[TextSource], bool]:
    """The sources to train on; the fallback (with a warning) when a primary file is missing."""
    missing = [s.path for s in conf.sources if not project_path(s.path).is_file()]
    if not missing:
        return conf.sources, False
    hint = ("build the CPT corpus first: python scripts/02_build_cpt_corpus.py"
            if any("cleaned/cpt" in m for m in missing) else "check key 'sources'")
    if not conf.fallback_sources:
        raise ConfigError(f"tokenizer sources missing: {', '.join(missing)} ({hint}); no fallback_sources set")
    gone = [s.path for s in conf.fallback_sources if not project_path(s.path).is_file()]
    if gone:
        raise ConfigError(f"tokenizer sources missing: {', '.join(missing)} ({hint}); fallback sources "
                          f"missing too: {', '.join(gone)} (python scripts/01_download_data.py)")
    log.warning("tokenizer sources missing: %s (%s); training on fallback_sources instead: %s",
                ", ".join(missing), hint, ", ".join(s.path for s in conf.fallback_sources))
    return conf.fallback_sources, True


def build_tokenizer(conf: TokenizerTrainConfig):
    """An untrained byte-level BPE tokenizer and its trainer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=conf.vocab_size, min_frequency=conf.min_frequency,
                                  special_tokens=list(conf.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=True)
    return tok, trainer


def train_tokenizer(conf: TokenizerTrainConfig, log, texts: Iterator[str] | None = None,
                    sources: list[TextSource] | None = None) -> dict:
    """Train, save (atomically) and check a tokenizer; returns the summary."""
    from transformers import PreTrainedTokenizerFast

    used_fallback = False
    if texts is None:
        sources, used_fallback = (sources, False) if sources else resolve_sources(conf, log)
    counts = {"texts": 0, "chars": 0}
    samples: list[str] = []

    def limited(gen: Iterator[str]) -> Iterator[str]:
        n = 0
        for t in gen:
            if conf.max_chars_per_source is not None and n >= conf.max_chars_per_source:
                return
            n += len(t)
            yield t

    def stream() -> Iterator[str]:
        gen = limited(texts) if texts is not None else (t for s in sources for t in limited(iter_texts(s)))
        for t in gen:
            counts["texts"] += 1
            counts["chars"] += len(t)
            if len(samples) < conf.check_samples and counts["texts"] % 5 == 1:
                samples.append(t)
            yield t

    tok, trainer = build_tokenizer(conf)
    t0 = time.time()
    tok.train_from_iterator(stream(), trainer=trainer)
    train_s = time.time() - t0
    if counts["texts"] == 0:
        raise ConfigError("no training text: the sources are empty")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=conf.eos_token, pad_token=conf.pad_token,
        bos_token=conf.bos_token, model_max_length=conf.model_max_length,
        additional_special_tokens=[t for t in conf.special_tokens
                                   if t not in (conf.eos_token, conf.pad_token, conf.bos_token)])
    fast.chat_template = conf.chat_template
    out = project_path(conf.output)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)

    check = check_tokenizer(out, conf, samples)
    summary = {
        "output": str(out), "sources": [s.path for s in sources] if sources else ["<iterator>"],
        "used_fallback": used_fallback, "texts": counts["texts"], "chars": counts["chars"],
        "vocab_size": check["vocab_size"], "vocab_size_target": conf.vocab_size,
        "special_token_ids": check["special_token_ids"], "train_seconds": round(train_s, 2),
        "check": check, "tokenizer_fingerprint": tokenizer_fingerprint(out),
    }
    if sources:
        summary["data_fingerprint"] = fingerprint_paths([project_path(s.path) for s in sources])
    log.info("tokenizer: %d tokens, %.2f chars/token on %d samples, saved to %s",
             check["vocab_size"], check["chars_per_token"], check["samples"], out)
    return summary


def check_tokenizer(path: Path, conf: TokenizerTrainConfig, samples: list[str]) -> dict:
    """Reload with AutoTokenizer; exact round trip on samples; special tokens are one id each;
    the chat template renders."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    ids_of = {}
    for t in conf.special_tokens:
        ids = tok.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"{path}: special token {t!r} encodes to {ids}, not one id")
        ids_of[t] = ids[0]
    chars = toks = 0
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False)
        back = tok.decode(ids)
        if back != s:
            raise RuntimeError(f"{path}: round trip changed a text: {s[:80]!r} -> {back[:80]!r}")
        chars += len(s)
        toks += len(ids)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    return {"vocab_size": len(tok), "special_token_ids": ids_of, "samples": len(samples),
            "round_trip_exact": True, "chars_per_token": round(chars / max(toks, 1), 3),
            "chat_template_renders": rendered}
