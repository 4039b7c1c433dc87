"""The run index over real stage records: status from the summary, the lock or the server
state; key metrics per stage; true time order across UTC offsets."""
from __future__ import annotations

import json
import os

from forgelab import runindex
from forgelab.runs import Run


def _record(root, stage, name, summary=None, finished_at=None):
    os.environ["FORGELAB_RUNS_DIR"], old = str(root), os.environ["FORGELAB_RUNS_DIR"]
    try:
        with Run(stage, None, name) as run:
            run.summary.update(summary or {})
            run.data_fingerprint = "d" * 16
    finally:
        os.environ["FORGELAB_RUNS_DIR"] = old
    if finished_at:  # the same record written by a machine in another time zone
        p = root / stage / name / "summary.json"
        s = json.loads(p.read_text())
        s["finished_at"] = finished_at
        p.write_text(json.dumps(s))
    return root / stage / name


def test_statuses_metrics_and_order(tmp_path):
    _record(tmp_path, "tokenize_cpt", "east", {"splits": {"train": {"n_blocks": 5, "n_tokens": 320}}},
            finished_at="2026-12-02T10:30:00+09:00")   # 01:30 UTC
    _record(tmp_path, "merge", "west", {"max_abs_diff": 1e-5, "passed": True},
            finished_at="2026-12-01T20:00:00-08:00")   # 04:00 UTC, the later one
    try:
        os.environ["FORGELAB_RUNS_DIR"], old = str(tmp_path), os.environ["FORGELAB_RUNS_DIR"]
        with Run("eval", None, "boom"):
            raise RuntimeError("bad model")
    except RuntimeError:
        pass
    finally:
        os.environ["FORGELAB_RUNS_DIR"] = old
    (tmp_path / "train" / "killed").mkdir(parents=True)
    (tmp_path / "train" / "killed" / "config.yaml").write_text("task: cpt\n")
    entries = runindex.scan(tmp_path)
    by = {e.key: e for e in entries}
    assert by["tokenize_cpt/east"].metrics["train.n_tokens"] == 320
    assert by["merge/west"].metrics["passed"] is True and by["merge/west"].status == "ok"
    assert by["eval/boom"].status == "failed" and by["train/killed"].status == "incomplete"
    assert by["tokenize_cpt/east"].data_fingerprint == "d" * 16
    order = [e.key for e in entries if e.key in ("merge/west", "tokenize_cpt/east")]
    assert order == ["merge/west", "tokenize_cpt/east"]  # by instant, not by the strings
    assert [e.key for e in runindex.filter_runs(entries, since="2026-12-02T03:00:00+00:00")
            if e.stage != "eval" and e.stage != "train"] == ["merge/west"]
    assert [e.key for e in runindex.filter_runs(entries, status="failed")] == ["eval/boom"]
    assert "merge" in runindex.format_table(entries)
