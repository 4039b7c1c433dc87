"""The packed CPT block format and its torch Dataset.

A directory holds ``blocks.npy`` (int32, shape [n_blocks, seq_len], documents joined with
EOS and cut into fixed-length blocks) and ``meta.json`` (seq_len, n_blocks, n_tokens,
eos_token_id, fingerprints, ...). meta.json is written last: a directory without it is
incomplete.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def load_blocks(path: str | Path) -> tuple[np.ndarray, dict]:
    """(memory-mapped blocks, meta), checked against each other."""
    d = Path(path)
    meta_path, blocks_path = d / "meta.json", d / "blocks.npy"
    if not meta_path.is_file() or not blocks_path.is_file():
        raise FileNotFoundError(f"{d}: not a CPT block directory (needs blocks.npy and meta.json; "
                                f"run scripts/04_tokenize_cpt.py)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    blocks = np.load(blocks_path, mmap_mode="r")
    want = (meta["n_blocks"], meta["seq_len"])
    if blocks.dtype != np.int32 or blocks.shape != want:
        raise ValueError(f"{blocks_path}: {blocks.dtype} {blocks.shape} does not match meta.json "
                         f"(int32 {want})")
    return blocks, meta


class CPTBlockDataset(Dataset):
    """Items {"input_ids", "labels"}: LongTensor[seq_len] each, labels == input_ids (the model
    shifts them). Blocks are read from a memory map, so opening is instant at any size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.blocks, self.meta = load_blocks(self.path)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}
