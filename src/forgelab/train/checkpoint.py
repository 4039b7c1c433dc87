"""Checkpoint directories: atomic visibility, rotation and resume selection.

The Trainer writes ``checkpoint-N`` piece by piece (weights, optimizer, RNG per rank, trainer
state). Here every save goes into ``.staging-checkpoint-N/`` first and is renamed to
``checkpoint-N`` only once all ranks finished writing, so a visible ``checkpoint-N`` is always
complete. A staging dir left by a killed save is never resumed from and is removed at the
next start.

Before the rename, the save's files are recorded in a manifest (forgelab.manifest: sizes and
sha256); resuming verifies it, and ``auto`` falls back to the newest checkpoint that verifies.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .. import manifest
from ..config import ConfigError, RunError

PREFIX = "checkpoint-"
STAGING = ".staging-"
_RE = re.compile(r"^checkpoint-(\d+)$")
MARKER = "trainer_state.json"  # written last by the Trainer
VERIFIED_ENV = "FORGELAB_VERIFIED_CHECKPOINT"  # set by the driver: its workers need not hash it again


class CheckpointError(RunError):
    """A save that could not complete (disk full, I/O error); the message says what is intact."""


def save_failure(target: Path, e: BaseException) -> str:
    """One sentence for a save that failed: why, the free space, and what is still intact.
    Called before the unfinished save is removed, so the free space is the failure's own (torch's
    writer reports a full disk as 'unexpected pos', without ENOSPC)."""
    import errno
    run_dir = target.parent
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    try:
        free_b = shutil.disk_usage(run_dir).free
        free = f"{free_b / 2**20:,.0f} MiB free on {run_dir}"
    except OSError:
        free_b, free = None, f"free space of {run_dir} unknown"
    full = isinstance(cause, OSError) and cause.errno == errno.ENOSPC or "No space left" in str(e) \
        or (free_b is not None and free_b < 16 * 2**20)
    why = "the disk is full (no space left on device)" if full else f"{type(e).__name__}: {str(e)[:300]}"
    intact = [p.name for _, p in complete_checkpoints(run_dir)]
    return (f"{target.name} could not be saved: {why} ({free}); the unfinished save was removed, "
            + (f"{', '.join(intact)} intact" if intact else "no earlier checkpoint exists"))


def check(path: Path) -> tuple[bool, str]:
    """(usable, why): a checkpoint is usable when it matches its manifest or has none (saved
    before manifests existed: said so)."""
    if os.environ.get(VERIFIED_ENV) == str(path):
        return True, "verified by the launching process"
    status, problems = manifest.verify(path)
    if status == "bad":
        return False, "; ".join(problems)
    return True, "verified against its manifest" if status == "ok" else f"no {manifest.NAME}, not verified"


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

    'none' -> fresh start; 'auto' -> the newest complete checkpoint of this run that verifies
    (corrupt ones are skipped and named); a path -> that checkpoint, or the newest complete one
    inside it when it is a run dir, which must verify.
    """
    if resume in ("none", "", "false", "no"):
        return None, "fresh start (checkpoint.resume = none)"
    if resume == "auto":
        skipped = []
        for _, ck in reversed(complete_checkpoints(run_dir)):
            ok, why = check(ck)
            if ok:
                return ck, (f"resuming from {ck} (checkpoint.resume = auto: latest complete checkpoint, {why})"
                            + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
            skipped.append(f"{ck.name} ({why})")
        if skipped:
            raise ConfigError(f"key 'checkpoint.resume': auto found no checkpoint in {run_dir} that matches its "
                              f"manifest: {'; '.join(skipped)}; start over with checkpoint.resume=none and "
                              "checkpoint.overwrite=true, or point checkpoint.resume at a good copy")
        return None, f"fresh start: checkpoint.resume = auto found no complete checkpoint in {run_dir}"
    p = project_path(resume)
    ck = p if (p / MARKER).is_file() else latest(p)
    if ck is None:
        raise ConfigError(f"key 'checkpoint.resume': {p} is neither a complete checkpoint (no {MARKER}) nor a "
                          "run dir holding one")
    ok, why = check(ck)
    if not ok:
        raise ConfigError(f"key 'checkpoint.resume': {ck} does not match its manifest: {why}")
    where = "checkpoint.resume = path" if ck == p else f"latest complete checkpoint in {p}"
    return ck, f"resuming from {ck} ({where}, {why})"
