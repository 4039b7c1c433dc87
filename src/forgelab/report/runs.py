"""Reading training run directories (runs/train/<run>/) for reports, and the protocol rule:
runs are compared only when they share the data fingerprint, sequence length and tokens per
step, unless the caller allows mixed protocols."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import runs as run_files
from ..runs import project_path, read_json

SUMMARY = "train_summary.json"
PROTOCOL_KEYS = ("data_fingerprint", "seq_len", "tokens_per_step")


class ReportError(ValueError):
    """A run directory is missing a file or key a report needs."""


class ProtocolError(ReportError):
    """Runs with different protocols were asked to be compared."""


@dataclass
class RunRecord:
    name: str
    dir: Path
    summary: dict
    config: dict
    metrics: list[dict]
    profile: dict | None = None
    resume_validation: dict | None = None
    extra: dict = field(default_factory=dict)

    def get(self, dotted: str, default: Any = None) -> Any:
        """A summary value by dotted key ('estimate.predicted.steps')."""
        node: Any = self.summary
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def need(self, dotted: str) -> Any:
        v = self.get(dotted)
        if v is None:
            raise ReportError(f"{self.dir / SUMMARY}: key '{dotted}' is missing")
        return v

    @property
    def backend(self) -> str:
        return str(self.get("backend", "?"))

    @property
    def world_size(self) -> int:
        return int(self.get("world_size", 1) or 1)

    @property
    def protocol(self) -> dict:
        data_fp = self.get("fingerprint.data_fingerprint") or self.get("data.data_fingerprint")
        tps = self.get("tokens_per_step_capacity") or self.get("tokens_per_step")
        return {"data_fingerprint": data_fp, "seq_len": self.get("seq_len"),
                "tokens_per_step": round(float(tps)) if tps is not None else None}

    @property
    def launch(self) -> str:
        """The command that launched this run (recorded since the summaries carry it; older runs:
        the launcher with task, track, backend and sweep overrides)."""
        if self.get("command"):
            return str(self.get("command"))
        get = lambda k, d=None: self.get(k) or self.config.get(k) or d  # noqa: E731
        task = get("task", "cpt")
        if task == "sft":
            sft_mode = self.get("sft_mode") or (self.config.get("sft") or {}).get("mode")
            task = "sft_full" if sft_mode == "full" else "sft_lora"
        cmd = f"scripts/train/{get('track', 'sanity')}.sh {get('backend', '?')} --task {task}"
        over = self.get("plan.sweep.overrides") or {}
        for k, v in over.items():
            cmd += f" --set {k}={json.dumps(v)}"
        return cmd + " (reconstructed: this run's summary has no command)"


def read_metrics(path: Path, bad_lines: list | None = None) -> list[dict]:
    """forgelab.runs.read_metrics, raising ReportError for a bad line other than a torn last one."""
    return run_files.read_metrics(path, bad_lines, error=ReportError)


def load_run(d: str | Path) -> RunRecord:
    d = project_path(d)
    sp = d / SUMMARY
    if not sp.is_file():
        raise ReportError(f"{d}: no {SUMMARY} (not a finished training run)")
    try:
        summary = read_json(sp)
    except json.JSONDecodeError as e:
        raise ReportError(f"{sp}: invalid JSON: {e}") from None
    conf_path = d / "config.yaml"
    config = yaml.safe_load(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    prof = d / "profile_summary.json"
    rv = d / "resume_validation.json"
    torn: list = []
    metrics = read_metrics(d / "metrics.jsonl", torn)
    return RunRecord(name=d.name, dir=d, summary=summary, config=config or {}, metrics=metrics,
                     profile=read_json(prof) if prof.is_file() else None,
                     resume_validation=read_json(rv) if rv.is_file() else None,
                     extra={"metrics_torn_lines": [str(b) for b in torn]} if torn else {})


def discover(root: str | Path = "runs/train", names: list[str] | None = None,
             tracks: tuple[str, ...] | None = None, need: str | None = None) -> list[RunRecord]:
    """Finished runs under root (or exactly `names`), optionally of some tracks, optionally
    only those holding a file (`need`, e.g. 'profile_summary.json')."""
    root = project_path(root)
    if names:
        dirs = [Path(n) if Path(n).is_absolute() or "/" in n else root / n for n in names]
        missing = [str(x) for x in dirs if not (project_path(x) / SUMMARY).is_file()]
        if missing:
            raise ReportError(f"no {SUMMARY} in: {', '.join(missing)}")
    else:
        dirs = sorted(p.parent for p in root.glob(f"*/{SUMMARY}")) if root.is_dir() else []
    runs = [load_run(x) for x in dirs]
    if tracks and not names:
        runs = [r for r in runs if r.get("track") in tracks]
    if need:
        runs = [r for r in runs if (r.dir / need).is_file()]
    return runs


# ----------------------------------------------------------------------------- protocols

def protocol_differences(a: RunRecord, b: RunRecord) -> list[str]:
    pa, pb = a.protocol, b.protocol
    return [f"{k} differs: {a.name} has {pa[k]!r}, {b.name} has {pb[k]!r}"
            for k in PROTOCOL_KEYS if pa[k] != pb[k]]


def group_by_protocol(runs: list[RunRecord]) -> list[list[RunRecord]]:
    """Runs in groups of identical protocol, in first-seen order."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(tuple(r.protocol[k] for k in PROTOCOL_KEYS), []).append(r)
    return list(groups.values())


def explain_groups(groups: list[list[RunRecord]]) -> list[str]:
    """One line per pair of groups: which protocol keys differ between which runs."""
    lines = []
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            a, b = groups[i][0], groups[j][0]
            lines += protocol_differences(a, b)
    return lines


def check_comparable(runs: list[RunRecord], allow_mixed: bool = False) -> list[str]:
    """Raise ProtocolError naming the differing keys unless allowed; returns the differences."""
    groups = group_by_protocol(runs)
    diffs = explain_groups(groups)
    if diffs and not allow_mixed:
        raise ProtocolError("runs with different protocols are not compared (pass --allow-mixed-protocols "
                            "to compare anyway): " + "; ".join(diffs))
    return diffs
