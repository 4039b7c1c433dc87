"""Checkpoint directories: atomic visibility, rotation and resume selection.

The Trainer writes ``checkpoint-N`` piece by piece (weights, optimizer, RNG per rank, trainer
state). Here every save goes into ``.staging-checkpoint-N/`` first and is renamed to
``checkpoint-N`` only once all ranks finished writing, so a visible ``checkpoint-N`` is always
complete. A staging dir left by a killed save is never resumed from and is removed at the
next start.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..config import ConfigError

PREFIX = "checkpoint-"
STAGING = ".staging-"
_RE = re.compile(r"^checkpoint-(\d+)$")
MARKER = "trainer_state.json"  # written last by the Trainer


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in a run dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = _RE.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def staging_dirs(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.glob(STAGING + "*") if p.is_dir()) if run_dir.is_dir() else []


def clean_staging(run_dir: str | Path) -> list[str]:
    """Remove unfinished saves (staging dirs of a killed process); returns what was removed."""
    removed = []
    for p in staging_dirs(run_dir):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def staging_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{STAGING}{PREFIX}{step}"


def publish(staging_root: Path, final: Path) -> None:
    """Move a finished save from its staging root to its final name in one rename."""
    inner = staging_root / final.name
    if final.exists():  # a save of the same step from an earlier session
        shutil.rmtree(final)
    os.replace(inner, final)
    shutil.rmtree(staging_root, ignore_errors=True)
    _fsync_dir(final.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rotate(run_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints."""
    found = complete_checkpoints(run_dir)
    removed = []
    for _, p in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def step_of(path: str | Path) -> int | None:
    m = _RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def resolve_resume(resume: str, run_dir: Path, project_path) -> tuple[Path | None, str]:
    """Turn checkpoint.resume into a checkpoint path (or None) and a sentence for the log.

    'none' -> fresh start; 'auto' -> latest complete checkpoint of this run if any; a path ->
    that checkpoint, or the latest complete one inside it when it is a run dir.
    """
    if resume in ("none", "", "false", "no"):
        return None, "fresh start (checkpoint.resume = none)"
    if resume == "auto":
        ck = latest(run_dir)
        if ck is None:
            return None, f"fresh start: checkpoint.resume = auto found no complete checkpoint in {run_dir}"
        return ck, f"resuming from {ck} (checkpoint.resume = auto: latest complete checkpoint)"
    p = project_path(resume)
    if (p / MARKER).is_file():
        return p, f"resuming from {p} (checkpoint.resume = path)"
    ck = latest(p)
    if ck is not None:
        return ck, f"resuming from {ck} (latest complete checkpoint in {p})"
    raise ConfigError(f"key 'checkpoint.resume': {p} is neither a complete checkpoint (no {MARKER}) nor a run "
                      "dir holding one")
