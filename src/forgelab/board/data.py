"""What the board's pages show, computed from the files runs write (no UI code here): the runs
table, one run's detail, curves of runs compared under the reports' protocol rule, the
markdown reports with their images, and a live run's progress."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from .. import runindex
from ..report.runs import ReportError, check_comparable, load_run
from ..runs import read_metrics, tail_lines

LOG_NAMES = ("run.log", "server.log")
TAIL_LINES = 60
# curve panels: (title, metrics.jsonl key, scale, unit)
CURVES = (("loss", "loss", 1.0, ""), ("tokens/s", "tokens_per_s", 1.0, ""),
          ("memory", "mem_max_allocated", 2.0 ** -30, "GiB"), ("memory (RSS)", "rss", 2.0 ** -30, "GiB"))


class BoardError(ValueError):
    """A page was asked for something that is not there; the message says what."""


# ----------------------------------------------------------------------------- runs

def runs_rows(root: Path, stages: list[str] | None = None, statuses: list[str] | None = None,
              text: str = "") -> tuple[list[str], list[list[Any]], list[str]]:
    """The table's headers and rows, filtered, and every stage that has runs (one scan)."""
    every = runindex.scan(root)
    entries = runindex.filter_runs(every, stage=stages or None, status=statuses or None, text=text)
    heads = ["stage", "name", "status", "date", "config hash", "data fingerprint", "tokenizer fingerprint", "metrics"]
    rows = [[e.stage, e.name, e.status, (e.date or "")[:19].replace("T", " "), e.config_hash or "",
             e.data_fingerprint or "", e.tokenizer_fingerprint or "", runindex.format_metrics(e.metrics)]
            for e in entries]
    return heads, rows, sorted({e.stage for e in every})


def run_keys(root: Path, stage: str | None = None) -> list[str]:
    return [e.key for e in runindex.scan(root) if stage is None or e.stage == stage]


# ----------------------------------------------------------------------------- one run

def tail(path: Path, n: int = TAIL_LINES) -> str:
    return tail_lines(path, n) or ""


def metrics_of(run_dir: Path) -> list[dict]:
    """A run's step records; a bad line other than a torn last one is reported, not raised."""
    try:
        return read_metrics(run_dir / "metrics.jsonl")
    except Exception as e:  # noqa: BLE001 - the page shows why instead of failing
        raise BoardError(f"{run_dir / 'metrics.jsonl'}: {e}") from None


def detail(root: Path, key: str) -> dict:
    """The resolved config, summary, log tail and step records of run 'stage/name'."""
    try:
        e = runindex.find(key, root)
    except FileNotFoundError as err:
        raise BoardError(str(err)) from None
    conf = e.dir / "config.yaml"
    log = next((e.dir / n for n in LOG_NAMES if (e.dir / n).is_file()), None)
    conf_text = conf.read_text(encoding="utf-8") if conf.is_file() else ""
    return {"entry": e, "config": conf_text or "(no config.yaml)", "config_obj": yaml.safe_load(conf_text) or {},
            "summary": json.dumps(e.summary, indent=2, ensure_ascii=False) if e.summary else "(no summary yet)",
            "log": tail(log) if log else "(no log)", "log_path": str(log) if log else None,
            "metrics": metrics_of(e.dir) if (e.dir / "metrics.jsonl").is_file() else []}


def header(e: runindex.RunEntry) -> str:
    parts = [f"**{e.key}**", f"status **{e.status}**", e.date or ""]
    if e.config_hash:
        parts.append(f"config `{e.config_hash}`")
    if e.data_fingerprint:
        parts.append(f"data `{e.data_fingerprint}`")
    if e.tokenizer_fingerprint:
        parts.append(f"tokenizer `{e.tokenizer_fingerprint}`")
    line = " · ".join(p for p in parts if p)
    if e.command:
        line += f"\n\n`{e.command}`"
    if e.metrics:
        line += "\n\n" + runindex.format_metrics(e.metrics)
    return line


# ----------------------------------------------------------------------------- compare

def compare(root: Path, keys: list[str], allow_mixed: bool = False) -> tuple[dict[str, list[dict]], list[str]]:
    """Step records of the chosen training runs, by key, and the protocol differences (empty
    when all share one protocol). Different protocols raise ProtocolError naming the key,
    as the training reports do, unless allowed."""
    if not keys:
        raise BoardError("choose at least one training run")
    records = []
    for k in keys:
        stage, _, name = k.partition("/")
        if stage != "train":
            raise BoardError(f"{k}: only training runs have curves to compare")
        try:
            records.append(load_run(root / stage / name))
        except ReportError as e:
            raise BoardError(str(e)) from None
    diffs = check_comparable(records, allow_mixed=allow_mixed)
    return {f"train/{r.name}": r.metrics for r in records}, diffs


# ----------------------------------------------------------------------------- reports

_IMG = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
_HTML_IMG = re.compile(r"(<img\b[^>]*\bsrc=\")([^\"]+)(\")", re.I)


def reports(reports_dir: Path) -> list[str]:
    """Markdown reports, relative to reports_dir (its subfolders too), sorted."""
    if not reports_dir.is_dir():
        return []
    return sorted(str(p.relative_to(reports_dir)) for p in reports_dir.rglob("*.md"))


def render_report(reports_dir: Path, rel: str, file_url) -> str:
    """A report's markdown with its relative image links pointing at the board's file route
    (file_url(abs_path) -> URL); a link that leaves reports_dir is left as it is."""
    path = (reports_dir / rel).resolve()
    if reports_dir.resolve() not in path.parents or not path.is_file():
        raise BoardError(f"no report {rel!r} under {reports_dir}")
    text = path.read_text(encoding="utf-8")

    def fix(m: re.Match) -> str:
        src = m.group(2)
        if re.match(r"^[a-z]+:", src) or src.startswith("/"):
            return m.group(0)
        target = (path.parent / src).resolve()
        if not target.is_file():
            return m.group(0)
        return m.group(1) + file_url(target) + m.group(3)
    return _HTML_IMG.sub(fix, _IMG.sub(fix, text))


# ----------------------------------------------------------------------------- live

def live(root: Path, key: str) -> dict:
    """A training run's progress from its files: status, step of max_steps, last loss and
    throughput, the step records and the log tail."""
    d = detail(root, key)
    e = d["entry"]
    recs = d["metrics"]
    conf = d["config_obj"] if isinstance(d["config_obj"], dict) else {}
    max_steps = e.summary.get("max_steps") or (conf.get("steps") or {}).get("max_steps")
    last = recs[-1] if recs else {}
    line = f"**{e.key}**: **{e.status}**"
    if recs:
        line += f" · step {last.get('step')}" + (f" of {max_steps}" if max_steps else "")
        if last.get("loss") is not None:
            line += f" · loss {last['loss']:.4f}"
        if last.get("tokens_per_s"):
            line += f" · {last['tokens_per_s']:.0f} tokens/s"
    elif e.status == "running":
        line += " · waiting for the first step"
    return {"entry": e, "status_line": line, "metrics": recs, "log": d["log"], "max_steps": max_steps}
