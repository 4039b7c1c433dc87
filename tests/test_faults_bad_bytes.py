"""Fault injection: one invalid UTF-8 byte inside one record of a real data file.

The byte costs that record only: stage 03 (SFT) and stage 02 (CPT corpus) report it as a bad
record with file:line and the byte column, keep every other record of the file, and exit 0;
in strict mode (stage 03 `strict`, stage 02 `on_bad_record: error`) the run fails with one
line naming file:line."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from forgelab import config as cfg
from forgelab.data.corpus import CorpusConfig, CorpusError, SourceConfig, build_corpus, read_documents
from forgelab.data.sft_dataset import SFTDataConfig, SFTDataError, build_sft_dataset
from forgelab.runs import PROJECT_ROOT, Run, runs_dir

LOG = logging.getLogger("test")
N, BAD = 200, 57  # records taken from the real file; the 1-based line that gets the bad byte


def env() -> dict:  # read at call time: conftest points FORGELAB_RUNS_DIR/LOGS_DIR at a temp dir
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def inject(lines: list[bytes], lineno: int, field: bytes) -> tuple[list[bytes], int]:
    """The lines with b"\\xc3" (a lead byte) put before the first character of `field`'s value
    on line `lineno`, as a cut or mis-encoded "é" leaves it; returns the 1-based byte column."""
    line = lines[lineno - 1]
    at = line.index(b'"' + field + b'": "') + len(field) + 5
    out = list(lines)
    out[lineno - 1] = line[:at] + b"\xc3" + line[at:]
    return out, at + 1


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- stage 03

def sft_build(tmp_path, path, run_name="bytes", **over):
    conf = cfg.build(SFTDataConfig, {
        "sources": {"asdiv": {"path": str(path), "format": "alpaca",
                              "columns": {"instruction": "question", "input": "passage", "output": "answer"},
                              "user_template": "{input} {instruction}"}},
        "val_fraction": 0.0, "dedup": False, "out_dir": str(tmp_path / f"out-{run_name}"), **over})
    with Run("sft_data", conf, run_name=f"{run_name}-{tmp_path.name}") as run:
        summary = build_sft_dataset(conf, run)
    return summary, read_jsonl(tmp_path / f"out-{run_name}" / "train.jsonl"), run


@pytest.fixture()
def asdiv_lines(raw_data) -> list[bytes]:
    return raw_data["asdiv"].read_bytes().splitlines(keepends=True)[:N]


@pytest.mark.parametrize("name", ["asdiv.jsonl", "asdiv.json"])  # .json holding JSON Lines: the reported case
def test_sft_an_undecodable_line_is_one_bad_record_and_the_rest_are_kept(tmp_path, asdiv_lines, name):
    lines, col = inject(asdiv_lines, BAD, b"question")
    bad = tmp_path / name
    bad.write_bytes(b"".join(lines))
    clean = tmp_path / f"clean-{name}"  # the same file without that record
    clean.write_bytes(b"".join(asdiv_lines[:BAD - 1] + asdiv_lines[BAD:]))

    s, train, run = sft_build(tmp_path, bad)
    _, want, _ = sft_build(tmp_path, clean, run_name="clean")
    assert len(train) == N - 1 and train == want  # every other record, converted as without the fault
    assert s["bad_records"] == 1 and s["bad_by_reason"] == {"not_utf8": 1}
    src = s["sources"]["asdiv"]
    assert (src["records"], src["converted"], src["bad"]) == (N, N - 1, {"not_utf8": 1})
    (rep,) = read_jsonl(run.dir / "bad_records.jsonl")
    detail = f"invalid continuation byte at column {col}"
    assert {k: rep[k] for k in ("line", "where", "reason", "detail")} == \
        {"line": BAD, "where": f"{bad}:{BAD}", "reason": "not_utf8", "detail": detail}
    assert f"bad record {bad}:{BAD}: not_utf8: {detail}" in (run.dir / "run.log").read_text()

    with pytest.raises(SFTDataError, match=rf"^{re.escape(str(bad))}:{BAD}: bad record \(not_utf8\): "
                                           rf"{detail} \[strict mode\]$"):
        sft_build(tmp_path, bad, run_name="strict", strict=True)
    assert not (tmp_path / "out-strict" / "train.jsonl").exists()


def test_sft_a_json_array_element_with_an_undecodable_byte_is_one_bad_record(tmp_path, raw_data):
    recs = read_jsonl(raw_data["asdiv"])[:20]
    text = json.dumps(recs, indent=1, ensure_ascii=False).encode()
    target = recs[7]["answer"].encode()
    at = text.index(b'"answer": "' + target) + len(b'"answer": "')
    arr = tmp_path / "asdiv_array.json"
    arr.write_bytes(text[:at] + b"\xff" + text[at:])
    lineno = text.count(b"\n", 0, at) + 1
    col = at - text.rfind(b"\n", 0, at)
    start = text.count(b"\n", 0, text.rfind(b"{", 0, at)) + 1  # the element's first line
    s, train, run = sft_build(tmp_path, arr)
    assert len(train) == 19 and s["bad_by_reason"] == {"not_utf8": 1}
    (rep,) = read_jsonl(run.dir / "bad_records.jsonl")
    assert (rep["line"], rep["reason"]) == (start, "not_utf8")
    assert rep["detail"] == f"invalid start byte at line {lineno}, column {col}"


def test_sft_script_exits_0_and_reports_the_line_strict_exits_1_with_one_line(tmp_path, asdiv_lines):
    lines, col = inject(asdiv_lines, BAD, b"passage")
    bad = tmp_path / "asdiv.jsonl"
    bad.write_bytes(b"".join(lines))
    conf = tmp_path / "sft.yaml"
    conf.write_text(f"val_fraction: 0.0\ndedup: false\nout_dir: {tmp_path / 'out'}\nsources:\n"
                    f"  asdiv: {{path: {bad}, format: alpaca, "
                    f"columns: {{instruction: question, input: passage, output: answer}}}}\n")
    script = str(PROJECT_ROOT / "scripts" / "03_build_sft_dataset.py")
    run_name = f"bytes-{tmp_path.name}"
    r = subprocess.run([sys.executable, script, "--config", str(conf), "--run-name", run_name],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr
    msg = f"{bad}:{BAD}: not_utf8: invalid continuation byte at column {col}"
    assert f"bad record {msg}" in r.stderr
    s = json.loads((runs_dir() / "sft_data" / run_name / "summary.json").read_text())
    assert s["outcome"] == "ok" and s["train"] == N - 1 and s["bad_by_reason"] == {"not_utf8": 1}
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == N - 1

    r = subprocess.run([sys.executable, script, "--config", str(conf), "--set", "strict=true",
                        "--set", f"out_dir={tmp_path / 'strict'}", "--run-name", f"strict-{run_name}"],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 1
    errors = [x for x in r.stderr.splitlines() if "bad record" in x]
    assert len(errors) == 1 and errors[0].endswith(
        f"{bad}:{BAD}: bad record (not_utf8): invalid continuation byte at column {col} [strict mode]")
    assert "Traceback" not in r.stderr and not (tmp_path / "strict" / "train.jsonl").exists()


# ----------------------------------------------------------------------------- stage 02

def test_cpt_corpus_an_undecodable_line_is_one_bad_record(tmp_path, raw_data):
    verses = raw_data["kjv"].read_bytes().splitlines(keepends=True)[:80]  # Genesis 1-3
    lines, col = inject(verses, 40, b"text")  # Genesis 2:9
    bad = tmp_path / "kjv.jsonl"
    bad.write_bytes(b"".join(lines))
    src = SourceConfig(name="kjv", path=str(bad), group_by=["book", "chapter"], title="{book} {chapter}",
                       join=" ")
    reason = f"not UTF-8 (invalid continuation byte at column {col})"
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(bad))}:40: {re.escape(reason)} \(source 'kjv'"):
        list(read_documents(src, "error", Counter(), LOG))
    counts = Counter()
    docs = list(read_documents(src, "skip", counts, LOG))
    assert counts["bad_record"] == 1 and counts["records"] == 79
    g2 = json.loads(verses[39])["text"]
    assert [d.id for d in docs] == ["kjv:1-31", "kjv:32-56", "kjv:57-80"]
    assert g2 not in docs[1].text and json.loads(verses[40])["text"] in docs[1].text

    conf = cfg.build(CorpusConfig, {
        "sources": [{"name": "kjv", "path": str(bad), "format": "jsonl", "lang": "en",
                     "group_by": ["book", "chapter"], "title": "{book} {chapter}", "join": " "}],
        "out_dir": str(tmp_path / "out"), "on_bad_record": "skip", "heldout_fraction": 0.0,
        "mix": {"by": "chars", "target": 0}, "dedup": {"near": False}})
    s = build_corpus(conf, LOG)
    assert s["dropped"]["bad_record"] == 1 and s["sources"]["kjv"]["records"] == 79
    assert s["outputs"]["train"]["docs"] == 3

    # the script, with the default on_bad_record: error: exit 1 and one line naming file:line
    cfg_file = tmp_path / "corpus.yaml"
    cfg_file.write_text(f"sources:\n  - {{name: kjv, path: {bad}, format: jsonl, group_by: [book, chapter]}}\n"
                        f"out_dir: {tmp_path / 'out-error'}\n")
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "02_build_cpt_corpus.py"),
                        "--config", str(cfg_file), "--run-name", f"bytes-{tmp_path.name}"],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (f"error: {bad}:40: {reason} (source 'kjv'; "
                                                 f"set on_bad_record=skip to count and skip)")
    assert not (tmp_path / "out-error" / "train.jsonl").exists()
