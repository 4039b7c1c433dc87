"""Stage 04 (CPT benchmark slice): a fixed set of blocks, chosen by seed from the train
blocks, in the same format, so throughput runs on any machine train on identical tokens.

Outputs: <out_dir>/ (blocks.npy + meta.json), <summary_path> (fingerprints, seed, sizes)
and <indices_path> (the block indices used, ascending).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, field
from ..runs import fingerprint_paths, now_iso, project_path, write_json
from .cpt_dataset import load_blocks


@dataclass
class BenchSliceConfig:
    source_dir: str = field("data/tokenized/cpt/train", help="packed train blocks to draw from")
    out_dir: str = field("data/tokenized/cpt/bench", help="the slice, same format as the source")
    summary_path: str = field("data/tokenized/cpt/bench_summary.json", help="fingerprints, seed, sizes")
    indices_path: str = field("data/tokenized/cpt/bench_indices.json", help="the block indices used")
    n_blocks: int = field(512, help="blocks in the slice (fails if the source has fewer)")
    seed: int = field(1234, help="seed of the block choice")

    def validate(self) -> None:
        if self.n_blocks < 1:
            raise ConfigError(f"key 'n_blocks': must be >= 1, got {self.n_blocks}")


class SliceError(ValueError):
    pass


def choose_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """n distinct block indices out of n_total, ascending (sequential reads of the memory map)."""
    if n > n_total:
        raise SliceError(f"asked for {n} blocks but the source has only {n_total}; "
                         f"lower n_blocks or build a larger corpus")
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def build_slice(conf: BenchSliceConfig, log) -> dict:
    src = project_path(conf.source_dir)
    try:
        blocks, meta = load_blocks(src)
    except FileNotFoundError as e:
        raise SliceError(str(e)) from None
    idx = choose_indices(meta["n_blocks"], conf.n_blocks, conf.seed)
    out = project_path(conf.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta lands
    tmp = out / f".blocks.npy.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # np.save on a file object: the temp name keeps it atomic
        chosen = np.ascontiguousarray(blocks[idx], dtype=np.int32)
        np.save(f, chosen)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "blocks.npy")
    slice_fp = fingerprint_paths([out / "blocks.npy"])
    sub_meta = {k: v for k, v in meta.items() if k not in ("n_blocks", "n_tokens", "dropped_tail_tokens",
                                                           "n_input_tokens", "tokens_by_source",
                                                           "n_documents", "empty_documents", "n_chars",
                                                           "created_at")}
    sub_meta.update({
        "n_blocks": int(len(idx)), "n_tokens": int(len(idx)) * meta["seq_len"], "dropped_tail_tokens": 0,
        # documents are cut at block borders: count those that end inside the slice (their EOS)
        "n_documents": int((chosen == meta["eos_token_id"]).sum()),
        "slice_of": conf.source_dir, "slice_seed": conf.seed, "indices_path": conf.indices_path,
        "blocks_fingerprint": slice_fp, "created_at": now_iso(),
    })
    write_json(out / "meta.json", sub_meta)
    write_json(project_path(conf.indices_path), {"source_dir": conf.source_dir, "seed": conf.seed,
                                                 "indices": idx.tolist()})
    summary = {
        "source_dir": conf.source_dir, "out_dir": conf.out_dir, "seed": conf.seed,
        "n_blocks": int(len(idx)), "seq_len": meta["seq_len"], "n_tokens": sub_meta["n_tokens"],
        "source_n_blocks": meta["n_blocks"],
        "data_fingerprint": meta["data_fingerprint"], "blocks_fingerprint": slice_fp,
        "tokenizer_fingerprint": meta["tokenizer_fingerprint"], "tokenizer_path": meta["tokenizer_path"],
        "eos_token_id": meta["eos_token_id"], "indices_path": conf.indices_path, "created_at": now_iso(),
    }
    write_json(project_path(conf.summary_path), summary)
    log.info("bench slice: %d of %d blocks (seed %d) -> %s, blocks fingerprint %s",
             len(idx), meta["n_blocks"], conf.seed, out, slice_fp)
    return summary
