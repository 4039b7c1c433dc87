"""Training data that the alignment methods read as text records (TRL's conversational
schemas) instead of a tokenized store: TRL tokenizes them at the start of the run through the
model's chat template, so the prompt tokens are the ones the eval and the server use.

Kinds and their records (one JSON object per line of a ``.jsonl`` file; stage 03b writes
``pairs_*.jsonl`` and ``kto_*.jsonl``, stage 08b ``pairs.jsonl``, ``kto.jsonl`` and
``prompts.jsonl``):

- ``pref`` (dpo, orpo, simpo): ``prompt`` [turns] + ``chosen`` / ``rejected`` [assistant turn]
- ``kto``: ``prompt`` + ``completion`` [assistant turn] + ``label`` (bool)
- ``prompts`` (grpo): ``prompt`` [turns]; every other field (e.g. ``answer``) is handed to the
  reward functions as a column

Every record is checked when the config is validated, before any model loads; a bad one is a
ConfigError naming file:line and the field.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..config import ConfigError
from .data import DataInfo

KINDS = {"pref": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion", "label"),
         "prompts": ("prompt",)}
WHERE = {"pref": "stage 03b (data/cleaned/pref/pairs_train.jsonl) or 08b (pairs.jsonl)",
         "kto": "stage 03b (data/cleaned/pref/kto_train.jsonl) or 08b (kto.jsonl)",
         "prompts": "stage 08b (data/cleaned/pref_onpolicy/prompts.jsonl)"}


def _turns(v, key: str, where: str, roles: set[str] | None = None) -> None:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where}: '{key}' must be a non-empty list of {{role, content}} turns "
                          f"(TRL's conversational format), got {type(v).__name__}")
    for i, t in enumerate(v):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or "role" not in t:
            raise ConfigError(f"{where}: '{key}[{i}]' is not a {{role, content}} turn")
        if roles is not None and t["role"] not in roles:
            raise ConfigError(f"{where}: '{key}[{i}]' has role {t['role']!r}; expected {sorted(roles)}")


def check_record(rec, kind: str, where: str) -> None:
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: a record must be a JSON object")
    for k in KINDS[kind]:
        if k not in rec:
            raise ConfigError(f"{where}: missing field '{k}' (a {kind} record has {', '.join(KINDS[kind])})")
    _turns(rec["prompt"], "prompt", where)
    if rec["prompt"][-1]["role"] == "assistant":
        raise ConfigError(f"{where}: 'prompt' ends with an assistant turn; the answer belongs in "
                          f"{'chosen/rejected' if kind == 'pref' else 'completion'}")
    for k in ("chosen", "rejected", "completion"):
        if k in KINDS[kind]:
            _turns(rec[k], k, where, roles={"assistant"})
    if kind == "pref" and rec["chosen"] == rec["rejected"]:
        raise ConfigError(f"{where}: chosen and rejected are identical")
    if kind == "kto" and not isinstance(rec["label"], bool):
        raise ConfigError(f"{where}: 'label' must be true or false, got {rec['label']!r}")


def read_records(path: Path, kind: str) -> list[dict]:
    from ..jsonl import iter_jsonl
    out = []
    for line, rec in iter_jsonl(path, error=ConfigError):  # a line that is not JSON: ConfigError file:line
        check_record(rec, kind, f"{path}:{line}")
        out.append(rec)
    return out


def inspect_text(path: Path, kind: str, max_items: int | None, max_length: int, what: str, task: str) -> DataInfo:
    """Check a text data file for a method and describe it (its sha256 is the data fingerprint;
    there is no tokenizer fingerprint: the run tokenizes with the model's own tokenizer)."""
    if path.is_dir():
        raise ConfigError(f"key '{what}': {path} is a directory; task {task} reads a .jsonl file of {kind} records "
                          f"from {WHERE[kind]}")
    if not path.is_file():
        raise ConfigError(f"key '{what}': {path} does not exist; task {task} reads {kind} records from {WHERE[kind]}")
    if path.suffix != ".jsonl":
        raise ConfigError(f"key '{what}': {path} is not a .jsonl file (task {task} reads {kind} records)")
    recs = read_records(path, kind)
    if not recs:
        raise ConfigError(f"key '{what}': {path} holds no records")
    n = len(recs) if max_items is None else min(len(recs), max_items)
    if kind == "kto":
        labels = {bool(r["label"]) for r in recs[:n]}
        if len(labels) < 2:
            raise ConfigError(f"key '{what}': {path} has only {'good' if True in labels else 'bad'} examples in "
                              f"the {n} used; KTO needs both labels")
    meta = {"data_fingerprint": hashlib.sha256(path.read_bytes()).hexdigest()[:16], "tokenizer_fingerprint": None,
            "n_rows": len(recs), "seq_len": max_length, "format": kind, "text": True}
    return DataInfo(path=path, kind=kind, meta=meta, seq_len=max_length, n_items=n)


def open_text_dataset(info: DataInfo):
    """A datasets.Dataset of the records used (TRL's trainers take one)."""
    from datasets import Dataset
    recs = read_records(info.path, info.kind)[: info.n_items]
    return Dataset.from_list(recs)


def sequence_lengths(info: DataInfo, tokenizer) -> list[int]:
    """Token lengths of the sequences one pass over the data runs through the model (a pair:
    prompt + chosen and prompt + rejected; kto: prompt + completion; prompts: the prompt), for
    the attention term of the FLOP formula and the record."""
    out = []
    for r in read_records(info.path, info.kind)[: info.n_items]:
        answers = [r[k] for k in ("chosen", "rejected", "completion") if k in r] or [[]]
        for a in answers:
            ids = tokenizer.apply_chat_template(r["prompt"] + a, tokenize=True, add_generation_prompt=not a)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            out.append(min(len(ids), info.seq_len))
    return out
