"""Run records read back (README "Records", forgelab.runs.Run): a real stage run as a user
runs it (scripts/04_tokenize_cpt.py on a few KJV verses) records, in runs/<stage>/<run>/, the
resolved config (config.yaml, whose hash is the summary's config_hash), a log, and a summary
whose fingerprint holds the project's git commit and dirty flag, the package versions and the
hardware of this machine; it appends one line to logs/operation_log.md. A run that fails inside
its Run context records outcome failed with the error, and an entry in logs/error_log.md.
Records go to this test's own FORGELAB_RUNS_DIR / FORGELAB_LOGS_DIR, so the logs are read
exactly."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from forgelab import config as cfg
from forgelab.data.tokenize_cpt import TokenizeCPTConfig
from forgelab.model.tokenizer_info import tokenizer_fingerprint
from forgelab.runs import PACKAGES, PROJECT_ROOT, fingerprint_paths, read_json
from helpers import kjv_verses

OP_HEADER = ["# Operation log", "", "| time | stage | run | outcome | summary |", "|---|---|---|---|---|"]


def _stage04(tmp: Path, run_name: str, *sets: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               FORGELAB_RUNS_DIR=str(tmp / "runs"), FORGELAB_LOGS_DIR=str(tmp / "logs"))
    cmd = [sys.executable, "scripts/04_tokenize_cpt.py", "--run-name", run_name,
           *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _git(*args: str) -> subprocess.CompletedProcess:
    # --no-optional-locks: reading the state must not touch the index of the working tree
    return subprocess.run(["git", "--no-optional-locks", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=30)


def _dirty() -> bool:
    """The dirty flag as runs.git_state defines it: tracked files changed (untracked files
    do not count)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no").stdout.strip())


def _op_rows(logs: Path) -> list[list[str]]:
    lines = (logs / "operation_log.md").read_text(encoding="utf-8").splitlines()
    assert lines[:4] == OP_HEADER
    return [[c.strip() for c in x.strip().strip("|").split("|")] for x in lines[4:]]


def test_a_stage_run_records_config_fingerprint_and_log_lines_and_a_failure_its_error(smollm2_dir, tmp_path):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t, "source": "kjv"}) + "\n" for t in kjv_verses(0, 40)),
                   encoding="utf-8")
    runs, logs = tmp_path / "runs" / "tokenize_cpt", tmp_path / "logs"
    dirty_before = _dirty()
    r = _stage04(tmp_path, "rec-ok", f"tokenizer={smollm2_dir}", f"inputs={json.dumps({'train': str(src)})}",
                 f"out_dir={tmp_path / 'tok'}", "seq_len=32", "num_workers=0")
    dirty_after = _dirty()
    assert r.returncode == 0, r.stderr[-3000:]
    run = runs / "rec-ok"
    s = read_json(run / "summary.json")
    assert (s["stage"], s["run_name"], s["outcome"]) == ("tokenize_cpt", "rec-ok", "ok") and "error" not in s
    assert s["wall_seconds"] > 0 and s["finished_at"]
    fp = s["fingerprint"]

    # git: the project's HEAD commit, and the dirty flag of its working tree
    head = _git("rev-parse", "HEAD")
    assert fp["git"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(fp["git"]["dirty"], bool)
    assert fp["git"]["dirty"] in (dirty_before, dirty_after)  # equal, unless the tree changed meanwhile

    # packages: the versions this interpreter has installed (None: not installed)
    def installed(n):
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            return None
    assert fp["packages"] == {n: installed(n) for n in PACKAGES}
    assert fp["packages"]["torch"] == metadata.version("torch")
    assert fp["packages"]["transformers"] == metadata.version("transformers")

    # hardware: this machine
    hw = fp["hardware"]
    assert hw["cpu_count"] == os.cpu_count() and hw["python"] == platform.python_version()
    assert hw["machine"] == platform.machine() and hw["platform"] == platform.platform()
    import torch
    assert hw["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]

    # the resolved config: config.yaml holds the overrides; its hash is the summary's config_hash
    text = (run / "config.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    assert raw["seq_len"] == 32 and raw["inputs"] == {"train": str(src)} and raw["tokenizer"] == str(smollm2_dir)
    assert fp["config_hash"] == hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
    reloaded = cfg.load(TokenizeCPTConfig, [run / "config.yaml"])
    assert cfg.config_hash(reloaded) == fp["config_hash"] and cfg.dump_yaml(reloaded) == text
    # ... and it is the config's own: another value gives another hash
    assert cfg.config_hash(cfg.load(TokenizeCPTConfig, [run / "config.yaml"], ["seq_len=64"])) != fp["config_hash"]
    # the inputs: data and tokenizer fingerprints
    assert fp["data_fingerprint"] == fingerprint_paths([src])
    assert fp["tokenizer_fingerprint"] == tokenizer_fingerprint(smollm2_dir)
    assert "run tokenize_cpt/rec-ok" in (run / "run.log").read_text(encoding="utf-8")

    # the operation log: one line naming stage, run, outcome and the summary's path
    rows = _op_rows(logs)
    assert len(rows) == 1
    when, stage, name, outcome, rel = rows[0]
    assert (stage, name, outcome) == ("tokenize_cpt", "rec-ok", "ok") and when[:4].isdigit()
    assert (PROJECT_ROOT / rel).resolve() == (run / "summary.json").resolve()
    assert not (logs / "error_log.md").exists()  # nothing failed yet

    # a run that fails inside its Run context: a missing input
    missing = tmp_path / "missing.jsonl"
    r = _stage04(tmp_path, "rec-bad", f"tokenizer={smollm2_dir}", f"inputs={json.dumps({'train': str(missing)})}",
                 f"out_dir={tmp_path / 'tok-bad'}", "num_workers=0")
    assert r.returncode == 1 and f"input not found: {missing}" in r.stderr
    bad = read_json(runs / "rec-bad" / "summary.json")
    assert (bad["stage"], bad["run_name"], bad["outcome"]) == ("tokenize_cpt", "rec-bad", "failed")
    assert f"input not found: {missing}" in bad["error"]
    assert bad["fingerprint"]["git"]["commit"] == fp["git"]["commit"]  # the summary is written on failure too
    assert bad["fingerprint"]["packages"] == fp["packages"] and bad["fingerprint"]["hardware"] == hw
    assert (runs / "rec-bad" / "config.yaml").is_file() and "config_hash" in bad["fingerprint"]
    rows = _op_rows(logs)
    assert len(rows) == 2 and rows[1][1:4] == ["tokenize_cpt", "rec-bad", "failed"]
    assert (PROJECT_ROOT / rows[1][4]).resolve() == (runs / "rec-bad" / "summary.json").resolve()
    err = (logs / "error_log.md").read_text(encoding="utf-8")
    assert err.startswith("# Error log\n") and err.count("\n## ") == 1
    entry = err.split("\n## ", 1)[1]
    assert entry.split("\n", 1)[0].endswith(" tokenize_cpt/rec-bad")
    assert bad["error"] in entry and f"input not found: {missing}" in entry
