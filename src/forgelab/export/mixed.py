"""The "FishAI mixed-precision" export (format forgelab-mixed-1): each layer type gets the fewest
bits it tolerates, and a loader turns the file back into a plain transformers model.

Why this mix (policy "fishai"): the token embedding (also the LM head when tied), the RMSNorm
gains and an untied LM head are a small share of the weights but are read per token or scale
every activation, so they stay FP16. Q/K projections feed the softmax, where an error is
amplified by exp(), so they get INT8 (symmetric, one scale per output channel). V/O and the FFN
(gate/up/down) are most of the weights and tolerate 4 bits: INT4 codes 0..15 in groups of
`group_size` input elements, each group with its own FP16 scale and zero point, two codes per
byte. The zero point is a float (dequant = (code - zero) * scale, as GGUF's Q4_1 stores
scale and min): the group's [min, max] maps exactly onto 0..15, where an integer zero would
shift the grid by up to half a step. Policies "int8", "int4" and "fp16" apply one scheme to every
linear layer, for comparison.

Rounding is round-to-nearest; `clip_search` also tries shrinking each group's (INT4) or row's
(INT8) range by a few ratios and keeps the one with the least squared reconstruction error:
clipping rare outliers buys finer steps for the rest. Ratio 1.0 is on the grid, so the search
never has a larger weight error than plain rounding (perplexity need not follow: on SmolLM2 it
helped "int4" by 3 points and was neutral for "fishai"; tests/test_export_mixed.py has the table).

The output directory holds model.quant.safetensors (`<param>.qweight`, `.scale`, `.zero`, or
`<param>` for FP16), forgelab_quant.json (format, policy, one record per tensor), the model's
config, generation config, tokenizer and chat template, and a forgelab_manifest.json; it is
built in a temporary sibling and published by rename, so it is complete or absent.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..config import RunError
from ..manifest import NAME as MANIFEST_NAME, require_intact, write_manifest
from ..runs import display_path, read_json, write_json

FORMAT = "forgelab-mixed-1"
WEIGHTS = "model.quant.safetensors"
META = "forgelab_quant.json"
KINDS = ("embedding", "norm", "lm_head", "q", "k", "v", "o", "ffn", "other")
_LINEAR = ("q", "k", "v", "o", "ffn")
POLICIES: dict[str, dict[str, str]] = {
    "fishai": {"embedding": "fp16", "norm": "fp16", "lm_head": "fp16", "q": "int8", "k": "int8",
               "v": "int4", "o": "int4", "ffn": "int4", "other": "fp16"},
    "int8": {k: ("int8" if k in _LINEAR else "fp16") for k in KINDS},
    "int4": {k: ("int4" if k in _LINEAR else "fp16") for k in KINDS},
    "fp16": {k: "fp16" for k in KINDS},
}
CLIP_RATIOS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)
# Files copied from the model dir besides the weights (those present).
COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
        "chat_template.jinja", "chat_template.json")
_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
         "gate_proj": "ffn", "up_proj": "ffn", "down_proj": "ffn"}
_FP16 = torch.finfo(torch.float16)


def layer_kind(param_name: str) -> str:
    """The layer type of a LLaMA/Qwen parameter name (weights and biases alike)."""
    parts = param_name.split(".")
    if "embed_tokens" in parts:
        return "embedding"
    if "lm_head" in parts:
        return "lm_head"
    if any("norm" in p for p in parts[:-1]):  # before q_proj: Qwen3's self_attn.q_norm is a norm
        return "norm"
    for p in parts:
        if p in _PROJ:
            return _PROJ[p]
    return "other"


def scheme_for(param_name: str, shape, policy: str) -> str:
    """Only 2-D weights are quantized; biases, norms and anything 1-D stay FP16."""
    if len(shape) != 2 or not param_name.endswith(".weight"):
        return "fp16"
    return POLICIES[policy][layer_kind(param_name)]


# --- INT4 codes: two per byte, element 2i in the low nibble, 2i+1 in the high one ---------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 with an even last dim -> uint8 of half that last dim."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def _half(t: torch.Tensor) -> torch.Tensor:
    """Round to what FP16 stores, so codes are chosen against the scale the loader will use."""
    return t.clamp(min=_FP16.tiny, max=_FP16.max).half().float()


def _best_ratio(err_of, shape) -> torch.Tensor:
    """Per row or group, the ratio of CLIP_RATIOS with the least squared error (1.0 on ties)."""
    best_r, best_e = torch.ones(shape), None
    for r in CLIP_RATIOS:
        e = err_of(r)
        if best_e is None:
            best_e = e
            continue
        better = e < best_e
        best_r[better], best_e = r, torch.minimum(e, best_e)
    return best_r


def _int8_grid(w, amax, r):
    scale = _half(amax * r / 127)
    return torch.clamp(torch.round(w / scale[:, None]), -127, 127), scale


def _int8_err(w, amax, r):
    q, scale = _int8_grid(w, amax, r)
    return q.mul_(scale[:, None]).sub_(w).square_().sum(dim=1)


def quantize_int8(w: torch.Tensor, clip_search: bool = True) -> dict[str, torch.Tensor]:
    """Symmetric INT8, one scale per output channel (row): w ~ qweight * scale."""
    amax = w.abs().amax(dim=1)
    r = _best_ratio(lambda r: _int8_err(w, amax, r), amax.shape) if clip_search else 1.0
    q, scale = _int8_grid(w, amax, r)
    return {"qweight": q.to(torch.int8), "scale": scale.half()}


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scale.float()[:, None]


def _int4_grid(g, lo, hi, r):
    # The floor keeps |zero| <= 1024 (finite and precise in FP16) for a near-constant group.
    scale = _half(torch.maximum((hi - lo) * r / 15, lo.abs() * r / 1024))
    zero = (-lo * r / scale).half().float()
    q = (g / scale[..., None]).add_(zero[..., None]).round_().clamp_(0, 15)
    return q, scale, zero


def quantize_int4(w: torch.Tensor, group_size: int = 128, clip_search: bool = True) -> dict[str, torch.Tensor]:
    """Asymmetric INT4 in groups of group_size input elements: w ~ (code - zero) * scale per group.
    An input dim that is not a multiple of group_size pads the last group by repeating its last
    element (the group's min and max stay the same); the padding is left out of the error and
    not stored (qweight holds ceil(in / 2) bytes per row)."""
    rows, cols = w.shape
    pad = -cols % group_size
    wp = torch.nn.functional.pad(w[None], (0, pad), mode="replicate")[0] if pad else w
    g = wp.reshape(rows, -1, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    mask = None
    if pad:
        mask = torch.ones(cols + pad)
        mask[cols:] = 0
        mask = mask.reshape(-1, group_size)

    def err(r):
        q, scale, zero = _int4_grid(g, lo, hi, r)
        d = q.sub_(zero[..., None]).mul_(scale[..., None]).sub_(g).square_()
        return (d.mul_(mask) if mask is not None else d).sum(dim=2)

    r = _best_ratio(err, lo.shape) if clip_search else 1.0
    q, scale, zero = _int4_grid(g, lo, hi, r)
    codes = q.reshape(rows, -1)[:, :cols + cols % 2].to(torch.uint8)  # padding is not stored
    return {"qweight": pack_int4(codes), "scale": scale.half(), "zero": zero.half()}


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape,
                    group_size: int = 128) -> torch.Tensor:
    rows, cols = shape
    codes = unpack_int4(qweight)[:, :cols].float()
    g = torch.nn.functional.pad(codes, (0, -cols % group_size)).reshape(rows, -1, group_size)
    w = (g - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(rows, -1)[:, :cols]


def _quantize(w: torch.Tensor, scheme: str, group_size: int, clip_search: bool) -> dict[str, torch.Tensor]:
    if scheme == "int8":
        return quantize_int8(w, clip_search)
    if scheme == "int4":
        return quantize_int4(w, group_size, clip_search)
    return {"": w.half()}


def _dequantize(parts: dict[str, torch.Tensor], scheme: str, shape, group_size: int) -> torch.Tensor:
    if scheme == "int8":
        return dequantize_int8(parts["qweight"], parts["scale"])
    if scheme == "int4":
        return dequantize_int4(parts["qweight"], parts["scale"], parts["zero"], shape, group_size)
    return parts[""].float()


def _tensor_name(param: str, part: str) -> str:
    return f"{param}.{part}" if part else param


def _expected_shapes(scheme: str, shape: list[int], group_size: int) -> dict[str, tuple]:
    """Shape of each stored part of one parameter, for the loader's check."""
    if scheme == "int8":
        return {"qweight": tuple(shape), "scale": (shape[0],)}
    if scheme == "int4":
        groups = -(-shape[1] // group_size)
        return {"qweight": (shape[0], (shape[1] + 1) // 2), "scale": (shape[0], groups),
                "zero": (shape[0], groups)}
    return {"": tuple(shape)}


def _check_args(policy: str, group_size: int) -> None:
    if policy not in POLICIES:
        raise RunError(f"unknown quantization policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise RunError(f"group_size must be an even integer >= 2 (two INT4 codes per byte), got {group_size!r}")


def export_mixed(model_dir, out_dir, policy: str = "fishai", group_size: int = 128, clip_search: bool = True,
                 log=None) -> dict:
    """Quantize the HF model in model_dir per policy into out_dir (replaced atomically); returns stats."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    log = log or logging.getLogger(__name__)
    _check_args(policy, group_size)
    model_dir, out = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise RunError(f"{display_path(model_dir)} is not a model dir (no config.json)")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = model.state_dict()
    # Tied parameters (lm_head = embed_tokens) share storage: write the first name, alias the rest.
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name

    tensors, records, unknown = {}, {}, []
    by_kind: dict[str, dict] = {}
    params = 0
    for name, w in state.items():
        if name in tied:
            continue
        if not w.is_floating_point():
            raise RunError(f"{name} has dtype {w.dtype}; the mixed-precision export expects float weights")
        kind, scheme = layer_kind(name), scheme_for(name, w.shape, policy)
        if kind == "other" and w.dim() == 2:
            unknown.append(name)
        parts = _quantize(w, scheme, group_size, clip_search)
        err = (_dequantize(parts, scheme, w.shape, group_size) - w).abs()
        nbytes = 0
        for part, t in parts.items():
            tensors[_tensor_name(name, part)] = t.contiguous()
            nbytes += t.numel() * t.element_size()
        records[name] = {"kind": kind, "scheme": scheme, "shape": list(w.shape),
                         "dtype": str(w.dtype).removeprefix("torch."), "tensors": [_tensor_name(name, p) for p in parts]}
        k = by_kind.setdefault(kind, {"params": 0, "bytes": 0, "schemes": {}, "max_abs_err": 0.0, "_sum_err": 0.0})
        s = k["schemes"].setdefault(scheme, {"params": 0, "bytes": 0})
        for d in (k, s):
            d["params"] += w.numel()
            d["bytes"] += nbytes
        k["max_abs_err"] = max(k["max_abs_err"], err.max().item())
        k["_sum_err"] += err.sum().item()
        params += w.numel()
    for k in by_kind.values():
        k["mean_abs_err"] = k.pop("_sum_err") / k["params"]
    if unknown:
        log.warning("mixed export: %d 2-D weight(s) of no known layer type kept in FP16: %s",
                    len(unknown), ", ".join(unknown))

    meta = {"format": FORMAT, "policy": policy, "group_size": group_size, "clip_search": clip_search,
            "clip_ratios": list(CLIP_RATIOS) if clip_search else [1.0], "source": display_path(model_dir),
            "tied": tied, "tensors": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    old = out.parent / f".{out.name}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "forgelab": FORMAT})
        write_json(tmp / META, meta)
        for f in COPY:
            if (model_dir / f).is_file():
                shutil.copy2(model_dir / f, tmp / f)
        write_manifest(tmp)
        if out.exists():  # keep the old export until the new one is in place
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists():  # put the previous export back
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():  # if even the restore failed, the old export stays in `old` for the user
            shutil.rmtree(old, ignore_errors=True)

    qbytes = (out / WEIGHTS).stat().st_size
    stats = {"format": FORMAT, "policy": policy, "group_size": group_size, "clip_search": clip_search,
             "out_dir": display_path(out), "params": params, "quant_file_bytes": qbytes,
             "source_fp32_bytes": params * 4, "source_fp16_bytes": params * 2,
             "compression_vs_fp16": params * 2 / qbytes, "compression_vs_fp32": params * 4 / qbytes,
             "bits_per_param": qbytes * 8 / params, "tied": tied, "unknown_2d": unknown,
             "by_kind": by_kind, "seconds": time.time() - t0}
    log.info("mixed export %s (%s, g%d, clip_search=%s): %s bytes, %.2fx vs fp16 in %.1f s", display_path(out),
             policy, group_size, clip_search, f"{qbytes:,}", stats["compression_vs_fp16"], stats["seconds"])
    return stats


def _read_meta(d: Path) -> dict:
    path = d / META
    try:
        meta = read_json(path)
    except FileNotFoundError:
        raise RunError(f"{display_path(path)} is missing: {display_path(d)} is not a mixed-precision export") from None
    except ValueError as e:
        raise RunError(f"{display_path(path)} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RunError(f"{display_path(path)} must hold a JSON object")
    for key in ("format", "policy", "group_size", "tensors", "tied"):
        if key not in meta:
            raise RunError(f"{display_path(path)} has no key {key!r}")
    if meta["format"] != FORMAT:
        raise RunError(f"{display_path(path)} key 'format' is {meta['format']!r}; this loader reads {FORMAT!r}")
    return meta


def dequantize_state_dict(out_dir) -> dict[str, torch.Tensor]:
    """The float32 state dict stored in a mixed-precision export (tied names aliased, not copied)."""
    from safetensors import safe_open

    d = Path(out_dir)
    meta = _read_meta(d)
    sd = {}
    with safe_open(str(d / WEIGHTS), framework="pt") as f:
        stored = set(f.keys())
        for name, rec in meta["tensors"].items():
            try:
                scheme, shape = rec["scheme"], rec["shape"]
                parts = _expected_shapes(scheme, shape, meta["group_size"])
            except (KeyError, TypeError, IndexError):
                raise RunError(f"{display_path(d / META)}: the record of {name} is malformed") from None
            got = {}
            for part, want in parts.items():
                tname = _tensor_name(name, part)
                if tname not in stored:
                    raise RunError(f"{WEIGHTS} in {display_path(d)} has no tensor {tname} ({scheme} part of {name})")
                got[part] = f.get_tensor(tname)
                if tuple(got[part].shape) != want:
                    raise RunError(f"tensor {tname} in {display_path(d / WEIGHTS)} has shape "
                                   f"{list(got[part].shape)}, expected {list(want)}")
            sd[name] = _dequantize(got, scheme, shape, meta["group_size"])
    for alias, name in meta["tied"].items():
        if name not in sd:
            raise RunError(f"{display_path(d / META)}: {alias} is tied to {name}, which the export does not hold")
        sd[alias] = sd[name]
    return sd


def load_mixed(out_dir, dtype: torch.dtype = torch.float32):
    """A transformers model (eval mode, `dtype`) with the export's dequantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(out_dir)
    if require_intact(d, "mixed-precision export") == "no manifest":
        raise RunError(f"mixed-precision export {display_path(d)} has no {MANIFEST_NAME}; every export writes one "
                       "last, so this directory is incomplete or was not written by export_mixed")
    sd = dequantize_state_dict(d)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32)
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise RunError(f"export {display_path(d)} does not match its config: missing tensors {missing[:5]}, "
                       f"unexpected tensors {extra[:5]}")
    for name, t in sd.items():
        if t.shape != want[name].shape:
            raise RunError(f"tensor {name} in {display_path(d)} has shape {list(t.shape)}, the model expects "
                           f"{list(want[name].shape)}")
    model.load_state_dict(sd, strict=True)
    return model.to(dtype).eval()
