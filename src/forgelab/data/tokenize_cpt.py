"""Stage 04 (CPT): tokenize the corpus, put EOS after every document, pack the stream into
fixed-length blocks and store them memory-mappable (format: see cpt_dataset.py).

Encoding uses the fast (Rust) tokenizer's batch API, which releases the GIL. Ways to use the
cores (scripts/bench_data_pipeline.py measures them on the machine at hand):
  workers: thread, num_workers N   N threads of this process encode batches side by side;
                                   no start-up or pickling cost, and it does not depend on
                                   TOKENIZERS_PARALLELISM (the default)
  workers: process, num_workers N  N spawned worker processes, one thread each
  num_workers 0                    batches encoded in turn; encode_batch then spreads a batch
                                   over the tokenizer's own threads, unless
                                   TOKENIZERS_PARALLELISM=false

Blocks stream to disk: blocks.npy is written with a header for 0 rows (numpy pads it so the
row count can grow in place), then rows are appended and the header rewritten at the end.
"""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from ..config import ConfigError, field
from ..jsonl import iter_jsonl
from ..runs import display_path, fingerprint_paths, now_iso, project_path, write_json

FORMAT_VERSION = 1


@dataclass
class TokenizeCPTConfig:
    tokenizer: str = field("model/smollm2-135m-instruct", help="tokenizer (or model) directory with tokenizer.json")
    inputs: dict[str, str] = field({"train": "data/cleaned/cpt/train.jsonl",
                                    "heldout": "data/cleaned/cpt/heldout.jsonl"},
                                   help="split name -> input jsonl (stage 02 output)")
    out_dir: str = field("data/tokenized/cpt", help="each split goes to <out_dir>/<split>/")
    seq_len: int = field(256, help="block length in tokens (256 for the CPU default; 2048 on a GPU)")
    text_field: str = field("text", help="jsonl field holding the document text")
    eos_token: Optional[str] = field(None, help="token put after every document (null: the tokenizer's "
                                                "eos_token from tokenizer_config.json)")
    batch_docs: int = field(64, help="documents per encode batch (small batches keep workers evenly busy)")
    num_workers: int = field(2, help="batches encoded side by side (0: in turn, with the tokenizer's own threads)")
    workers: Literal["thread", "process"] = field("thread", help="what runs the num_workers encoders")

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"key 'seq_len': must be >= 2, got {self.seq_len}")
        if self.batch_docs < 1:
            raise ConfigError(f"key 'batch_docs': must be >= 1, got {self.batch_docs}")
        if self.num_workers < 0:
            raise ConfigError(f"key 'num_workers': must be >= 0, got {self.num_workers}")
        if not self.inputs:
            raise ConfigError("key 'inputs': at least one split is needed")


class TokenizeError(ValueError):
    """Bad input, with file:line in the message."""


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | Path):
    """The fast tokenizer behind a HF tokenizer directory (tokenizer.json)."""
    from tokenizers import Tokenizer
    d = project_path(path)
    f = d / "tokenizer.json"
    if not f.is_file():
        raise ConfigError(f"key 'tokenizer': {d} has no tokenizer.json (a fast tokenizer is needed)")
    tok = Tokenizer.from_file(str(f))
    # A document that happens to contain "<|im_end|>" is text: only our own EOS separates documents.
    tok.encode_special_tokens = True
    return tok


def resolve_eos(tokenizer_dir: str | Path, tok, eos_token: str | None) -> tuple[str, int]:
    """(eos token, id): the configured one, else tokenizer_config.json's eos_token."""
    if eos_token is None:
        cfg_file = project_path(tokenizer_dir) / "tokenizer_config.json"
        conf = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        eos_token = conf.get("eos_token")
        if isinstance(eos_token, dict):  # older files store an AddedToken dict
            eos_token = eos_token.get("content")
        if not eos_token:
            raise ConfigError(f"{cfg_file}: no eos_token; set key 'eos_token'")
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise ConfigError(f"key 'eos_token': {eos_token!r} is not in the tokenizer's vocabulary")
    return eos_token, eos_id


def encode_docs(tok, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of the documents, each followed by EOS, as one int32 array; tokens per
    document, EOS included)."""
    enc = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips char offsets
    ids = [e.ids for e in enc(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    out = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for seq in ids:
        n = len(seq)
        out[pos:pos + n] = seq
        out[pos + n] = eos_id
        pos += n + 1
    return out, lengths


# Worker-process state: one tokenizer per process, loaded once.
_WORKER: dict = {}


def _worker_init(tokenizer_file: str, eos_id: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
    _WORKER["tok"] = load_tokenizer(Path(tokenizer_file).parent)
    _WORKER["eos"] = eos_id


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_docs(_WORKER["tok"], texts, _WORKER["eos"])


# ----------------------------------------------------------------------------- input

def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def read_text_batches(path: Path, text_field: str, batch_docs: int,
                      stats: dict) -> Iterator[tuple[list[str], list[str]]]:
    """Batches of (document texts, their "source" field); a malformed line stops with file:line."""
    batch: list[str] = []
    sources: list[str] = []
    for lineno, rec in iter_jsonl(path, error=TokenizeError):
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise TokenizeError(f"{path}:{lineno}: no string field '{text_field}'")
        if not text:
            stats["empty_documents"] += 1  # nothing to learn from; an EOS alone adds noise
            continue
        stats["n_documents"] += 1
        stats["n_chars"] += len(text)
        batch.append(text)
        sources.append(str(rec.get("source", "")))
        if len(batch) == batch_docs:
            yield batch, sources
            batch, sources = [], []
    if batch:
        yield batch, sources


def encoded_stream(batches: Iterator[tuple[list[str], list]], tok, tokenizer_file: str, eos_id: int,
                   num_workers: int, workers: str = "thread") -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
    """(tokens, tokens per document, the batch's tags) in input order, encoded in turn or by
    a bounded pool of threads or processes."""
    if num_workers <= 0:
        for texts, tags in batches:
            yield *encode_docs(tok, texts, eos_id), tags
        return
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    if workers == "thread":
        ex = ThreadPoolExecutor(num_workers)
        submit = lambda texts: ex.submit(encode_docs, tok, texts, eos_id)  # noqa: E731
    else:
        import multiprocessing as mp
        # spawn: a forked child of a process whose tokenizer already used threads can deadlock.
        ex = ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(tokenizer_file, eos_id))
        submit = lambda texts: ex.submit(_worker_encode, texts)  # noqa: E731
    with ex:
        pending: deque = deque()
        for texts, tags in batches:
            pending.append((submit(texts), tags))
            if len(pending) >= 2 * num_workers:  # bounded: memory stays flat at any corpus size
                fut, t = pending.popleft()
                yield *fut.result(), t
        while pending:
            fut, t = pending.popleft()
            yield *fut.result(), t


# ----------------------------------------------------------------------------- packing

class BlockWriter:
    """Appends tokens, writes every full block of seq_len to a .npy file being grown in place."""

    def __init__(self, path: Path, seq_len: int):
        self.path, self.seq_len = path, seq_len
        self.f = open(path, "wb")
        self._header(0)
        self.carry = np.zeros(0, dtype=np.int32)
        self.n_blocks = 0
        self.n_input_tokens = 0

    def _header(self, rows: int) -> int:
        np.lib.format.write_array_header_1_0(
            self.f, {"descr": "<i4", "fortran_order": False, "shape": (rows, self.seq_len)})
        return self.f.tell()

    def add(self, tokens: np.ndarray) -> None:
        self.n_input_tokens += len(tokens)
        buf = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        full = len(buf) // self.seq_len * self.seq_len
        if full:
            buf[:full].astype("<i4", copy=False).tofile(self.f)
            self.n_blocks += full // self.seq_len
        self.carry = buf[full:].copy()

    def close(self) -> dict:
        """Finalize the header; the tail shorter than one block is dropped (and counted)."""
        data_start = self.f.tell() - self.n_blocks * self.seq_len * 4
        self.f.seek(0)
        if self._header(self.n_blocks) != data_start:  # numpy's growth padding makes this hold
            raise RuntimeError("npy header changed size while growing; cannot finalize in place")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"n_blocks": self.n_blocks, "n_tokens": self.n_blocks * self.seq_len,
                "dropped_tail_tokens": int(len(self.carry)), "n_input_tokens": self.n_input_tokens}


def tokenize_file(src: Path, out: Path, conf: TokenizeCPTConfig, tok, eos: tuple[str, int],
                  tok_fp: str, progress: bool = True) -> dict:
    """One split: src jsonl -> out/blocks.npy + out/meta.json. Returns the meta."""
    from tqdm import tqdm
    if not src.is_file():
        raise TokenizeError(f"input not found: {src} (run scripts/02_build_cpt_corpus.py first)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta lands
    stats = {"n_documents": 0, "empty_documents": 0, "n_chars": 0}
    by_source: dict[str, int] = {}
    tmp = out / f".blocks.npy.tmp{os.getpid()}"
    writer = BlockWriter(tmp, conf.seq_len)
    tok_file = str(project_path(conf.tokenizer) / "tokenizer.json")
    try:
        with tqdm(total=count_lines(src), unit="doc", desc=f"tokenize {out.name}",
                  file=sys.stderr, disable=not progress, leave=False) as bar:
            batches = read_text_batches(src, conf.text_field, conf.batch_docs, stats)
            for arr, lengths, sources in encoded_stream(batches, tok, tok_file, eos[1], conf.num_workers,
                                                             conf.workers):
                writer.add(arr)
                for src_name, n in zip(sources, lengths.tolist()):
                    by_source[src_name] = by_source.get(src_name, 0) + n
                bar.update(stats["n_documents"] + stats["empty_documents"] - bar.n)
        packed = writer.close()
        os.replace(tmp, out / "blocks.npy")
    finally:
        if not writer.f.closed:
            writer.f.close()
        tmp.unlink(missing_ok=True)
    meta = {
        "format": "forgelab-cpt-blocks", "format_version": FORMAT_VERSION, "dtype": "int32",
        "seq_len": conf.seq_len, **packed, **stats,
        "eos_token": eos[0], "eos_token_id": eos[1],
        "tokens_by_source": by_source,
        "tokenizer_path": conf.tokenizer, "tokenizer_fingerprint": tok_fp,
        "data_fingerprint": fingerprint_paths([src]), "source": display_path(src),
        "created_at": now_iso(),
    }
    write_json(out / "meta.json", meta)
    return meta




def run_tokenize(conf: TokenizeCPTConfig, log) -> dict:
    """Every split of the config. Returns {split: meta}."""
    from ..model.tokenizer_info import tokenizer_fingerprint
    tok = load_tokenizer(conf.tokenizer)
    eos = resolve_eos(conf.tokenizer, tok, conf.eos_token)
    tok_fp = tokenizer_fingerprint(project_path(conf.tokenizer))
    metas = {}
    for split, path in conf.inputs.items():
        meta = tokenize_file(project_path(path), project_path(conf.out_dir) / split, conf, tok, eos, tok_fp)
        metas[split] = meta
        log.info("%s: %d documents -> %d tokens -> %d blocks of %d (tail of %d tokens dropped)",
                 split, meta["n_documents"], meta["n_input_tokens"], meta["n_blocks"],
                 conf.seq_len, meta["dropped_tail_tokens"])
        if meta["n_blocks"] == 0:
            log.warning("%s: fewer tokens than one block of %d: no blocks", split, conf.seq_len)
    return metas


# ----------------------------------------------------------------------------- throughput

def time_tokenizer_batch_encode(tok, texts: list[str], batch_docs: int) -> tuple[float, int]:
    """(seconds, tokens) of the tokenizer's own batch encode over texts already in memory:
    the reference that the whole pipeline is compared with."""
    import time
    enc = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(texts), batch_docs):
        out.append(enc(texts[i:i + batch_docs], add_special_tokens=False))
    dt = time.perf_counter() - t0
    return dt, sum(len(e.ids) for batch in out for e in batch)


def time_pipeline(src: Path, out: Path, conf: TokenizeCPTConfig, tok) -> tuple[float, dict]:
    """(seconds, meta) of one full split with a loaded tokenizer (as the reference has): jsonl
    read -> encode -> pack -> blocks.npy + meta.json, fingerprints and worker start-up included."""
    import time
    from ..model.tokenizer_info import tokenizer_fingerprint
    t0 = time.perf_counter()
    eos = resolve_eos(conf.tokenizer, tok, conf.eos_token)
    meta = tokenize_file(src, out, conf, tok, eos, tokenizer_fingerprint(project_path(conf.tokenizer)),
                         progress=False)
    return time.perf_counter() - t0, meta


def time_datasets_map(src: Path, out: Path, conf: TokenizeCPTConfig, num_proc: int) -> tuple[float, int]:
    """(seconds, tokens) of the alternative: datasets.map(num_proc) tokenizing, then the same
    packing. Measured by the benchmark to pick the default; not used by the stage."""
    import tempfile
    import time

    import datasets
    t0 = time.perf_counter()
    tok_file = str(project_path(conf.tokenizer) / "tokenizer.json")
    tok = load_tokenizer(conf.tokenizer)
    _, eos_id = resolve_eos(conf.tokenizer, tok, conf.eos_token)
    with tempfile.TemporaryDirectory() as cache:
        ds = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=cache)
        ds = ds.map(_DatasetsEncoder(tok_file, eos_id, conf.text_field), batched=True,
                    batch_size=conf.batch_docs, num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=ds.column_names, desc=None)
        out.mkdir(parents=True, exist_ok=True)
        writer = BlockWriter(out / "blocks.npy", conf.seq_len)
        for table in ds.with_format("arrow").iter(batch_size=4096):
            writer.add(table.column("ids").combine_chunks().values.to_numpy().astype(np.int32))
        packed = writer.close()
    return time.perf_counter() - t0, packed["n_input_tokens"]


class _DatasetsEncoder:
    """Picklable map function (datasets ships it to its worker processes)."""

    def __init__(self, tokenizer_file: str, eos_id: int, text_field: str):
        self.tokenizer_file, self.eos_id, self.text_field = tokenizer_file, eos_id, text_field
        self.tok = None

    def __call__(self, batch: dict) -> dict:
        if self.tok is None:
            self.tok = load_tokenizer(Path(self.tokenizer_file).parent)
        ids = [e.ids + [self.eos_id] for e in self.tok.encode_batch_fast(batch[self.text_field],
                                                                          add_special_tokens=False)]
        return {"ids": ids}
