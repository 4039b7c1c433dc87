"""File manifests: what a directory held when it was written (each file's size and sha256), so
a corrupt or truncated copy is detected before it is used.

A checkpoint gets its manifest after every rank has written and before the rename that
publishes it; final/ gets one too. `verify` compares a directory with its manifest: missing
files, changed sizes, changed contents. With `hash="size"` only sizes are recorded (a fast
check that catches truncation, not bit flips)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

NAME = "forgelab_manifest.json"
_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != NAME and not p.name.startswith(f".{NAME}"))


def write_manifest(d: str | Path, hash: str = "sha256") -> dict:  # noqa: A002 - the manifest's own word
    """Record every file under d (relative path, bytes, sha256 unless hash='size'); atomic."""
    d = Path(d)
    files = {}
    for p in _files(d):
        rec = {"bytes": p.stat().st_size}
        if hash == "sha256":
            rec["sha256"] = _sha256(p)
        files[str(p.relative_to(d))] = rec
    body = {"format": "forgelab-manifest-1", "hash": hash, "files": files}
    tmp = d / f".{NAME}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / NAME)
    finally:
        tmp.unlink(missing_ok=True)
    return body


def verify(d: str | Path) -> tuple[str, list[str]]:
    """('ok' | 'bad' | 'none', problems): 'none' when d has no manifest (written before
    manifests existed, or by another tool); 'bad' lists each file that does not match."""
    d = Path(d)
    mp = d / NAME
    if not mp.is_file():
        return "none", []
    try:
        body = json.loads(mp.read_text(encoding="utf-8"))
        files = body["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return "bad", [f"{NAME} is unreadable ({type(e).__name__}: {e})"]
    if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
        return "bad", [f"{NAME} is malformed: 'files' must map each file to its record"]
    problems = []
    for rel, rec in files.items():
        p = d / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = p.stat().st_size
        if size != rec.get("bytes"):
            problems.append(f"{rel} has {size:,} bytes, the manifest says {rec.get('bytes'):,}")
        elif rec.get("sha256") and _sha256(p) != rec["sha256"]:
            problems.append(f"{rel} has other contents than when it was saved (sha256 differs)")
    return ("bad" if problems else "ok"), problems


def require_intact(d: str | Path, what: str) -> str:
    """Refuse a model directory that does not match its manifest (RunError naming the files);
    returns how it was checked, for the log."""
    from .config import RunError
    status, problems = verify(d)
    if status == "bad":
        raise RunError(f"{what} {d} does not match its {NAME}: {'; '.join(problems)}; it is corrupt or was "
                       "changed after it was saved")
    return "verified against its manifest" if status == "ok" else "no manifest"
