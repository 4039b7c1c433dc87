"""A run directory lock: one process (tree) per run directory at a time.

The lock is a file ``<run dir>/.lock`` created with O_EXCL, holding the owner's pid, host,
process start time and command. A second launch with the same run name refuses to start and
names the holder. A lock whose process is gone (same host, pid not running, or a new process
under a reused pid) is stale and taken over, with a notice. Processes of the same run (the
ranks torchrun or DeepSpeed start for the driver that holds the lock) see ``HELD_ENV`` and
do not lock again.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .config import RunError

NAME = ".lock"
HELD_ENV = "FORGELAB_RUN_LOCKS"  # os.pathsep-separated run dirs locked by an ancestor process


class RunLockError(RunError):
    """The run directory is in use by another process."""


def _started(pid: int) -> float | None:
    try:
        import psutil
        return psutil.Process(pid).create_time()
    except Exception:  # no such process (or psutil missing: then pid liveness only)
        return None


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _started(pid)
    # a pid reused by a later process is not the owner
    return started is None or owner.get("started") is None or abs(started - float(owner["started"])) < 1.0


def held_by_ancestor(run_dir: Path) -> bool:
    return str(Path(run_dir).resolve()) in os.environ.get(HELD_ENV, "").split(os.pathsep)


class RunLock:
    def __init__(self, run_dir: str | Path, command: str | None = None):
        self.dir = Path(run_dir)
        self.path = self.dir / NAME
        self.command = command
        self.held = False
        self.created_dir = False  # the lock made the run dir: removed again if nothing else was written
        self.notice: str | None = None  # set when a stale lock was taken over

    def acquire(self) -> "RunLock":
        if held_by_ancestor(self.dir):
            return self
        self.created_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _started(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": self.command}
        for _ in range(12):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None and time.time() - self._mtime() < 5:
                    time.sleep(0.5)  # its writer may still be between create and write
                    continue
                if owner is None or (owner.get("host") == me["host"] and not _alive(owner)):
                    self.notice = (f"took over the stale lock {self.path} of pid {(owner or {}).get('pid')} "
                                   f"(started {(owner or {}).get('since')}; that process is gone)")
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockError(
                    f"run dir {self.dir} is in use by pid {owner.get('pid')} on {owner.get('host')} since "
                    f"{owner.get('since')} ({owner.get('command') or 'command unknown'}); wait for it, pick another "
                    f"--run-name, or delete {self.path} if that process is gone") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            os.environ[HELD_ENV] = os.pathsep.join(
                [p for p in os.environ.get(HELD_ENV, "").split(os.pathsep) if p] + [str(self.dir.resolve())])
            return self
        raise RunLockError(f"could not take the lock {self.path}")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable: a writer killed between create and write

    def release(self) -> None:
        if not self.held:
            return
        owner = self._owner()
        if owner is not None and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            try:
                self.dir.rmdir()  # only when empty: a run refused before it wrote anything leaves no dir
            except OSError:
                pass
        mine = str(self.dir.resolve())
        os.environ[HELD_ENV] = os.pathsep.join(p for p in os.environ.get(HELD_ENV, "").split(os.pathsep)
                                               if p and p != mine)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
