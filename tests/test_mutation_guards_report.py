"""The reports' protocol rule on run directories written as files: runs are read back whole,
compared only when data fingerprint, sequence length and tokens per step agree, and refused
naming each difference otherwise (scripts/mutation.py, area report)."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from forgelab.report.runs import (SUMMARY, ProtocolError, ReportError, check_comparable, discover,
                                  explain_groups, group_by_protocol, load_run, protocol_differences)
from forgelab.runs import PROJECT_ROOT, write_json
from forgelab.serve import bench_report
from forgelab.serve.bench import BenchError


def summary(fp="aaaa", seq_len=64, tps=128, track="bench", **extra) -> dict:
    return {"fingerprint": {"data_fingerprint": fp}, "seq_len": seq_len, "tokens_per_step_capacity": tps,
            "track": track, **extra}


def run_dir(root, name, body: dict | None = None, config=None, metrics=None, files=()):
    d = root / name
    d.mkdir(parents=True)
    write_json(d / SUMMARY, summary() if body is None else body)
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    if metrics is not None:
        (d / "metrics.jsonl").write_text(metrics, encoding="utf-8")
    for f in files:
        write_json(d / f, {"file": f})
    return d


def test_a_run_dir_is_read_back_whole(tmp_path):
    d = run_dir(tmp_path, "r1", summary(steps=3), config={"task": "cpt"},
                metrics='{"step": 1}\n{"step": 2}\n{"step": 3, "lo', files=("profile_summary.json",
                                                                          "resume_validation.json"))
    r = load_run(str(d))
    assert (r.name, r.dir, r.summary["steps"], r.config) == ("r1", d, 3, {"task": "cpt"})
    assert r.metrics == [{"step": 1}, {"step": 2}]
    assert r.profile == {"file": "profile_summary.json"} and r.resume_validation == {"file": "resume_validation.json"}
    assert len(r.extra["metrics_torn_lines"]) == 1 and r.extra["metrics_torn_lines"][0].startswith(
        f"{d / 'metrics.jsonl'}:3")
    bare = load_run(run_dir(tmp_path, "r2"))
    assert (bare.config, bare.metrics, bare.profile, bare.resume_validation, bare.extra) == ({}, [], None, None, {})
    (tmp_path / "r2" / "config.yaml").write_text("", encoding="utf-8")
    assert load_run(tmp_path / "r2").config == {}


def test_a_run_dir_that_is_not_a_finished_run_is_refused(tmp_path):
    with pytest.raises(ReportError) as e:
        load_run(tmp_path / "nothing")
    assert str(e.value) == f"{tmp_path / 'nothing'}: no {SUMMARY} (not a finished training run)"
    d = tmp_path / "broken"
    d.mkdir()
    (d / SUMMARY).write_text("{not json")
    with pytest.raises(ReportError) as e:
        load_run(d)
    assert str(e.value).startswith(f"{d / SUMMARY}: invalid JSON: ")
    bad = run_dir(tmp_path, "badmetrics", metrics='{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ReportError, match="metrics.jsonl:2: invalid JSON"):
        load_run(bad)


def test_summary_values_are_read_by_dotted_key(tmp_path):
    r = load_run(run_dir(tmp_path, "r", summary(zero=0, estimate={"predicted": {"steps": 7}}, flat=5)))
    assert r.get("estimate.predicted.steps") == 7 and r.get("estimate.missing") is None
    assert r.get("flat.deeper", "d") == "d" and r.get("nope", 1) == 1
    assert r.need("estimate.predicted.steps") == 7 and r.need("zero") == 0
    with pytest.raises(ReportError) as e:
        r.need("estimate.actual")
    assert str(e.value) == f"{tmp_path / 'r' / SUMMARY}: key 'estimate.actual' is missing"


def test_discover_finds_finished_runs_by_root_name_track_and_file(tmp_path):
    run_dir(tmp_path, "b-run", summary(track="optimize"))
    run_dir(tmp_path, "a-run", files=("profile_summary.json",))
    run_dir(tmp_path, "c-run")
    (tmp_path / "unfinished").mkdir()
    assert [r.name for r in discover(tmp_path)] == ["a-run", "b-run", "c-run"]
    assert [r.name for r in discover(str(tmp_path), tracks=("bench",))] == ["a-run", "c-run"]
    assert [r.name for r in discover(tmp_path, need="profile_summary.json")] == ["a-run"]
    assert [r.name for r in discover(tmp_path, names=["c-run", str(tmp_path / "b-run")], tracks=("bench",))] == \
        ["c-run", "b-run"]  # named runs are taken as named, whatever their track
    assert discover(tmp_path / "missing") == []
    with pytest.raises(ReportError) as e:
        discover(tmp_path, names=["a-run", "x", "unfinished"])
    assert str(e.value) == f"no {SUMMARY} in: {tmp_path / 'x'}, {tmp_path / 'unfinished'}"


def test_a_slash_in_a_name_is_a_path_from_the_project(tmp_path):
    d = run_dir(tmp_path, "x")
    rel = os.path.relpath(d, PROJECT_ROOT)  # "../../tmp/.../x": a relative path with a slash
    assert [r.dir.resolve() for r in discover(tmp_path / "elsewhere", names=[rel])] == [d.resolve()]
    assert [r.name for r in discover(tmp_path, names=["x"])] == ["x"]


def _runs(tmp_path, bodies: dict) -> list:
    return [load_run(run_dir(tmp_path, name, body)) for name, body in bodies.items()]


def test_the_protocol_is_read_from_either_place_a_summary_keeps_it(tmp_path):
    a, b = _runs(tmp_path, {"a": summary(tps=128.4),
                            "b": {"data": {"data_fingerprint": "aaaa"}, "seq_len": 64, "tokens_per_step": 128}})
    assert a.protocol == b.protocol == {"data_fingerprint": "aaaa", "seq_len": 64, "tokens_per_step": 128}
    assert protocol_differences(a, b) == [] and check_comparable([a, b]) == []


def test_runs_differing_in_a_protocol_key_are_refused_naming_it(tmp_path):
    base, other_fp, longer, bigger = _runs(tmp_path, {"base": summary(), "fp": summary(fp="bbbb"),
                                                      "seq": summary(seq_len=32), "tps": summary(tps=256)})
    assert protocol_differences(base, other_fp) == ["data_fingerprint differs: base has 'aaaa', fp has 'bbbb'"]
    assert protocol_differences(base, longer) == ["seq_len differs: base has 64, seq has 32"]
    assert protocol_differences(base, bigger) == ["tokens_per_step differs: base has 128, tps has 256"]
    with pytest.raises(ProtocolError) as e:
        check_comparable([base, other_fp, longer])
    assert str(e.value) == ("runs with different protocols are not compared (pass --allow-mixed-protocols to "
                            "compare anyway): data_fingerprint differs: base has 'aaaa', fp has 'bbbb'; "
                            "seq_len differs: base has 64, seq has 32; data_fingerprint differs: fp has 'bbbb', "
                            "seq has 'aaaa'; seq_len differs: fp has 64, seq has 32")
    assert check_comparable([base, bigger], allow_mixed=True) == \
        ["tokens_per_step differs: base has 128, tps has 256"]


def test_runs_are_grouped_by_protocol_in_first_seen_order(tmp_path):
    a, b, c, d = _runs(tmp_path, {"a": summary(), "b": summary(seq_len=32), "c": summary(), "d": summary(seq_len=32)})
    groups = group_by_protocol([b, a, c, d])
    assert [[r.name for r in g] for g in groups] == [["b", "d"], ["a", "c"]]
    assert explain_groups(groups) == ["seq_len differs: b has 32, a has 64"]
    assert explain_groups(group_by_protocol([a, c])) == [] and group_by_protocol([]) == []


BENCH_CONF = {"workload": "random", "random": {"input_len": 8, "output_len": 4, "range_ratio": 0.0},
              "num_prompts": 3, "warmup_requests": 0, "request_rate": "inf", "burstiness": 1.0,
              "max_concurrency": 0, "temperature": 0.0, "seed": 0, "slo": {}, "percentiles": [50, 99]}
RESULT = {"completed": 3, "failed": 0, "request_throughput": 1.0, "output_throughput": 2.0,
          "total_output_tokens": 12, **{k: {"median": 1.0, "p99": 2.0} for k in ("ttft_ms", "tpot_ms", "itl_ms",
                                                                                   "e2el_ms")}}


def _bench(tmp_path, name, config: dict, tok_fp="t1"):
    d = tmp_path / name
    d.mkdir()
    context = {"server": {"backend": "vllm"}, "date": "2026-01-01", "command": "c"}
    write_json(d / "report.json", {"config": {**BENCH_CONF, **config}, "summary": RESULT, "context": context})
    write_json(d / "bench_summary.json", {"fingerprint": {"tokenizer_fingerprint": tok_fp}})
    return d


def test_benchmark_compare_refuses_runs_of_other_settings_before_reading_further(tmp_path):
    a = _bench(tmp_path, "a", {"seed": 0, "num_prompts": 3})
    b = _bench(tmp_path, "b", {"seed": 1, "num_prompts": 4}, tok_fp="t2")
    with pytest.raises(BenchError) as e:
        bench_report.compare([a, b], tmp_path / "cmp")
    assert str(e.value) == ("runs measured different things, refusing to compare them (--force to compare "
                            "anyway):\n  num_prompts: 3 vs 4\n  seed: 0 vs 1\n  tokenizer_fingerprint: \"t1\" vs \"t2\"")
    with pytest.raises(BenchError) as e:
        bench_report.compare([a, tmp_path / "missing"], tmp_path / "cmp")
    assert str(e.value) == (f"{tmp_path / 'missing' / 'report.json'} not found: pass run directories of "
                            "scripts/11_benchmark_serving.py")
    assert not (tmp_path / "cmp.md").exists()


def test_benchmark_protocol_values_compare_as_json_whatever_their_key_order(tmp_path):
    a = _bench(tmp_path, "a", {"slo": {"ttft": 1, "tpot": 2}})
    b = _bench(tmp_path, "b", {"slo": {"tpot": 2, "ttft": 1}})
    c = _bench(tmp_path, "c", {"slo": {"tpot": 2, "ttft": 3}})
    with pytest.raises(BenchError) as e:
        bench_report.compare([a, b, c], tmp_path / "cmp")
    assert str(e.value).endswith('\n  slo: {"ttft": 1, "tpot": 2} vs {"tpot": 2, "ttft": 1} vs {"tpot": 2, "ttft": 3}')
    assert json.loads((a / "report.json").read_text())["config"]["slo"] == {"ttft": 1, "tpot": 2}


def test_benchmark_runs_without_a_fingerprint_or_alone_are_compared(tmp_path):
    a, b = _bench(tmp_path, "a", {"seed": 0}), _bench(tmp_path, "b", {"seed": 0})
    for d in (a, b):
        write_json(d / "bench_summary.json", {})  # written before fingerprints were recorded
    one = bench_report.compare([a], tmp_path / "one")
    assert one.startswith("# Serving benchmark: 1 servers, one workload\n")
    bench_report.compare([a, b], tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert data["differences"] == [] and data["protocol"]["tokenizer_fingerprint"] is None
    assert [r["run_dir"] for r in data["runs"]] == [str(a), str(b)]  # outside the project: as given
