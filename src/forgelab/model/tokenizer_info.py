"""Tokenizer fingerprint: one hash over the files that decide token ids and the chat
template, so runs and datasets built with different tokenizers are never compared."""
from __future__ import annotations

import hashlib
from pathlib import Path

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
         "tokenizer.model")


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 (16 hex) over the tokenizer files present in a model/tokenizer directory."""
    d = Path(path)
    h = hashlib.sha256()
    found = False
    for name in FILES:
        f = d / name
        if f.is_file():
            found = True
            h.update(name.encode())
            h.update(f.read_bytes())
    if not found:
        raise FileNotFoundError(f"no tokenizer files in {d}")
    return h.hexdigest()[:16]
