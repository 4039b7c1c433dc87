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


_WITH_TEMPLATE: dict[tuple[str, str, str], str] = {}


def tokenizer_fingerprint_with_template(path: str | Path, chat_template: str) -> str:
    """The fingerprint of the tokenizer at ``path`` saved with ``chat_template`` set: what a
    model directory holds when training sets the template of its SFT data (recorded in the
    store's meta.json) on the tokenizer and saves it (``save_pretrained``). Equal to
    :func:`tokenizer_fingerprint` of that saved directory."""
    import tempfile

    from transformers import AutoTokenizer

    key = (str(Path(path).resolve()), tokenizer_fingerprint(path), chat_template)
    if key not in _WITH_TEMPLATE:
        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = chat_template
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            _WITH_TEMPLATE[key] = tokenizer_fingerprint(d)
    return _WITH_TEMPLATE[key]
