"""The training methods: one module each, found here by name.

A module of this package that defines ``METHOD`` (an instance of ``base.Method``), or
``METHODS`` (several, e.g. an alignment method's LoRA and full-weight variants), is a method;
nothing else needs editing to add one (docs/architecture.md says how). ``method_for(conf)``
is the method a training config selects; ``names()`` lists them for --task and the docs.
"""
from __future__ import annotations

import importlib
import pkgutil

from ...config import ConfigError
from .base import Method

_REGISTRY: dict[str, Method] | None = None


def registry() -> dict[str, Method]:
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, Method] = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            if info.name.startswith("_") or info.name == "base":
                continue
            mod = importlib.import_module(f"{__name__}.{info.name}")
            for m in getattr(mod, "METHODS", ()) or (getattr(mod, "METHOD", None),):
                if isinstance(m, Method):
                    found[m.name] = m
        _REGISTRY = found
    return _REGISTRY


def names() -> list[str]:
    return list(registry())


def tasks() -> list[str]:
    """The values the config's `task` key takes (sft_lora and sft_full share `sft`; dpo and
    dpo_full share `dpo`)."""
    return sorted({m.task for m in registry().values()})


def method_for(conf) -> Method:
    hits = [m for m in registry().values() if m.selects(conf)]
    if len(hits) != 1:
        raise ConfigError(f"key 'task': {conf.task!r} selects {len(hits)} methods; tasks: {', '.join(tasks())} "
                          f"(methods: {', '.join(names())})")
    return hits[0]
