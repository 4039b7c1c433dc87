#!/usr/bin/env python3
"""Cut a CPT block store (stage 04 format: blocks.npy + meta.json) into shorter blocks of the
same tokens, so one carried store feeds runs of several sequence lengths (the carry limit).
The new store's data fingerprint names its source and length.

  python scripts/gpu/reblock.py .gpu/cpt32k/train .gpu/cpt2048/train 2048
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
    if meta["seq_len"] % seq:
        raise SystemExit(f"{src}: seq_len {meta['seq_len']} is not a multiple of {seq}")
    out = np.ascontiguousarray(blocks.reshape(-1, seq))
    dst.mkdir(parents=True, exist_ok=True)
    np.save(dst / "blocks.npy", out)
    meta.update(seq_len=seq, n_blocks=int(out.shape[0]), source=f"{src} (re-cut from seq {meta['seq_len']})",
                data_fingerprint=hashlib.sha256(f"{meta['data_fingerprint']}:{seq}".encode()).hexdigest()[:16])
    (dst / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"{dst}: {out.shape[0]} blocks of {seq}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
