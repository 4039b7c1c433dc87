"""Training data: the tokenized CPT blocks and SFT stores, their collators, and the facts the
run records (seq_len, fingerprints, token counts).

Collators add plain ints per batch (``TOKENS_KEY``: real, non-padding tokens; ``SLOTS_KEY``:
token slots including padding) so that the trainer counts tokens and padding waste on the
host, without a device sync; the trainer pops them before the forward pass.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError

TOKENS_KEY = "_forgelab_tokens"
SLOTS_KEY = "_forgelab_slots"     # token slots of the batch, padding included (for padding waste)
DIGESTS_KEY = "_forgelab_digests"  # per item of the batch: a digest of its tokens (metrics.sample_digests)


@dataclass
class DataInfo:
    path: Path
    kind: str            # "cpt" or "sft"
    meta: dict
    seq_len: int
    n_items: int          # items actually used (after max_train_items)

    @property
    def data_fingerprint(self) -> str | None:
        return self.meta.get("data_fingerprint")

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.meta.get("tokenizer_fingerprint")


def detect_kind(path: Path) -> str:
    if (path / "blocks.npy").is_file():
        return "cpt"
    if (path / "row_offsets.npy").is_file() and (path / "input_ids.npy").is_file():
        return "sft"
    raise ConfigError(f"{path}: neither a CPT block dir (blocks.npy) nor an SFT store (input_ids.npy + "
                      "row_offsets.npy); build it with scripts/04_tokenize_cpt.py or scripts/05_tokenize_sft.py")


def inspect(path: str | Path, want: str, max_items: int | None = None, what: str = "data.train",
            task: str | None = None) -> DataInfo:
    """Read a data dir's meta.json (no arrays) and check it holds the kind of data the method
    reads (want: "cpt" or "sft"); no model is touched."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"key '{what}': {path} does not exist")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"key '{what}': {meta_path} is missing (an incomplete or foreign dir)")
    kind = detect_kind(path)
    if kind != want:
        raise ConfigError(f"key '{what}': {path} holds {kind.upper()} data but task {task or want} needs "
                          f"{want.upper()} data")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    n = int(meta["n_blocks"] if kind == "cpt" else meta["n_rows"])
    if n < 1:
        raise ConfigError(f"key '{what}': {path} is empty")
    if max_items is not None:
        n = min(n, max_items)
    return DataInfo(path=path, kind=kind, meta=meta, seq_len=int(meta["seq_len"]), n_items=n)


def open_dataset(info: DataInfo):
    """The torch Dataset for a data dir (the readers belong to the data stages)."""
    import torch

    if info.kind == "cpt":
        from ..data.cpt_dataset import CPTBlockDataset
        ds = CPTBlockDataset(info.path)
    else:
        from ..data.sft_store import SFTDataset
        ds = SFTDataset(info.path)
    if info.n_items < len(ds):
        ds = torch.utils.data.Subset(ds, range(info.n_items))
    return ds


class CPTCollator:
    """Stack fixed-length blocks; every token is real. ``position_ids``: add them (0..seq-1 per
    block) for Ulysses sequence parallelism, whose DataLoader adapter refuses batches without
    them: each rank keeps only a slice of the sequence and needs its tokens' global positions."""

    def __init__(self, position_ids: bool = False):
        self.position_ids = position_ids

    def __call__(self, features: list[dict]) -> dict:
        import torch
        batch = {"input_ids": torch.stack([f["input_ids"] for f in features]),
                 "labels": torch.stack([f["labels"] for f in features])}
        if self.position_ids:
            b, n = batch["input_ids"].shape
            batch["position_ids"] = torch.arange(n).expand(b, n).contiguous()
        batch[TOKENS_KEY] = batch[SLOTS_KEY] = int(batch["input_ids"].numel())
        return batch


class SFTCollator:
    """Pad variable-length (packed) rows with the data stage's collate_sft; count real tokens."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        from ..data.sft_store import collate_sft
        batch = collate_sft(features, self.pad_token_id, self.pad_to_multiple_of)
        batch[TOKENS_KEY] = int(sum(len(f["input_ids"]) for f in features))
        batch[SLOTS_KEY] = int(batch["input_ids"].numel())
        return batch


def _token_bytes(v) -> bytes:
    if hasattr(v, "numpy"):
        v = v.numpy()
    if isinstance(v, (list, np.ndarray)):
        try:
            arr = np.asarray(v)
        except ValueError:  # ragged: not a token array
            arr = None
        if arr is not None and arr.dtype.kind in "iu":
            return arr.astype(np.int64).tobytes()
    return json.dumps(v, sort_keys=True, default=str).encode()


def item_digest(item) -> str:
    """16 hex digits naming one training item by its content: the tokens (``input_ids``) of a
    tokenized item, else every field of a TRL record (prompt, chosen, ...) in key order."""
    import hashlib
    h = hashlib.blake2b(digest_size=8)
    fields = {"input_ids": item["input_ids"]} if "input_ids" in item else item
    for key in sorted(fields):
        h.update(key.encode())
        h.update(_token_bytes(fields[key]))
    return h.hexdigest()


class DigestCollator:
    """Around any collator: the digests of the batch's items, for samples/rank<r>.jsonl."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        if isinstance(batch, dict):
            batch[DIGESTS_KEY] = [item_digest(f) for f in features]
        return batch


class CountingCollator:
    """Around a collator that does not count (TRL's): real tokens are the ones its attention
    masks keep (every ``*attention_mask`` of the batch: chosen and rejected, KTO's KL pass),
    slots the masks' sizes. Batches that are not tensors (GRPO's prompt lists) pass unchanged;
    GRPO counts what it generates itself."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        if isinstance(batch, dict):
            # ORPO/CPO batches carry the prompt's mask beside chosen/rejected masks that already
            # include the prompt (a decoder-only model never runs the prompt alone): not counted
            skip = {"prompt_attention_mask"} if "chosen_attention_mask" in batch else set()
            masks = [v for k, v in batch.items()
                     if k.endswith("attention_mask") and k not in skip and hasattr(v, "sum")]
            if masks:
                batch[TOKENS_KEY] = int(sum(int(m.sum()) for m in masks))
                batch[SLOTS_KEY] = int(sum(m.numel() for m in masks))
        return batch


def attention_span(info: DataInfo) -> float:
    """Mean number of keys a token's attention covers, for the FLOP formula's attention term.

    CPT blocks attend over the whole block: seq_len. Packed SFT rows attend only within each
    sample (position ids restart at 0), so the honest span is sum(len_i^2) / sum(len_i) over
    the samples, read from position_ids.npy.
    """
    if info.kind == "cpt":
        return float(info.seq_len)
    pos = np.load(info.path / "position_ids.npy", mmap_mode="r")
    offsets = np.load(info.path / "row_offsets.npy", mmap_mode="r")
    pos = np.asarray(pos[: int(offsets[info.n_items])], dtype=np.int64)
    if len(pos) == 0:
        return float(info.seq_len)
    starts = np.flatnonzero(pos == 0)
    lengths = np.diff(np.append(starts, len(pos))).astype(np.float64)
    return float((lengths ** 2).sum() / lengths.sum())


def mean_row_tokens(info: DataInfo) -> float:
    if info.kind == "cpt":
        return float(info.seq_len)
    offsets = np.load(info.path / "row_offsets.npy", mmap_mode="r")
    return float(offsets[info.n_items] - offsets[0]) / info.n_items
