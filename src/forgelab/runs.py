"""Run records: every script run gets ``runs/<stage>/<run_name>/`` with the resolved config,
a log file and a summary JSON carrying a fingerprint, plus a line in ``logs/operation_log.md``
(and ``logs/error_log.md`` on failure)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import config as cfg

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_path(p: str | Path) -> Path:
    """Resolve a path relative to the project root (absolute paths pass through)."""
    p = Path(p)
    return p if p.is_absolute() else PROJECT_ROOT / p


def display_path(p: str | Path) -> str:
    """Project-relative when inside the project (records and commands read the same on every
    clone), else as given. abspath, not resolve: a venv's bin/python is a symlink to the base
    interpreter and must stay the venv's."""
    try:
        return str(Path(os.path.abspath(p)).relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def runs_dir(stage: str | None = None) -> Path:
    """runs/ (or $FORGELAB_RUNS_DIR, so tests and users can keep records elsewhere), or its
    <stage>/ folder."""
    root = project_path(os.environ.get("FORGELAB_RUNS_DIR", "runs"))
    return root / stage if stage else root


def logs_dir() -> Path:
    """logs/ (or $FORGELAB_LOGS_DIR)."""
    return project_path(os.environ.get("FORGELAB_LOGS_DIR", "logs"))


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- atomic files

def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (disk full) leaves no temp file behind
        tmp.unlink(missing_ok=True)


def tail_lines(path: str | Path, n: int, max_bytes: int = 256 * 1024) -> str | None:
    """The last n lines of a text file (None when it is missing), reading only its end: logs of
    long runs grow large."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return None
    return "\n".join(lines[-n:])


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- fingerprints

def read_metrics(path: str | Path, bad_lines: list | None = None, error: type[Exception] | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl (none when it is missing): the one reader of step
    records, for training (resume, summary) and reports alike. A torn last line (a kill
    mid-append) is skipped and appended to `bad_lines`; any other bad line raises `error`
    (default forgelab.jsonl.JsonlError) naming file:line."""
    from .jsonl import JsonlError, read_jsonl
    read = read_jsonl(path, bad="torn_tail", error=error or JsonlError, missing_ok=True)
    if bad_lines is not None:
        bad_lines.extend(read.bad)
    return read.records


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_paths(paths: list[str | Path]) -> str:
    """A content fingerprint of files (and of every file under directories), order-independent."""
    h = hashlib.sha256()
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    for f in sorted(files, key=lambda q: str(q)):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


def git_state() -> dict:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    try:
        commit = run("rev-parse", "HEAD") or None
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "torchao", "datasets",
            "tokenizers", "safetensors", "vllm", "numpy")


def package_versions(names=PACKAGES) -> dict:
    from importlib import metadata
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def hardware() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        import psutil
        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        else:
            info["gpus"] = []
    except ImportError:
        pass
    return info


def fingerprint(config_obj: Any = None, data: str | None = None, tokenizer: str | None = None) -> dict:
    fp = {"git": git_state(), "packages": package_versions(), "hardware": hardware()}
    if config_obj is not None:
        fp["config_hash"] = cfg.config_hash(config_obj)
    if data is not None:
        fp["data_fingerprint"] = data
    if tokenizer is not None:
        fp["tokenizer_fingerprint"] = tokenizer
    return fp


# ----------------------------------------------------------------------------- the run

def _append(path: Path, header: str, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(header)
        f.write(line)


class Run:
    """Context manager for one stage run.

    >>> with Run("cpt_corpus", conf, run_name="default") as run:
    ...     run.log.info("...")
    ...     run.summary.update(kept=10)
    ...     run.data_fingerprint = "..."
    The summary is written (with a fingerprint) on exit, success or failure.
    """

    def __init__(self, stage: str, config_obj: Any = None, run_name: str | None = None,
                 summary_name: str = "summary.json", runs_root: str | Path | None = None,
                 logs_root: str | Path | None = None, rank: int | None = None):
        self.stage = stage
        self.config = config_obj
        self.run_name = run_name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = (project_path(runs_root) if runs_root else runs_dir()) / stage / self.run_name
        self.logs_root = project_path(logs_root) if logs_root else logs_dir()
        self.summary_name = summary_name
        self.summary: dict = {}
        self.data_fingerprint: str | None = None
        self.tokenizer_fingerprint: str | None = None
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.log = logging.getLogger(f"forgelab.{stage}")
        self._t0 = 0.0
        self._handlers: list[logging.Handler] = []
        self.outcome: str | None = None  # set by a stage that ended early without an error ("interrupted")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def summary_path(self) -> Path:
        return self.dir / self.summary_name

    def __enter__(self) -> "Run":
        self._t0 = time.time()
        self.dir.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        log_name = "run.log" if self.is_main else f"run.rank{self.rank}.log"
        fh = logging.FileHandler(self.dir / log_name, encoding="utf-8")
        fh.setFormatter(fmt)
        self._handlers = [fh]
        if self.is_main:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(fmt)
            self._handlers.append(sh)
        root = logging.getLogger("forgelab")
        root.setLevel(logging.INFO)
        for h in self._handlers:
            root.addHandler(h)
        if self.is_main and self.config is not None:
            atomic_write_text(self.dir / "config.yaml", cfg.dump_yaml(self.config))
        self.log.info("run %s/%s -> %s", self.stage, self.run_name, self.dir)
        return self

    def write_summary(self, outcome: str = "ok", error: str | None = None) -> None:
        body = dict(self.summary)
        body.update({
            "stage": self.stage, "run_name": self.run_name, "outcome": outcome,
            "wall_seconds": round(time.time() - self._t0, 3), "finished_at": now_iso(),
            "fingerprint": fingerprint(self.config, self.data_fingerprint, self.tokenizer_fingerprint),
        })
        if error:
            body["error"] = error
        write_json(self.summary_path, body)

    def __exit__(self, exc_type, exc, tb) -> bool:
        outcome = (self.outcome or "ok") if exc_type is None else \
            ("interrupted" if exc_type is KeyboardInterrupt else "failed")
        err = None if exc is None else f"{exc_type.__name__}: {exc}"
        try:
            if self.is_main:
                try:
                    self.write_summary(outcome, err)
                    rel = os.path.relpath(self.summary_path, PROJECT_ROOT)
                    _append(self.logs_root / "operation_log.md",
                            "# Operation log\n\n| time | stage | run | outcome | summary |\n|---|---|---|---|---|\n",
                            f"| {now_iso()} | {self.stage} | {self.run_name} | {outcome} | {rel} |\n")
                    if exc_type is not None:
                        detail = "".join(traceback.format_exception(exc_type, exc, tb)[-3:]).strip()
                        _append(self.logs_root / "error_log.md", "# Error log\n\n",
                                f"## {now_iso()} {self.stage}/{self.run_name}\n\n{err}\n\n```\n{detail}\n```\n\n")
                except OSError as e:  # a full disk must not hide the run's own error
                    self.log.error("could not write the run record (%s: %s)", type(e).__name__, e)
                if exc_type is not None:
                    self.log.error("%s", err)
        finally:
            root = logging.getLogger("forgelab")
            for h in self._handlers:
                root.removeHandler(h)
                h.close()
        return False
