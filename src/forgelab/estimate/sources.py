"""Where scripts/estimate.py finds an estimate's inputs when it is given a config file rather
than a run: the config (the lab's schema, or plain YAML of another tool), the model (a preset,
a configs/model/*.yaml or a model directory), the number of training items and ranks."""
from __future__ import annotations

import json
from typing import Any

from ..config import ConfigError
from .shape import _flatten


def load_train_conf(paths: list, overrides: list[str]) -> tuple[Any, str]:
    """The training config through its schema (kind 'train'); plain composed YAML when the
    schema is not importable. Returns (config, description)."""
    from .. import cli
    from .. import config as cfg
    from ..runs import project_path
    files = [project_path(p) for p in paths]
    try:
        schema = cli.schema("train")
    except (ImportError, AttributeError):
        schema = None
    if schema is not None and files:
        return cfg.load(schema, files, overrides), "schema train: " + ", ".join(map(str, paths))
    merged: dict = {}
    for f in files:
        cfg._merge(merged, cfg._load_layers(f, {}), str(f), {})
    for item in overrides:
        keys, value = cfg.parse_set(item)
        node = merged
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return merged, ("plain YAML: " + ", ".join(map(str, paths)) if paths else "--set values only")


def _leaf(conf: Any, names: tuple[str, ...]) -> tuple[Any, str | None]:
    flat = _flatten(conf)
    for name in names:
        hits = [k for k in flat if (k == name or k.endswith("." + name)) and flat[k] not in (None, "")]
        if hits:
            key = min(hits, key=lambda k: (k.count("."), k))
            return flat[key], key
    return None, None


def resolve_model_config(conf: Any, model: str | None = None) -> tuple[Any, str]:
    """A transformers config from --model or the training config's model key."""
    from ..model import presets
    from ..runs import project_path
    src = "--model"
    if model is None:
        model, key = _leaf(conf, ("model.preset", "preset", "model.name_or_path", "model_name_or_path",
                                  "model.path", "model_path", "model.name", "model"))
        if model is None:
            raise ConfigError("no model: pass --model PRESET|DIR or set model.name_or_path / model.preset")
        src = f"config key {key}"
    model = str(model)
    vocab = None
    tok, _ = _leaf(conf, ("tokenizer", "tokenizer_path", "tokenizer.path", "model.tokenizer"))
    if tok and project_path(tok).is_dir():
        from transformers import AutoTokenizer
        vocab = len(AutoTokenizer.from_pretrained(project_path(tok)))
    if model in presets.PRESETS or model.endswith((".yaml", ".yml")):
        return presets.build_config(model, vocab_size=vocab), f"{model} ({src})"
    path = project_path(model)
    if path.is_dir():
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(path), f"{path} ({src})"
    raise ConfigError(f"model {model!r} ({src}) is neither a preset ({', '.join(presets.PRESETS)}), "
                     "a configs/model/*.yaml nor a model directory")


def count_items(path: Any) -> tuple[int | None, int | None]:
    """(training items, sequence length or None) of a jsonl file, a directory of jsonl files,
    or a tokenized directory whose meta.json states them (n_blocks / n_rows, seq_len)."""
    from ..runs import project_path
    p = project_path(path)
    if p.is_file() and p.suffix in (".jsonl", ".txt"):
        with open(p, "rb") as f:
            return sum(1 for line in f if line.strip()), None
    if p.is_dir():
        for meta in ("meta.json", "summary.json", "dataset_info.json"):
            if (p / meta).is_file():
                data = json.loads((p / meta).read_text(encoding="utf-8"))
                for k in ("n_blocks", "n_rows", "num_blocks", "num_sequences", "num_rows", "num_samples", "items"):
                    if isinstance(data.get(k), int):
                        seq = data.get("seq_len")
                        return data[k], (int(seq) if isinstance(seq, int) else None)
        files = sorted(p.glob("*.jsonl"))
        if files:
            return sum(count_items(f)[0] or 0 for f in files), None
    return None, None


def resolve_items(conf: Any, items: int | None) -> tuple[int, str, int | None]:
    """(items, where from, sequence length stated by the data or None)."""
    if items is not None:
        return items, "--items", None
    path, key = _leaf(conf, ("train_file", "train_path", "data.train", "dataset_path", "data.path",
                             "train_data", "dataset"))
    if path is not None:
        n, seq = count_items(path)
        if n is not None:
            cap, _ = _leaf(conf, ("max_train_items",))
            note = ""
            if isinstance(cap, int) and cap < n:
                n, note = cap, ", capped by max_train_items"
            return n, f"counted in {path} (config key {key}{note})", seq
        raise ConfigError(f"cannot count training items in {path} (config key {key}); "
                          "build the data first or pass --items N")
    raise ConfigError("no training data in the config; pass --items N")


def resolve_world_size(conf: Any) -> int:
    v, _ = _leaf(conf, ("world_size", "nproc_per_node", "num_gpus", "gpus"))
    try:
        return max(1, int(v)) if v is not None else 1
    except (TypeError, ValueError):
        return 1
