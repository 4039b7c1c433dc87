"""The index of every run record under runs/<stage>/<run>/: one row per run with its status,
date, config hash, data and tokenizer fingerprints and key metrics. `forgelab runs` prints it;
the board's runs page shows it.

A run is "running" while its directory lock is held by a live process (a training run) or its
server process is alive (a server), "ok" / "failed" / "interrupted" from its summary's
outcome once it ended, "stopped" for a server no longer running, and "incomplete" when it has
none of these (killed hard before its summary)."""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .runs import read_json, runs_dir

SUMMARY_NAMES = ("train_summary.json", "summary.json", "bench_summary.json", "serve_summary.json")
STATUSES = ("running", "ok", "failed", "interrupted", "stopped", "incomplete")

# stage -> summary keys shown as its key metrics (dotted; the first present ones), beside the
# generic fallback of top-level numbers
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "train": ("final_loss", "steps", "tokens_per_s_steady", "mfu_steady", "peak_memory_bytes"),
    "cpt_corpus": ("train", "val", "bad_records", "duplicates"),
    "sft_data": ("train", "val", "bad_records", "duplicates"),
    "pref_data": ("train", "val", "bad_records"),
    "tokenize_cpt": ("splits.*.n_blocks", "splits.*.n_tokens"),
    "tokenize_sft": ("splits.*.n_rows", "splits.*.n_samples", "splits.*.n_tokens"),
    "cpt_bench_slice": ("splits.*.n_blocks", "n_blocks"),
    "merge": ("max_abs_diff", "passed"),
    "export": ("any_refused", "refused"),
    "bench_serving": ("requests", "output_tokens_per_s", "ttft_ms_p50"),
}
MAX_METRICS = 5


@dataclass
class RunEntry:
    stage: str
    name: str
    dir: Path
    status: str
    date: str | None  # when it finished (or started, while running), ISO
    config_hash: str | None = None
    data_fingerprint: str | None = None
    tokenizer_fingerprint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    summary_path: Path | None = None
    summary: dict = field(default_factory=dict)
    command: str | None = None

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    def row(self) -> dict:
        """The flat row the runs table and `forgelab runs --json` show."""
        return {"stage": self.stage, "name": self.name, "status": self.status, "date": self.date,
                "config_hash": self.config_hash, "data_fingerprint": self.data_fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "metrics": format_metrics(self.metrics), "dir": str(self.dir)}


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str)) and not isinstance(v, bool) and (not isinstance(v, str) or len(v) <= 24)


def _expand(summary: dict, dotted: str) -> list[tuple[str, Any]]:
    """(name, value) of a dotted key; a '*' part stands for every key at that level
    ('splits.*.n_tokens' -> 'train.n_tokens', 'val.n_tokens')."""
    head, _, rest = dotted.partition(".*.")
    if not rest:
        return [(dotted, _get(summary, dotted))]
    node = _get(summary, head)
    if not isinstance(node, dict):
        return []
    return [(f"{k}.{rest}", _get(v, rest)) for k, v in node.items() if isinstance(v, dict)]


def key_metrics(stage: str, summary: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in KEY_METRICS.get(stage, ()):
        for name, v in _expand(summary, k):
            if isinstance(v, dict):  # e.g. scores: {task: value}
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                        out[f"{name}.{kk}"] = vv
            elif isinstance(v, list):
                out[name] = len(v)
            elif v is not None and (_scalar(v) or isinstance(v, bool)):
                out[name] = v
    if not out:  # any stage: its first top-level numbers
        for k, v in summary.items():
            if k != "wall_seconds" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = v
            if len(out) >= MAX_METRICS:
                break
    out = dict(list(out.items())[:MAX_METRICS])
    if "wall_seconds" in summary:
        out["wall_s"] = summary["wall_seconds"]
    return out


def format_metrics(m: dict[str, Any]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in m.items())


def _lock_alive(run_dir: Path) -> bool:
    lock = run_dir / ".lock"
    if not lock.exists():
        return False
    try:
        from .runlock import _alive
        return _alive(json.loads(lock.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def _server_alive(run_dir: Path) -> bool:
    state = run_dir / "server.json"
    if not state.exists():
        return False
    try:
        from .serve.server import is_alive
        s = read_json(state)
        return s.get("status") == "running" and is_alive(s)
    except (OSError, ValueError):
        return False


def _mtime_iso(p: Path) -> str:
    return _dt.datetime.fromtimestamp(p.stat().st_mtime).astimezone().isoformat(timespec="seconds")


def read_entry(run_dir: Path, stage: str | None = None) -> RunEntry:
    """One run directory's row. A summary that cannot be parsed makes the run 'incomplete' with
    the reason as its metric, not a crash of the whole listing."""
    stage = stage or run_dir.parent.name
    summary_path = next((run_dir / n for n in SUMMARY_NAMES if (run_dir / n).is_file()), None)
    summary: dict = {}
    note = None
    if summary_path is not None:
        try:
            summary = read_json(summary_path)
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            note, summary = f"unreadable {summary_path.name}: {e}", {}
    running = _lock_alive(run_dir) or _server_alive(run_dir)
    if running:
        status = "running"
    elif summary.get("outcome") in ("ok", "failed", "interrupted"):
        status = summary["outcome"]
    elif (run_dir / "server.json").is_file():  # a server that was stopped (or died) leaves its state file
        status = "stopped"
    else:
        status = "incomplete"
    fp = summary.get("fingerprint") or {}
    date = summary.get("finished_at") if not running else None
    if date is None:
        date = _mtime_iso(run_dir)
    metrics = key_metrics(stage, summary)
    if note:
        metrics = {"error": note}
    return RunEntry(stage=stage, name=run_dir.name, dir=run_dir, status=status, date=date,
                    config_hash=fp.get("config_hash"),
                    data_fingerprint=fp.get("data_fingerprint") or _get(summary, "data.data_fingerprint"),
                    tokenizer_fingerprint=fp.get("tokenizer_fingerprint") or summary.get("tokenizer_fingerprint"),
                    metrics=metrics, summary_path=summary_path, summary=summary,
                    command=summary.get("command"))


def _when(iso: str | None) -> float:
    """An ISO date or time as a timestamp, so records written under different UTC offsets
    sort and filter in true order (a date without an offset is local time)."""
    if not iso:
        return 0.0
    try:
        t = _dt.datetime.fromisoformat(iso)
    except ValueError:
        return 0.0
    return (t if t.tzinfo else t.astimezone()).timestamp()


def _is_run_dir(d: Path) -> bool:
    return d.is_dir() and not d.name.startswith(".") and any(
        (d / n).exists() for n in (*SUMMARY_NAMES, "config.yaml", "run.log", "server.json", "metrics.jsonl"))


def scan(root: str | Path | None = None) -> list[RunEntry]:
    """Every run under runs/ (or `root`), newest first."""
    root = Path(root) if root else runs_dir()
    entries = []
    if root.is_dir():
        for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for d in sorted(stage_dir.iterdir()):
                if _is_run_dir(d):
                    entries.append(read_entry(d, stage_dir.name))
    entries.sort(key=lambda e: _when(e.date), reverse=True)
    return entries


def filter_runs(entries: Iterable[RunEntry], stage: str | Iterable[str] | None = None,
                status: str | Iterable[str] | None = None, text: str | None = None,
                since: str | None = None) -> list[RunEntry]:
    """Runs of the stage(s) and status(es) given, whose name, stage, fingerprints or command
    contain `text` (case-insensitive), finished on or after `since` (an ISO date prefix)."""
    stages = {stage} if isinstance(stage, str) else set(stage or ())
    statuses = {status} if isinstance(status, str) else set(status or ())
    needle = (text or "").lower().strip()
    out = []
    for e in entries:
        if stages and e.stage not in stages:
            continue
        if statuses and e.status not in statuses:
            continue
        if since and _when(e.date) < _when(since):
            continue
        if needle and needle not in " ".join(str(x) for x in (e.stage, e.name, e.config_hash, e.data_fingerprint,
                                                              e.tokenizer_fingerprint, e.command) if x).lower():
            continue
        out.append(e)
    return out


def find(key: str, root: str | Path | None = None) -> RunEntry:
    """A run by 'stage/name'."""
    stage, _, name = key.partition("/")
    d = (Path(root) if root else runs_dir()) / stage / name
    if not name or not d.is_dir():
        raise FileNotFoundError(f"no run {key!r} under {Path(root) if root else runs_dir()}")
    return read_entry(d, stage)


def format_table(entries: list[RunEntry]) -> str:
    """A plain-text table for the terminal."""
    cols = ("stage", "name", "status", "date", "config_hash", "data_fingerprint", "metrics")
    heads = ("stage", "name", "status", "date", "config", "data", "metrics")
    rows = []
    for e in entries:
        r = e.row()
        r["date"] = (r["date"] or "")[:19].replace("T", " ")
        r["config_hash"] = (r["config_hash"] or "-")[:10]
        r["data_fingerprint"] = (r["data_fingerprint"] or "-")[:10]
        rows.append([str(r[c]) for c in cols])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    widths[-1] = len(heads[-1])  # the last column is not padded
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(r) for r in rows])
