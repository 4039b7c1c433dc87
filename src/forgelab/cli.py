"""Shared command-line plumbing for the numbered scripts: --config / --set / --run-name,
config errors as clean messages (exit 2), and the config-kind registry."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable

from . import config as cfg

# kind -> "module:Class". One place that knows every config schema.
SCHEMAS = {
    "env": "forgelab.envcheck:EnvCheckConfig",
    "manifest": "forgelab.data.download:ManifestConfig",
    "corpus": "forgelab.data.corpus:CorpusConfig",
    "sft_data": "forgelab.data.sft_dataset:SFTDataConfig",
    "pref_data": "forgelab.data.pref_dataset:PrefDataConfig",
    "tokenize_cpt": "forgelab.data.tokenize_cpt:TokenizeCPTConfig",
    "bench_slice": "forgelab.data.bench_slice:BenchSliceConfig",
    "tokenize_sft": "forgelab.data.tokenize_sft:TokenizeSFTConfig",
    "tokenizer_train": "forgelab.model.tokenizer_train:TokenizerTrainConfig",
    "train": "forgelab.train.config:TrainConfig",
    "merge": "forgelab.train.merge:MergeConfig",
    "eval": "forgelab.eval.config:EvalConfig",
    "serve": "forgelab.serve.config:ServeConfig",
    "bench_serving": "forgelab.serve.bench_config:BenchServingConfig",
    "pairs": "forgelab.align.pairs:PairsConfig",
    "export": "forgelab.export.config:ExportConfig",
}


def schema(kind: str) -> type:
    try:
        mod, cls = SCHEMAS[kind].split(":")
    except KeyError:
        raise cfg.ConfigError(f"unknown config kind {kind!r}; kinds: {', '.join(SCHEMAS)}") from None
    return getattr(importlib.import_module(mod), cls)


def parser(description: str, default_config: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None, metavar="YAML",
                   help=f"config file(s), composed in order (default: {default_config})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config key, e.g. --set seed=3 (repeatable)")
    p.add_argument("--run-name", default=None, help="run directory name under runs/<stage>/")
    p.set_defaults(_default_config=default_config)
    return p


def load_config(schema_cls: type, args: argparse.Namespace) -> Any:
    paths = args.config or ([args._default_config] if args._default_config else [])
    from .runs import project_path
    return cfg.load(schema_cls, [project_path(p) for p in paths], args.overrides)


def command_line(env_keys: tuple[str, ...] = ("OMP_NUM_THREADS",)) -> str:
    """The command as typed from the project root (with the environment that shapes its numbers),
    for the record next to every number."""
    import os
    import shlex
    from .runs import PROJECT_ROOT, project_path
    script = sys.argv[0]
    try:
        script = str(project_path(script).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        pass
    env = " ".join(f"{k}={os.environ[k]}" for k in env_keys if k in os.environ)
    return (env + " " if env else "") + shlex.join(["python", script] + sys.argv[1:])


def interrupt_on_sigterm() -> None:
    """SIGTERM (a kill, a scheduler's stop) unwinds like Ctrl-C, so with-blocks run their cleanup:
    servers a stage started are stopped, partial files are not published."""
    import signal

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _raise)


def run_main(fn: Callable[[], int | None]) -> None:
    """Run a script's main; config errors become one clear line and exit code 2."""
    try:
        rc = fn()
    except cfg.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except cfg.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)
