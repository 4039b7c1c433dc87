"""Plug-in components: a user's own loss, metric, preprocessor, filter, chat template or reward,
named in YAML by a dotted path and loaded without editing the lab.

A path is ``module:attr`` (a module importable from ``sys.path`` or the project root, e.g.
``my_losses:focal_loss`` or ``examples.components.losses:focal_loss``) or
``path/to/file.py:attr`` (a file, relative to the project root unless absolute). ``attr`` may
be dotted (``module:Class.method``). ``module.attr`` without a colon is read as module + attr.

:func:`load_component` imports the object and checks it against its kind's signature (the
registry :data:`KINDS` below) with :func:`inspect.signature`, so a wrong path or signature is a
:class:`~forgelab.config.ConfigError` naming the YAML key, the path and the expected signature,
raised when the config is validated: before any data or model loads. This module imports
only the standard library and forgelab's config and run-path helpers.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError
from .runs import PROJECT_ROOT, project_path


class ComponentError(ValueError):
    """A loaded component misbehaved at run time (wrong return type or length)."""


@dataclass(frozen=True)
class Kind:
    name: str
    signature: str                     # shown in errors, docs and `describe()`
    doc: str                           # what the stage passes and expects back
    args: int = 0                      # positional arguments the stage passes
    kwargs: tuple[str, ...] = ()       # keyword arguments the stage passes
    var_kwargs: bool = False           # must accept **kwargs (more keywords may come)
    value: bool = False                # a value (str) or a zero-argument callable returning one


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("loss", "loss(outputs, labels, num_items_in_batch=None) -> torch scalar",
         "Training loss, as transformers' Trainer calls `compute_loss_func`: `outputs` is the "
         "model output (`outputs.logits` [batch, seq, vocab], unshifted), `labels` [batch, seq] "
         "with -100 on positions that are not learned (unshifted: shift them yourself), "
         "`num_items_in_batch` the number of labelled tokens over the whole accumulated batch "
         "(or None): divide a summed loss by it, else return a mean.",
         args=2, kwargs=("num_items_in_batch",)),
    Kind("metric", "metric(prediction: str, reference: str) -> float",
         "Eval generation tasks (math): `prediction` is the model's whole response text, "
         "`reference` the gold answer (canonical number, e.g. '42' or '1/3'); the mean over "
         "the scored problems is reported next to exact match.",
         args=2),
    Kind("preprocessor", "preprocess(record: dict) -> dict | None",
         "SFT dataset stage (03): called on each raw record of a source before format "
         "conversion; return the (possibly changed) record, or None to drop it (counted per "
         "source under the preprocessor's name).",
         args=1),
    Kind("filter", "keep(record: dict) -> bool",
         "CPT corpus stage (02): `record` is a normalized document {id, source, lang, text} "
         "that passed the built-in filters; SFT dataset stage (03): a converted conversation "
         "{id, source, messages[, tools]}. False drops it, counted under the filter's name.",
         args=1),
    Kind("chat_template", "a Jinja chat template str, or template() -> str",
         "SFT tokenization (05): set on the tokenizer before tokenizing; its text is recorded "
         "in the store's meta.json and in the tokenizer fingerprint, so training, eval and "
         "serving use the same template.",
         value=True),
    Kind("reward", "reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]",
         "TRL's reward-function convention (GRPOTrainer `reward_funcs`): keyword arguments "
         "`prompts` and `completions` (standard text format) plus every other dataset column "
         "as a list (so it must take **kwargs); one float per completion, None where it does "
         "not apply. The eval math task passes `answer` (gold, canonical) and `question`, and "
         "reports the mean.",
         kwargs=("prompts", "completions"), var_kwargs=True),
)}


def describe() -> str:
    """Every kind with its signature and meaning (for docs and `--help` texts)."""
    return "\n".join(f"{k.name}: {k.signature}\n    {k.doc}" for k in KINDS.values())


def component_name(spec: str) -> str:
    """The short name of a component in summaries and reports: its attribute name."""
    return split_spec(spec)[1].rsplit(".", 1)[-1]


def split_spec(spec: str) -> tuple[str, str]:
    """'module:attr' or 'path/file.py:attr' (or 'module.attr') -> (module or file, attr)."""
    spec = spec.strip()
    if ":" in spec:
        where, attr = spec.rsplit(":", 1)
    elif "." in spec and not spec.endswith(".py"):
        where, attr = spec.rsplit(".", 1)
    else:
        where, attr = spec, ""
    return where.strip(), attr.strip()


# ----------------------------------------------------------------------------- importing

_FILE_MODULES: dict[Path, Any] = {}


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _raised(e: BaseException) -> str:
    """The exception and the last frame in user code, e.g. "ZeroDivisionError: ... (at f.py:3)"."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"SyntaxError: {e.msg} (at {e.filename}:{e.lineno})"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "importlib" not in f.filename]
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{at}"


def _import_file(where: str, fail: Callable[[str], ConfigError]) -> Any:
    path = project_path(where).resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise fail(f"file {path} not found (a file path is relative to the project root {PROJECT_ROOT})")
    name = f"forgelab_component_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise fail(f"{path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so dataclasses, pickling and tracebacks find it
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001 - user code: any failure is a config error
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise fail(f"importing {path} raised {_raised(e)}") from e
    _FILE_MODULES[path] = module
    return module


def _import_module(where: str, fail: Callable[[str], ConfigError]) -> Any:
    root = str(PROJECT_ROOT)
    if root not in sys.path:
        sys.path.append(root)  # after everything else: a project module never shadows a package
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name and (where == e.name or where.startswith(e.name + ".")):
            raise fail(f"module {e.name!r} not found (searched sys.path and the project root "
                       f"{PROJECT_ROOT}; or give a file: path/to/file.py:name)") from None
        raise fail(f"importing {where} raised {_raised(e)}") from e
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        raise fail(f"importing {where} raised {_raised(e)}") from e


# ----------------------------------------------------------------------------- checking

def _call_shape(kind: Kind, provides: tuple[str, ...] = ()) -> str:
    parts = [f"<{i + 1}>" for i in range(kind.args)] + [f"{k}=..." for k in kind.kwargs + provides]
    if kind.var_kwargs:
        parts.append("<other>=...")
    return f"f({', '.join(parts)})"


def _check_callable(obj: Any, kind: Kind, provides: tuple[str, ...] = ()) -> str | None:
    """Why the stage cannot call obj the way it does, or None."""
    if isinstance(obj, type):
        return f"it is a class ({obj.__name__}); name a function or an instance with __call__"
    if not callable(obj):
        return f"it is not callable (an object of type {type(obj).__name__})"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None  # no signature to read (some builtins): accepted unchecked
    try:
        sig.bind(*([None] * kind.args), **{k: None for k in kind.kwargs + provides})
    except TypeError as e:
        return f"its signature {sig} cannot be called as {_call_shape(kind, provides)}: {e}"
    if kind.var_kwargs and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return (f"its signature {sig} takes no **kwargs, but the caller passes more keyword "
                f"arguments (every dataset column)")
    return None


def _check_template(text: Any) -> str | None:
    if not isinstance(text, str):
        return f"it is not a str (an object of type {type(text).__name__})"
    if not text.strip():
        return "it is an empty string"
    try:
        import jinja2  # transformers renders chat templates with jinja2; checked when present
    except ImportError:
        return None
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        return f"not a valid Jinja template: {e.message} (template line {e.lineno})"
    return None


def load_component(kind: str, spec: str, key: str, provides: tuple[str, ...] = ()) -> Any:
    """Import the component at ``spec`` (YAML key ``key``) and check it against ``kind``.

    ``provides``: keyword arguments this caller passes besides the kind's own (e.g. the
    dataset columns a reward is given), so a function that requires one of them is accepted
    and one that requires anything else is refused. Returns the callable; for
    ``chat_template`` the template text (calling a zero-argument function when the path names
    one). Every failure is a ConfigError that names the key, the path and the expected
    signature.
    """
    try:
        k = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}") from None
    provides = tuple(provides)
    given = f" (given {', '.join(f'{p}=' for p in provides)} too)" if provides else ""

    def fail(why: str) -> ConfigError:
        return ConfigError(f"key '{key}': {kind} {spec!r}: {why}; expected {k.signature}{given}")

    if not isinstance(spec, str) or not spec.strip():
        raise fail("empty path (write module:name or path/to/file.py:name)")
    where, attr = split_spec(spec)
    if not where or not attr:
        raise fail("not a dotted path (write module:name or path/to/file.py:name)")
    module = _import_file(where, fail) if _is_file_spec(where) else _import_module(where, fail)
    obj = module
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = where if i == 0 else ".".join(attr.split(".")[:i])
            names = sorted(n for n in dir(obj) if not n.startswith("_"))[:12]
            raise fail(f"{owner} has no attribute {part!r} (it has: {', '.join(names) or 'nothing public'})") \
                from None
    if k.value:
        if callable(obj) and not isinstance(obj, str):
            problem = _check_callable(obj, k)
            if problem:
                raise fail(problem)
            try:
                obj = obj()
            except Exception as e:  # noqa: BLE001
                raise fail(f"calling it raised {_raised(e)}") from e
        problem = _check_template(obj)
    else:
        problem = _check_callable(obj, k, provides)
    if problem:
        raise fail(problem)
    return obj


def load_components(kind: str, specs: list[str], key: str, provides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a list of components (YAML key ``key``, items ``key[i]``) -> {short name: object}."""
    out: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        obj = load_component(kind, spec, f"{key}[{i}]", provides)
        name = component_name(spec)
        if name in out:
            raise ConfigError(f"key '{key}[{i}]': {kind} {spec!r}: a second {kind} named {name!r} "
                              f"(names label the results; rename one of them)")
        out[name] = obj
    return out


def source_file(spec: str) -> Path | None:
    """The Python file that defines a component's module (None for a built-in module)."""
    where, _ = split_spec(spec)
    if _is_file_spec(where):
        return project_path(where).resolve()
    module = sys.modules.get(where)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError):
            found = None
        origin = getattr(found, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def component_fingerprints(specs: list[str]) -> dict[str, str | None]:
    """{path: sha256 (16 hex) of the file defining it}: a run records which code it used, so
    results of a changed component are not mistaken for the old one's."""
    out = {}
    for spec in dict.fromkeys(specs):
        f = source_file(spec)
        out[spec] = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f else None
    return out


# ----------------------------------------------------------------------------- calling

def check_score(kind: str, name: str, value: Any, allow_none: bool = False) -> float | None:
    """A metric's or reward's value as a finite float (True/False count as 1/0)."""
    if value is None and allow_none:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ComponentError(f"{kind} {name!r} returned {value!r}; expected a number "
                             f"({KINDS[kind].signature})") from None
    if not math.isfinite(f):
        raise ComponentError(f"{kind} {name!r} returned {f}; expected a finite number")
    return f


def check_rewards(name: str, values: Any, n: int) -> list[float | None]:
    """What a reward returned for n completions: n numbers, None where it does not apply."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or len(values) != n:
        got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
        raise ComponentError(f"reward {name!r} returned {got} for {n} completions; "
                             f"expected {KINDS['reward'].signature}")
    return [check_score("reward", name, v, allow_none=True) for v in values]
