"""Model size presets: named transformers configs of one family of decoder shapes (RoPE,
SwiGLU, RMSNorm, grouped-query attention, tied embeddings, no biases), as Llama or Qwen3
architectures so that transformers, peft, DeepSpeed and vLLM all know them.

    build_config("small", vocab_size=len(tokenizer))        # a transformers PretrainedConfig
    build_config("configs/model/small.yaml")                 # the same, from its YAML
    count_params(conf)                                       # exact counts (meta-device model)

`python -m forgelab.model.presets --write configs/model` regenerates configs/model/*.yaml with
the parameter counts computed from the model itself.
"""
from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

MIN_HEAD_DIM = 32  # vLLM's CPU attention supports 32..512 only; flash kernels want >= 32

_COMMON = {"hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": True,
           "attention_dropout": 0.0, "initializer_range": 0.02}
_LLAMA = dict(_COMMON, mlp_bias=False, rms_norm_eps=1e-5,
              rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
_QWEN3 = dict(_COMMON, rms_norm_eps=1e-6, use_sliding_window=False,
              rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})

# name -> (model_type, purpose, config). vocab_size is the default when no tokenizer is given.
PRESETS: dict[str, tuple[str, str, dict]] = {
    "tiny": ("llama", "unit and chain tests on CPU", dict(
        _LLAMA, vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=384, max_position_embeddings=2048)),
    "small": ("llama", "pretraining from scratch on one GPU (or slowly on CPU)", dict(
        _LLAMA, vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, intermediate_size=1408, max_position_embeddings=2048)),
    "medium": ("llama", "pretraining from scratch, one or two GPUs", dict(
        _LLAMA, vocab_size=32000, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=64, intermediate_size=3072, max_position_embeddings=4096)),
    "large": ("llama", "multi-GPU pretraining (ZeRO / FSDP)", dict(
        _LLAMA, vocab_size=32000, hidden_size=2048, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=5632, max_position_embeddings=4096)),
    "qwen3-0.6b": ("qwen3", "Qwen3-0.6B shape (benchmarks, memory estimates)", dict(
        _QWEN3, vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960)),
    "qwen3-1.7b": ("qwen3", "Qwen3-1.7B shape (benchmarks, memory estimates)", dict(
        _QWEN3, vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=6144, max_position_embeddings=40960)),
}


class PresetError(ValueError):
    pass


def _config_class(model_type: str):
    from transformers import AutoConfig
    return type(AutoConfig.for_model(model_type))


def _from_yaml(path: Path) -> tuple[str, dict]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise PresetError(f"{path}: invalid YAML: {e}") from None
    for key in ("model_type", "config"):
        if key not in data:
            raise PresetError(f"{path}: missing key '{key}' (a model preset YAML needs model_type and config)")
    if not isinstance(data["config"], dict):
        raise PresetError(f"{path}: 'config' must be a mapping")
    return data["model_type"], dict(data["config"])


def build_config(preset: str | Path, vocab_size: int | None = None, **overrides: Any):
    """A transformers config for a preset name or a configs/model/*.yaml file.

    vocab_size: the tokenizer's size (len(tokenizer)); overrides: any config attribute
    (e.g. num_hidden_layers=4, bos_token_id=...). Unknown attribute names are an error.
    """
    p = Path(str(preset))
    if str(preset) in PRESETS:
        model_type, _, conf = PRESETS[str(preset)]
        conf = copy.deepcopy(conf)
    elif p.suffix in (".yaml", ".yml"):
        from ..runs import project_path
        path = project_path(p)
        if not path.is_file():
            raise PresetError(f"model preset file not found: {path}")
        model_type, conf = _from_yaml(path)
    else:
        close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PresetError(f"unknown model preset {str(preset)!r}{hint} (presets: {', '.join(PRESETS)}, "
                          "or a path to a configs/model/*.yaml)")
    cls = _config_class(model_type)
    known = set(cls().to_dict()) | {"head_dim", "rope_parameters", "bos_token_id", "eos_token_id",
                                    "pad_token_id", "dtype"}
    for k in overrides:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PresetError(f"unknown {model_type} config key {k!r} for preset {str(preset)!r}{hint}")
    conf.update(overrides)
    if vocab_size is not None:
        conf["vocab_size"] = int(vocab_size)
    head_dim = conf.get("head_dim") or conf["hidden_size"] // conf["num_attention_heads"]
    if head_dim < MIN_HEAD_DIM:
        raise PresetError(f"preset {str(preset)!r}: head_dim {head_dim} < {MIN_HEAD_DIM} "
                          "(vLLM and flash attention kernels need >= 32)")
    if conf["num_attention_heads"] % conf["num_key_value_heads"]:
        raise PresetError(f"preset {str(preset)!r}: num_attention_heads {conf['num_attention_heads']} "
                          f"is not a multiple of num_key_value_heads {conf['num_key_value_heads']}")
    return cls(**conf)


def count_params(conf) -> dict:
    """Exact parameter counts of the model a config builds (on the meta device: no memory)."""
    from .dims import model_dims
    d = model_dims(conf)
    lm = d.lm_head_params
    return {"total": d.params, "embedding": d.embedding_params, "lm_head": lm,
            "non_embedding": d.params - d.embedding_params - lm, "tied_embeddings": d.tied,
            "per_layer": d.layer_params}


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def preset_yaml(name: str) -> str:
    """configs/model/<name>.yaml text: the config plus counts computed from the built model."""
    model_type, purpose, conf = PRESETS[name]
    built = build_config(name)
    counts = count_params(built)
    head = (f"# Model preset '{name}': {purpose}.\n"
            f"# Generated by `python -m forgelab.model.presets --write configs/model`; the counts below\n"
            f"# are computed from the transformers model this config builds (at this vocab size;\n"
            f"# build_config(..., vocab_size=len(tokenizer)) changes the embedding part).\n")
    body = {"name": name, "model_type": model_type, "config": conf,
            "params": {**counts, "human": human(counts["total"]),
                       "bytes_bf16": counts["total"] * 2, "bytes_fp32": counts["total"] * 4}}
    return head + yaml.safe_dump(body, sort_keys=False)


def table() -> list[dict]:
    rows = []
    for name, (model_type, purpose, _) in PRESETS.items():
        c = build_config(name)
        n = count_params(c)
        rows.append({"preset": name, "arch": model_type, "hidden": c.hidden_size,
                     "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                     "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                     "intermediate": c.intermediate_size, "vocab": c.vocab_size,
                     "params": n["total"], "non_embedding": n["non_embedding"], "purpose": purpose})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="List model presets or write configs/model/*.yaml.")
    ap.add_argument("--write", metavar="DIR", help="write <DIR>/<preset>.yaml for every preset")
    a = ap.parse_args(argv)
    if a.write:
        from ..runs import atomic_write_text, project_path
        out = project_path(a.write)
        for name in PRESETS:
            atomic_write_text(out / f"{name}.yaml", preset_yaml(name))
            print(f"wrote {out / (name + '.yaml')}")
        return 0
    print(f"{'preset':12s} {'arch':6s} {'hidden':>6s} {'layers':>6s} {'heads':>5s} {'kv':>3s} "
          f"{'hd':>4s} {'inter':>6s} {'vocab':>7s} {'params':>14s} {'non-emb':>14s}")
    for r in table():
        print(f"{r['preset']:12s} {r['arch']:6s} {r['hidden']:6d} {r['layers']:6d} {r['heads']:5d} "
              f"{r['kv_heads']:3d} {r['head_dim']:4d} {r['intermediate']:6d} {r['vocab']:7d} "
              f"{r['params']:14,d} {r['non_embedding']:14,d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
