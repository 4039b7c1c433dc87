"""The tokenized SFT store (what training reads) and its batch collator.

A split is a directory with four flat arrays, all rows concatenated:
  input_ids.npy, labels.npy, position_ids.npy  int32  [n_tokens]
  row_offsets.npy                               int64  [n_rows + 1]   row i = [off[i], off[i+1])
and ``meta.json``. Rows have variable length <= seq_len; a packed row holds several whole
samples whose position ids each restart at 0, and labels are -100 outside assistant turns.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

ARRAYS = ("input_ids", "labels", "position_ids")
IGNORE_INDEX = -100


def write_store(path: str | Path, input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray,
                row_offsets: np.ndarray, meta: dict) -> None:
    """Write a split atomically: into a temporary sibling directory, then swap it in."""
    path = Path(path)
    n = int(row_offsets[-1])
    if not (len(input_ids) == len(labels) == len(position_ids) == n):
        raise ValueError(f"store arrays disagree: {len(input_ids)}, {len(labels)}, {len(position_ids)} vs {n}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, arr, dtype in (("input_ids", input_ids, np.int32), ("labels", labels, np.int32),
                             ("position_ids", position_ids, np.int32), ("row_offsets", row_offsets, np.int64)):
        with open(tmp / f"{name}.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(arr, dtype=dtype))
            f.flush()
            os.fsync(f.fileno())
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class SFTDataset(torch.utils.data.Dataset):
    """A tokenized SFT split. Items: {"input_ids", "labels", "position_ids"} LongTensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: run scripts/05_tokenize_sft.py first")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arrays = {}
        for name in ARRAYS + ("row_offsets",):
            f = self.path / f"{name}.npy"
            if not f.is_file():
                raise FileNotFoundError(f"{f} missing: the store at {self.path} is incomplete")
            arrays[name] = np.load(f, mmap_mode="r")
        self.offsets = np.asarray(arrays.pop("row_offsets"))
        self.arrays = arrays
        n_tokens = int(self.offsets[-1]) if len(self.offsets) else -1
        for name, arr in arrays.items():
            if arr.dtype != np.int32 or arr.ndim != 1 or len(arr) != n_tokens:
                raise ValueError(f"{self.path}/{name}.npy: expected int32 [{n_tokens}], "
                                 f"got {arr.dtype} {list(arr.shape)}")
        if len(self.offsets) != self.meta["n_rows"] + 1:
            raise ValueError(f"{self.path}: row_offsets has {len(self.offsets)} entries, "
                             f"meta.json says n_rows={self.meta['n_rows']}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row_length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {k: torch.from_numpy(np.asarray(v[a:b], dtype=np.int64)) for k, v in self.arrays.items()}


def check_packed_forward(model) -> None:
    """Raise unless ``model(**collate_sft(...))`` keeps packed samples apart.

    transformers builds the block-diagonal mask from position_ids only when the forward
    creates no KV cache; with ``config.use_cache`` true (the default of most checkpoints) it
    silently falls back to one causal mask over the whole row. The HF Trainer sets
    ``use_cache`` from TrainingArguments (default False); a plain loop must do it itself.
    """
    conf = getattr(model, "config", None)
    if conf is None:
        raise ValueError("model has no config: cannot check packed-sequence support")
    if getattr(conf, "use_cache", False):
        raise ValueError("model.config.use_cache is True: packed samples would attend to each "
                         "other. Set model.config.use_cache = False for training/eval on packed rows.")


def collate_sft(features: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Pad rows on the right to the longest in the batch (optionally rounded up).

    Padding gets labels -100 and position ids that restart at 0, so the pad tail is a separate
    "sample" that no real token attends to; no attention_mask is returned, which lets the
    model build its block-diagonal causal mask from position_ids.
    """
    if not features:
        raise ValueError("collate_sft: empty batch")
    longest = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    b = len(features)
    input_ids = torch.full((b, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, longest), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.as_tensor(f["input_ids"])
        labels[i, :n] = torch.as_tensor(f["labels"])
        position_ids[i, :n] = torch.as_tensor(f["position_ids"])
        position_ids[i, n:] = torch.arange(longest - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
