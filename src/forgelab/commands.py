"""`forgelab <verb>`: one command line over the lab's scripts.

Each stage verb runs its script in scripts/ as if it were called directly (its own argparse,
help and exit codes), so the scripts stay the entry points and this module only dispatches.
`train` goes through scripts/train/_launch.sh, the one place that composes training configs;
`runs` lists run records (forgelab.runindex) and `board` starts the board (forgelab.board.cli).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .runs import PROJECT_ROOT

SCRIPTS = PROJECT_ROOT / "scripts"
TRAIN_CONF = PROJECT_ROOT / "configs" / "train"
HELP = ("-h", "--help")


@dataclass(frozen=True)
class Verb:
    target: str  # a script under scripts/, or the module behind an in-package verb
    about: str
    kind: str | None = None  # config kind (forgelab.cli.SCHEMAS) whose keys --help lists


VERBS: dict[str, Verb] = {
    "env": Verb("00_check_env.py", "check Python, torch, CUDA, GPUs, memory, disk and packages", "env"),
    "download": Verb("01_download_data.py", "download the manifest's sources, verified by sha256", "manifest"),
    "corpus": Verb("02_build_cpt_corpus.py", "build the CPT corpus: normalize, filter, dedup, mix, split", "corpus"),
    "sft-data": Verb("03_build_sft_dataset.py", "build the SFT dataset in one messages schema", "sft_data"),
    "pref-data": Verb("03b_build_pref_dataset.py", "build the preference dataset (pairs and KTO labels)",
                      "pref_data"),
    "bench-slice": Verb("04_build_cpt_benchmark_slice.py", "a fixed CPT benchmark slice of packed blocks",
                        "bench_slice"),
    "tokenize": Verb("04_tokenize_cpt.py", "tokenize the CPT corpus and pack it into blocks", "tokenize_cpt"),
    "tokenize-sft": Verb("05_tokenize_sft.py", "tokenize the SFT dataset with the chat template", "tokenize_sft"),
    "train": Verb("train.py", "train: forgelab train [TRACK] [BACKEND] --task TASK [train.py args]", "train"),
    "merge": Verb("08_merge_lora.py", "merge a LoRA adapter into its base model, checked", "merge"),
    "pairs": Verb("08b_build_pairs.py", "on-policy preference pairs from the SFT model's samples", "pairs"),
    "eval": Verb("09_eval.py", "evaluate models side by side and write the eval report", "eval"),
    "serve": Verb("10_serve.py", "start, stop or list OpenAI-compatible servers", "serve"),
    "bench": Verb("11_benchmark_serving.py", "benchmark a running server", "bench_serving"),
    "report": Verb("12_report.py", "markdown reports from training run directories"),
    "export": Verb("13_export.py", "export the model to its deliverables, gated", "export"),
    "chat": Verb("chat.py", "interactive streaming chat with a served model"),
    "estimate": Verb("estimate.py", "pre-flight memory and step estimate of a training run", "train"),
    "config": Verb("config.py", "list config kinds and keys, show a resolved config"),
    "check-packing": Verb("check_packing.py", "check that packed SFT samples cannot see each other"),
    "batch-infer": Verb("batch_infer.py", "batch inference through a served model, resumable"),
    "tokenizer": Verb("train_tokenizer.py", "train a byte-level BPE tokenizer on the CPT corpus",
                      "tokenizer_train"),
    "compare-curves": Verb("compare_curves.py", "compare the loss curves of two trees of runs step by step"),
    "checkpoint-to-model": Verb("checkpoint_to_model.py", "an intermediate checkpoint of any backend as a "
                                "plain Hugging Face model directory"),
    "pipeline": Verb("run_pipeline.sh", "the main job: the whole chain on the embedded default"),
    "runs": Verb("forgelab.runindex", "list and filter run records (runs/<stage>/<run>/)"),
    "board": Verb("forgelab.board.cli", "the board: runs, curves and reports in the browser"),
}


def _usage() -> str:
    w = max(map(len, VERBS))
    lines = ["usage: forgelab <verb> [args]   (also: python -m forgelab)", "",
             "Every stage verb runs its script with the arguments given; `forgelab <verb> --help`",
             "shows the script's help and, for verbs that take a config, every key of it.", "", "verbs:"]
    for name, v in VERBS.items():
        where = v.target if v.target.startswith("forgelab.") else f"scripts/{v.target}"
        lines.append(f"  {name:{w}s}  {v.about}  [{where}]")
    lines += ["", "examples:",
              "  forgelab corpus --set mix.target=400000",
              "  forgelab train sanity ddp --task sft_lora --set steps.max_steps=3",
              "  forgelab runs --stage train --status failed",
              "  forgelab config keys train"]
    return "\n".join(lines)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return 1


def run_script(script: str, args: list[str]) -> int:
    """Run scripts/<script> in this process as `python scripts/<script> ARGS` would."""
    path = SCRIPTS / script
    saved = sys.argv
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
        return 0
    except SystemExit as e:
        return _exit_code(e)
    finally:
        sys.argv = saved
        sys.stdout.flush()


def _subprocess(cmd: list[str], env: dict | None = None) -> int:
    rc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env).returncode
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention


def _script_comment(script: str) -> str:
    """The leading comment block of a shell script: its help."""
    lines = []
    for line in (SCRIPTS / script).read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines)


def _print_keys(kind: str) -> None:
    from .config_keys import format_keys
    print(f"\nconfig keys ({kind}; set any with --set KEY=VALUE):")
    print(format_keys(kind))


# --- train -----------------------------------------------------------------------------------
def _names(d: Path) -> set[str]:
    return {p.name.removesuffix(".yaml") for p in d.glob("*.yaml") if p.name.count(".") == 1}


def train_main(args: list[str]) -> int:
    """forgelab train [TRACK] [BACKEND] --task T ...: scripts/train/_launch.sh composes the
    configs; with --config (and no track) the files given go to scripts/train.py as they are."""
    if any(a in HELP for a in args):
        print("usage: forgelab train [TRACK] [BACKEND] [--task TASK] [scripts/train.py args]\n"
              f"  TRACK: {', '.join(sorted(_names(TRAIN_CONF / 'tracks')))}\n"
              f"  BACKEND: {', '.join(sorted(_names(TRAIN_CONF / 'backends')))} (default single)\n"
              f"  TASK: {', '.join(sorted(_names(TRAIN_CONF) - {'base'}))} (default cpt)\n"
              "Without TRACK, --config FILE ... runs scripts/train.py on exactly those files.\n")
        rc = run_script("train.py", ["--help"])
        _print_keys("train")
        return rc
    env = dict(os.environ)
    env.setdefault("FORGELAB_COMMAND", shlex.join(["forgelab", "train", *args]))  # the run record's command
    env.setdefault("PYTHON", sys.executable)  # the launcher runs train.py with this interpreter
    first = args[0] if args and not args[0].startswith("-") else None
    if first is None and any(a == "--config" or a.startswith("--config=") for a in args):
        os.environ["FORGELAB_COMMAND"] = env["FORGELAB_COMMAND"]
        return run_script("train.py", args)
    if first is None or (first not in _names(TRAIN_CONF / "tracks") and first in _names(TRAIN_CONF / "backends")):
        args = ["", *args]  # no track: the task's config and the backend's only
    return _subprocess(["bash", str(SCRIPTS / "train" / "_launch.sh"), *args], env)


# --- runs ------------------------------------------------------------------------------------
def runs_main(argv: list[str]) -> int:
    from . import runindex
    p = argparse.ArgumentParser(prog="forgelab runs", description="List run records (runs/<stage>/<run>/), "
                                "newest first, with status, config hash, data fingerprint and key metrics.")
    p.add_argument("--stage", action="append", help="only runs of this stage, e.g. train (repeatable)")
    p.add_argument("--status", action="append", choices=runindex.STATUSES, help="only runs with this status "
                   "(repeatable)")
    p.add_argument("--grep", metavar="TEXT", help="name, stage, fingerprints or command contain TEXT")
    p.add_argument("--since", metavar="DATE", help="finished on or after DATE (ISO, e.g. 2026-05-01)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--root", metavar="DIR", help="runs directory (default: $FORGELAB_RUNS_DIR or runs/)")
    a = p.parse_args(argv)
    entries = runindex.filter_runs(runindex.scan(a.root), stage=a.stage, status=a.status, text=a.grep,
                                   since=a.since)
    if a.json:
        print(json.dumps([e.row() for e in entries], indent=2))
    elif entries:
        print(runindex.format_table(entries))
    else:
        print("no runs match", file=sys.stderr)
    return 0


# --- board -----------------------------------------------------------------------------------
def board_main(argv: list[str]) -> int:
    try:
        mod = importlib.import_module("forgelab.board.cli")
    except ModuleNotFoundError as e:
        if e.name not in ("forgelab.board", "forgelab.board.cli"):
            raise  # the board is there but one of its dependencies is not: say which
        print("forgelab board: the board is not available in this checkout "
              "(no module forgelab.board.cli)", file=sys.stderr)
        return 1
    return mod.main(argv) or 0


# --- dispatch --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as every shell entry point sets it
    if not argv or argv[0] in HELP:
        print(_usage())
        return 0 if argv else 2
    verb, args = argv[0], argv[1:]
    if verb not in VERBS:
        near = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f"did you mean '{near[0]}'?" if near else "see forgelab --help"
        print(f"forgelab: unknown verb '{verb}'; {hint}", file=sys.stderr)
        return 2
    v = VERBS[verb]
    if verb == "train":
        return train_main(args)
    if verb == "runs":
        return runs_main(args)
    if verb == "board":
        return board_main(args)
    if v.target.endswith(".sh"):
        if any(a in HELP for a in args):
            print(_script_comment(v.target))
            return 0
        return _subprocess(["bash", str(SCRIPTS / v.target), *args])
    rc = run_script(v.target, args)
    if v.kind and any(a in HELP for a in args):
        _print_keys(v.kind)
    return rc
