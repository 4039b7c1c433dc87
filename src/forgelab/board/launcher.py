"""Starting stages from the board: a launch is checked with the config system first (the same
files and overrides the command will compose, errors shown before anything starts), then run
as a detached process in its own session, so it outlives the board and a Ctrl-C in the
board's terminal does not reach it. Each launch is recorded in runs/.board/launches/<id>/
(launch.json and the process's output.log), so a restarted board finds it again; stop sends
SIGTERM to the process group (training saves a checkpoint on it), then SIGKILL after a grace."""
from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as cfg
from ..cli import schema
from ..runs import PROJECT_ROOT, now_iso, read_json, runs_dir, write_json
from ..serve import server

# stage -> (script, config kind, default config, run-record stage)
STAGES: dict[str, tuple[str, str, str, str]] = {
    "corpus": ("scripts/02_build_cpt_corpus.py", "corpus", "configs/data/corpus.yaml", "cpt_corpus"),
    "sft-data": ("scripts/03_build_sft_dataset.py", "sft_data", "configs/data/sft.yaml", "sft_data"),
    "tokenize": ("scripts/04_tokenize_cpt.py", "tokenize_cpt", "configs/data/tokenize_cpt.yaml", "tokenize_cpt"),
    "tokenize-sft": ("scripts/05_tokenize_sft.py", "tokenize_sft", "configs/data/tokenize_sft.yaml", "tokenize_sft"),
    "merge": ("scripts/08_merge_lora.py", "merge", "configs/merge.yaml", "merge"),
    "eval": ("scripts/09_eval.py", "eval", "configs/eval/default.yaml", "eval"),
    "export": ("scripts/13_export.py", "export", "configs/export.yaml", "export"),
}
TRAIN_CONF = PROJECT_ROOT / "configs" / "train"
LAUNCH_SH = PROJECT_ROOT / "scripts" / "train" / "_launch.sh"


class LaunchError(ValueError):
    """The launch was refused before it started; the message is the config system's."""


def launches_dir() -> Path:
    return runs_dir() / ".board" / "launches"


def train_choices() -> dict[str, list[str]]:
    """Tasks, tracks and backends the training launcher knows (its config files)."""
    names = lambda d: sorted(p.stem for p in d.glob("*.yaml") if "." not in p.stem)  # noqa: E731
    return {"task": [t for t in names(TRAIN_CONF) if t != "base"],
            "track": names(TRAIN_CONF / "tracks"), "backend": names(TRAIN_CONF / "backends")}


def parse_overrides(text: str) -> list[str]:
    """One KEY=VALUE per line (blank lines and # comments skipped)."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise LaunchError(f"override line {i}: {line!r} is not KEY=VALUE")
        out.append(line)
    return out


@dataclass
class Spec:
    stage: str                      # "train" or a key of STAGES
    overrides: list[str] = field(default_factory=list)
    run_name: str = ""
    task: str = "cpt"               # train only
    track: str = "sanity"
    backend: str = "single"
    configs: list[str] = field(default_factory=list)  # non-train: config files (default: the stage's)

    def record_stage(self) -> str:
        return "train" if self.stage == "train" else STAGES[self.stage][3]


def _train_files(spec: Spec) -> list[Path]:
    """The files scripts/train/_launch.sh composes for this task/track/backend (it is the one
    place that knows the rule; asked with --print-configs)."""
    p = subprocess.run(["bash", str(LAUNCH_SH), spec.track, spec.backend, "--task", spec.task, "--print-configs"],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise LaunchError(p.stderr.strip() or f"the launcher refused (exit {p.returncode})")
    return [Path(x) for x in p.stdout.split()]


def check(spec: Spec):
    """Compose the config the launch would run with; LaunchError with the config system's
    message (file, key, suggestion) when it is not valid. Returns the resolved config."""
    if spec.stage == "train":
        files, kind = _train_files(spec), "train"
    elif spec.stage in STAGES:
        script, kind, default, _ = STAGES[spec.stage]
        files = [PROJECT_ROOT / c for c in (spec.configs or [default])]
    else:
        raise LaunchError(f"unknown stage {spec.stage!r}; stages: train, {', '.join(STAGES)}")
    if spec.run_name and ("/" in spec.run_name or spec.run_name.startswith(".")):
        raise LaunchError(f"run name {spec.run_name!r}: no '/' and no leading '.'")
    try:
        return cfg.load(schema(kind), files, spec.overrides)
    except cfg.ConfigError as e:
        raise LaunchError(f"config error: {e}") from None


def command(spec: Spec) -> list[str]:
    sets = [a for o in spec.overrides for a in ("--set", o)]
    name = ["--run-name", spec.run_name] if spec.run_name else []
    if spec.stage == "train":
        return ["bash", str(LAUNCH_SH), spec.track, spec.backend, "--task", spec.task, *name, *sets]
    script, _, default, _ = STAGES[spec.stage]
    confs = [a for c in (spec.configs or [default]) for a in ("--config", c)]
    return [sys.executable, str(PROJECT_ROOT / script), *confs, *name, *sets]


def start(spec: Spec) -> dict:
    """Check, then start detached; returns the launch record."""
    check(spec)
    if not spec.run_name:
        spec.run_name = "board-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    argv = command(spec)
    lid = f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{spec.record_stage()}-{spec.run_name}"
    d = launches_dir() / lid
    d.mkdir(parents=True, exist_ok=True)
    log = d / "output.log"
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["FORGELAB_COMMAND"] = shlex.join(argv) + "  # started from the board"
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    rec = {"id": lid, "pid": proc.pid, "pgid": proc.pid, "create_time": server.proc_start_time(proc.pid),
           "command": argv, "run": f"{spec.record_stage()}/{spec.run_name}", "log": str(log),
           "started_at": now_iso(), "spec": spec.__dict__}
    write_json(d / "launch.json", rec)
    _children[proc.pid] = proc  # reaped by status(), so a finished launch is not a zombie
    return rec


_children: dict[int, subprocess.Popen] = {}


def _alive(rec: dict) -> bool:
    """Is the launch's leader still the process it started? (A child this board started is
    polled first, which also reaps it.) The same test as for the lab's servers."""
    child = _children.get(rec["pid"])
    if child is not None and child.poll() is not None:
        return False
    return server.is_alive(rec)


def status(rec: dict) -> str:
    """running, or how it ended: the exit code when this board started it, else 'ended'."""
    if _alive(rec):
        return "running"
    child = _children.get(rec["pid"])
    if child is not None and child.returncode is not None:
        return f"exited {child.returncode}"
    return "ended"


def load(lid: str) -> dict:
    p = launches_dir() / lid / "launch.json"
    if not p.is_file():
        raise LaunchError(f"no launch {lid!r} under {launches_dir()}")
    return read_json(p)


def recorded() -> list[dict]:
    """Every recorded launch, newest first."""
    d = launches_dir()
    out = [read_json(p) for p in d.glob("*/launch.json")] if d.is_dir() else []
    return sorted(out, key=lambda r: r["id"], reverse=True)


def stop(lid: str, grace_s: float = 150.0, wait: bool = True) -> str:
    """SIGTERM to the launch's process group (every rank torchrun started), SIGKILL if any of it
    is still there after grace_s, as the lab's servers are stopped. With wait=False it returns
    at once and the escalation happens in the background."""
    rec = load(lid)
    if not _alive(rec):
        return f"{lid}: not running ({status(rec)})"
    if wait:
        t0 = time.time()
        server.kill_group(rec["pgid"], grace_s)
        return f"{lid}: stopped after {time.time() - t0:.1f} s"
    import threading
    threading.Thread(target=server.kill_group, args=(rec["pgid"], grace_s), daemon=True).start()
    return f"{lid}: SIGTERM sent (a training run saves a checkpoint first; SIGKILL after {grace_s:.0f} s)"
