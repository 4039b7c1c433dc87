#!/usr/bin/env python3
"""Cut a CPT block store (stage 04 format: blocks.npy + meta.json) into blocks of another length
over the same token stream, so one carried store feeds runs of several sequence lengths (the
carry limit): shorter blocks split each block, longer ones join consecutive blocks (the tail
that does not fill a block is left out). The new store's data fingerprint names its source and
length.

  python scripts/gpu/reblock.py .gpu/cpt32k/train .gpu/cpt2048/train 2048
  python scripts/gpu/reblock.py .gpu/cpt2048L/train .gpu/cpt16384/train 16384
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    src, dst, seq = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    meta = json.loads((src / "meta.json").read_text())
    blocks = np.load(src / "blocks.npy")
    have = meta["seq_len"]
    if have % seq and seq % have:
        raise SystemExit(f"{src}: seq_len {have} and {seq}: neither is a multiple of the other")
    keep = blocks.shape[0] - blocks.shape[0] % (seq // have) if seq > have else blocks.shape[0]
    if keep == 0:
        raise SystemExit(f"{src}: {blocks.shape[0]} blocks of {have} do not fill one block of {seq}")
    out = np.ascontiguousarray(blocks[:keep].reshape(-1, seq))
    dst.mkdir(parents=True, exist_ok=True)
    np.save(dst / "blocks.npy", out)
    meta.update(seq_len=seq, n_blocks=int(out.shape[0]), source=f"{src} (re-cut from seq {meta['seq_len']})",
                data_fingerprint=hashlib.sha256(f"{meta['data_fingerprint']}:{seq}".encode()).hexdigest()[:16])
    (dst / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"{dst}: {out.shape[0]} blocks of {seq}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
