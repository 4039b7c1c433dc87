"""Run records in-process: a Run writes its config, log, summary with fingerprint and the
operation/error log lines, on success, failure and interruption; the helpers behind it write
atomically and fingerprint by content (scripts/mutation.py, area runs)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from forgelab import config as cfg
from forgelab import runs
from forgelab.config import field
from forgelab.jsonl import JsonlError
from forgelab.runs import PROJECT_ROOT, Run

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) forgelab\.[\w.]+: .*$")
OP_HEADER = "# Operation log\n\n| time | stage | run | outcome | summary |\n|---|---|---|---|---|\n"


@dataclass
class StageConf:
    seq_len: int = field(32, help="block length")
    name: str = field("Grüße", help="non-ASCII survives")


def test_project_paths_resolve_against_the_project_root(tmp_path, monkeypatch):
    assert runs.project_path("configs/x.yaml") == PROJECT_ROOT / "configs" / "x.yaml"
    assert runs.project_path(tmp_path) == tmp_path and runs.project_path(str(tmp_path)) == tmp_path
    monkeypatch.delenv("FORGELAB_RUNS_DIR", raising=False)
    monkeypatch.delenv("FORGELAB_LOGS_DIR", raising=False)
    assert runs.runs_dir() == PROJECT_ROOT / "runs" and runs.runs_dir("train") == PROJECT_ROOT / "runs" / "train"
    assert runs.logs_dir() == PROJECT_ROOT / "logs"
    monkeypatch.setenv("FORGELAB_RUNS_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("FORGELAB_LOGS_DIR", "elsewhere/logs")
    assert runs.runs_dir("eval") == tmp_path / "r" / "eval" and runs.runs_dir() == tmp_path / "r"
    assert runs.logs_dir() == PROJECT_ROOT / "elsewhere" / "logs"


def test_atomic_writes_leave_the_whole_text_and_no_temp_file(tmp_path):
    p = tmp_path / "a" / "b" / "note.txt"
    runs.atomic_write_text(str(p), "Grüße\n北京\n")
    assert p.read_bytes() == "Grüße\n北京\n".encode("utf-8") and os.listdir(p.parent) == ["note.txt"]
    runs.write_json(p.with_name("s.json"), {"path": Path("/x"), "name": "北京", "n": [1]})
    assert p.with_name("s.json").read_text(encoding="utf-8") == \
        json.dumps({"path": "/x", "name": "北京", "n": [1]}, indent=2, ensure_ascii=False) + "\n"
    assert runs.read_json(p.with_name("s.json")) == {"path": "/x", "name": "北京", "n": [1]}
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        runs.atomic_write_text(tmp_path / "dir", "cannot replace a directory")
    assert sorted(os.listdir(tmp_path)) == ["a", "dir"]  # the temp file of the failed write is gone


def test_metrics_skip_a_torn_last_line_and_refuse_a_bad_middle_one(tmp_path):
    p = tmp_path / "metrics.jsonl"
    assert runs.read_metrics(p) == []
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    bad: list = []
    assert runs.read_metrics(p, bad) == [{"step": 1}, {"step": 2}] and len(bad) == 1
    assert str(bad[0]).startswith(f"{p}:3")
    assert runs.read_metrics(p) == [{"step": 1}, {"step": 2}]
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=f"{re.escape(str(p))}:2: invalid JSON"):
        runs.read_metrics(p)

    class MyError(ValueError):
        pass
    with pytest.raises(MyError):
        runs.read_metrics(p, error=MyError)


def test_fingerprints_hash_contents_and_names_in_any_order(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha")
    (d / "sub" / "b.txt").write_text("beta")
    for sub in ("a", "a-b"):  # "a-b/x" sorts before "a/x" as text, after it as path parts
        (d / sub).mkdir()
        (d / sub / "x.txt").write_text(f"in {sub}")
    one = tmp_path / "one.txt"
    one.write_bytes(b"x" * 3000)
    assert runs.sha256_file(one) == hashlib.sha256(b"x" * 3000).hexdigest() == runs.sha256_file(one, chunk=7)
    files = sorted([d / "a.txt", d / "sub" / "b.txt", d / "a" / "x.txt", d / "a-b" / "x.txt", one], key=str)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).hexdigest().encode())
    fp = runs.fingerprint_paths([d, one])
    assert fp == h.hexdigest()[:16] == runs.fingerprint_paths([one, str(d)])
    (d / "sub" / "b.txt").rename(d / "sub" / "c.txt")
    assert runs.fingerprint_paths([d, one]) != fp  # a renamed file is another input


def test_package_versions_and_hardware_are_this_machines():
    assert runs.package_versions(("pytest", "no-such-package-here")) == {
        "pytest": metadata.version("pytest"), "no-such-package-here": None}
    assert set(runs.package_versions()) == set(runs.PACKAGES)
    hw = runs.hardware()
    assert (hw["platform"], hw["python"], hw["cpu_count"], hw["machine"]) == \
        (platform.platform(), platform.python_version(), os.cpu_count(), platform.machine())
    import torch
    assert hw["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import psutil
        assert hw["ram_gib"] == round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        assert "ram_gib" not in hw


def test_fingerprint_holds_what_it_was_given():
    conf = cfg.build(StageConf, {})
    fp = runs.fingerprint(conf, "d" * 16, "t" * 16)
    assert fp["config_hash"] == cfg.config_hash(conf) and fp["data_fingerprint"] == "d" * 16
    assert fp["tokenizer_fingerprint"] == "t" * 16
    assert fp["packages"] == runs.package_versions() and fp["hardware"] == runs.hardware()
    assert set(fp["git"]) == {"commit", "dirty"}
    bare = runs.fingerprint()
    assert set(bare) == {"git", "packages", "hardware"}


def _op_rows(logs: Path) -> list[list[str]]:
    text = (logs / "operation_log.md").read_text(encoding="utf-8")
    assert text.startswith(OP_HEADER)
    return [[c.strip() for c in x.strip().strip("|").split("|")] for x in text[len(OP_HEADER):].splitlines()]


def test_a_run_records_config_log_summary_and_an_operation_line(tmp_path, capsys):
    conf = cfg.build(StageConf, {"seq_len": 64})
    logging.getLogger("forgelab").setLevel(logging.WARNING)
    before = list(logging.getLogger("forgelab").handlers)
    t0 = time.time()
    with Run("tokenize", conf, run_name="r1", runs_root=tmp_path / "runs", logs_root=tmp_path / "logs",
             rank=0) as run:
        assert logging.getLogger("forgelab").level == logging.INFO and run.is_main
        run.log.info("hello %s", "there")
        run.summary.update(kept=3)
        run.data_fingerprint, run.tokenizer_fingerprint = "d" * 16, "t" * 16
    d = tmp_path / "runs" / "tokenize" / "r1"
    assert run.dir == d and logging.getLogger("forgelab").handlers == before
    assert (d / "config.yaml").read_text(encoding="utf-8") == cfg.dump_yaml(conf)
    lines = (d / "run.log").read_text(encoding="utf-8").splitlines()
    assert lines[0].endswith(f"forgelab.tokenize: run tokenize/r1 -> {d}") and lines[1].endswith(": hello there")
    assert all(LOG_LINE.match(x) for x in lines)
    err_lines = [x for x in capsys.readouterr().err.splitlines() if "hello there" in x]
    assert len(err_lines) == 1 and LOG_LINE.match(err_lines[0])  # the main rank also logs to stderr, formatted
    s = runs.read_json(d / "summary.json")
    assert (s["stage"], s["run_name"], s["outcome"], s["kept"]) == ("tokenize", "r1", "ok", 3) and "error" not in s
    assert isinstance(s["wall_seconds"], float) and 0 <= s["wall_seconds"] <= time.time() - t0
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$", s["finished_at"])
    fp = s["fingerprint"]
    assert (fp["config_hash"], fp["data_fingerprint"], fp["tokenizer_fingerprint"]) == \
        (cfg.config_hash(conf), "d" * 16, "t" * 16)
    rows = _op_rows(tmp_path / "logs")
    assert len(rows) == 1 and rows[0][1:4] == ["tokenize", "r1", "ok"]
    assert rows[0][4] == os.path.relpath(d / "summary.json", PROJECT_ROOT)
    assert not (tmp_path / "logs" / "error_log.md").exists()
    with Run("tokenize", None, run_name="r2", summary_name="other.json", runs_root=tmp_path / "runs",
             logs_root=tmp_path / "logs", rank=0) as run2:
        run2.write_summary()  # a stage may write its summary before the end
        assert runs.read_json(run2.summary_path)["outcome"] == "ok"
        run2.outcome = "interrupted"  # a stage that stopped early without an error
    assert runs.read_json(run2.summary_path)["outcome"] == "interrupted"
    assert run2.summary_path.name == "other.json" and not (run2.dir / "config.yaml").exists()
    assert [r[1:4] for r in _op_rows(tmp_path / "logs")] == [["tokenize", "r1", "ok"], ["tokenize", "r2", "interrupted"]]


def _fail(depth: int):
    if depth:
        _fail(depth - 1)
    raise ValueError("boom")


def test_a_failed_run_records_its_error_and_reraises(tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(ValueError, match="boom") as caught:
        with Run("stage", None, run_name="bad", runs_root=tmp_path, logs_root=logs, rank=0):
            _fail(3)
    want = "".join(traceback.format_exception(caught.value)[-3:]).strip()  # the last two frames and the error
    s = runs.read_json(tmp_path / "stage" / "bad" / "summary.json")
    assert (s["outcome"], s["error"]) == ("failed", "ValueError: boom")
    err = (logs / "error_log.md").read_text(encoding="utf-8")
    assert err.startswith("# Error log\n\n## ") and err.count("\n## ") == 1 and err.endswith("```\n\n")
    head, body = err[len("# Error log\n\n"):].split("\n", 1)
    assert head.endswith(" stage/bad") and body.startswith("\nValueError: boom\n\n```\n")
    block = body.split("```\n", 1)[1].rsplit("\n```", 1)[0]
    assert block == want and block.count('File "') == 2 and block.endswith("\nValueError: boom")
    assert "ERROR forgelab.stage: ValueError: boom" in (tmp_path / "stage" / "bad" / "run.log").read_text()
    with pytest.raises(KeyboardInterrupt):
        with Run("stage", None, run_name="stop", runs_root=tmp_path, logs_root=logs, rank=0):
            raise KeyboardInterrupt
    assert runs.read_json(tmp_path / "stage" / "stop" / "summary.json")["outcome"] == "interrupted"
    err = (logs / "error_log.md").read_text(encoding="utf-8")  # an interruption is an error entry too
    assert err.count("\n## ") == 2 and " stage/stop\n\nKeyboardInterrupt: \n" in err
    assert [r[3] for r in _op_rows(logs)] == ["failed", "interrupted"]


def test_a_record_that_cannot_be_written_does_not_hide_the_error(tmp_path):
    blocker = tmp_path / "logs-is-a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="the real error"):
        with Run("stage", None, run_name="r", runs_root=tmp_path, logs_root=blocker, rank=0):
            raise ValueError("the real error")
    log = (tmp_path / "stage" / "r" / "run.log").read_text(encoding="utf-8")
    assert re.search(r"ERROR forgelab\.stage: could not write the run record \(FileExistsError: \[Errno 17\] "
                     r"File exists: '.*logs-is-a-file'\)\n", log), log
    assert "ERROR forgelab.stage: ValueError: the real error" in log


def test_other_ranks_log_to_their_own_file_and_write_no_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with Run("train", cfg.build(StageConf, {}), run_name="r", runs_root=tmp_path, logs_root=tmp_path / "logs") as run:
        assert run.rank == 1 and not run.is_main
        run.log.info("from rank one")
    assert sorted(p.name for p in run.dir.iterdir()) == ["run.rank1.log"]
    assert "from rank one" in (run.dir / "run.rank1.log").read_text() and "from rank one" not in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
    assert Run("train", rank=3).rank == 3
    monkeypatch.delenv("RANK")
    r = Run("train")
    assert r.rank == 0 and r.dir == runs.runs_dir() / "train" / r.run_name and r.logs_root == runs.logs_dir()
    assert re.fullmatch(r"\d{8}-\d{6}", r.run_name) and r.summary_path == r.dir / "summary.json"
    assert r.summary == {} and r.outcome is None and r.data_fingerprint is None and r.tokenizer_fingerprint is None


def test_records_go_where_they_belong_from_any_working_directory(tmp_path, monkeypatch):
    logs = tmp_path / "deep" / "er" / "logs"  # the logs folder and its parents are made when missing
    monkeypatch.chdir(tmp_path)  # a script run from elsewhere: paths stay relative to the project
    for _ in range(2):  # the same run name again: its directory is reused
        with Run("stage", None, run_name="again", runs_root=tmp_path / "runs", logs_root=logs, rank=0) as run:
            pass
    rows = _op_rows(logs)
    assert len(rows) == 2 and rows[1][4] == os.path.relpath(run.summary_path, PROJECT_ROOT)
