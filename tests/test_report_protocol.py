"""The protocol rule of the reports, key by key ("Reports refuse cross-protocol comparisons").

Training reports (forgelab.report.runs.PROTOCOL_KEYS: data fingerprint, sequence length, tokens
per step): two run directories written by the real trainer (scripts/train.py's entry point, a
tiny Llama, 3 steps of micro batch 1) -- one with grad_accum 1, one with grad_accum 2, a real run
with twice the tokens per step -- and copies of the first whose train_summary.json is edited in
one key. For every key the named-runs report is refused naming that key and both values,
--allow-mixed-protocols (allow_mixed=True) compares them and shows the difference, and an
unnamed report puts them in separate tables saying why.

Serving benchmark (forgelab.serve.bench_report.PROTOCOL_KEYS plus the tokenizer fingerprint):
run directories written by the benchmark's own writers (Run + write_report, as run_and_report
does) from recorded request results, one per protocol key with only that setting changed.
`compare` refuses each naming the key, and accepts identical runs or --force (force=True)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forgelab import config as cfg
from forgelab.report import runs as report_runs
from forgelab.report.builders import build
from forgelab.report.runs import ProtocolError, load_run, protocol_differences
from forgelab.runs import PROJECT_ROOT, Run, fingerprint_paths, read_json, write_json
from forgelab.serve import bench_report
from forgelab.serve.bench import BenchError, RequestResult, summarize
from forgelab.serve.bench_config import BenchServingConfig

from helpers import KJV, PY, runs_dir, tiny_sets, train_inproc

# ============================================================================= training reports

TRAIN_KEYS = ("data_fingerprint", "seq_len", "tokens_per_step")
BASE = "proto-base"


def _set(d: dict, dotted: str, value) -> None:
    *parts, last = dotted.split(".")
    for p in parts:
        d = d[p]
    assert last in d, f"train_summary.json has no key {dotted!r}: the edit would not stand for a real run"
    d[last] = value


def _variant(src: Path, dst: Path, edits: dict) -> Path:
    shutil.copytree(src, dst)
    s = read_json(dst / "train_summary.json")
    for k, v in edits.items():
        _set(s, k, v)
    write_json(dst / "train_summary.json", s)
    return dst


@pytest.fixture(scope="module")
def trained(tiny_model_dir, cpt_dir) -> dict[str, Path]:
    """Two real bench-track runs through the training entry point, 3 steps of micro batch 1:
    grad_accum 1 (64 tokens per step) and grad_accum 2 (128 tokens per step)."""
    out = {}
    for name, accum in ((BASE, 1), ("proto-accum2", 2)):
        train_inproc("--config", "configs/train/cpt.yaml", "--config", "configs/train/tracks/bench.yaml",
                     *tiny_sets(tiny_model_dir, cpt_dir), "--set", "steps.max_steps=3",
                     "--set", "steps.micro_batch_size=1", "--set", f"steps.grad_accum={accum}",
                     "--set", "metrics.steady_skip_steps=1", "--run-name", name)
        out[name] = runs_dir() / name
    return out


@pytest.fixture(scope="module")
def variants(trained, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """key -> (a runs root holding the base run and one run differing from it in that key only,
    that run's name)."""
    base = trained[BASE]
    s = read_json(base / "train_summary.json")
    assert s["seq_len"] == 64 and s["global_batch"] == 1 and s["tokens_per_step_capacity"] == 64
    out = {}
    # data_fingerprint: stands for a run on other tokenized data of the same shape (the
    # fingerprint of another real file; both places the summary records it)
    other_fp = fingerprint_paths([KJV])
    assert other_fp != s["fingerprint"]["data_fingerprint"]
    edits = {"data_fingerprint": ("proto-otherdata", {"fingerprint.data_fingerprint": other_fp,
                                                      "data.data_fingerprint": other_fp}),
             # seq_len: stands for a run on 32-token blocks with global batch 2, so that the tokens
             # per step stay 64 and only the sequence length differs
             "seq_len": ("proto-seq32", {"seq_len": 32, "data.seq_len": 32, "global_batch": 2})}
    for key, (name, e) in edits.items():
        root = tmp_path_factory.mktemp(f"proto-{key}")
        shutil.copytree(base, root / BASE)
        _variant(base, root / name, e)
        out[key] = (root, name)
    # tokens_per_step: the real grad_accum 2 run, no edit
    root = tmp_path_factory.mktemp("proto-tokens_per_step")
    shutil.copytree(base, root / BASE)
    shutil.copytree(trained["proto-accum2"], root / "proto-accum2")
    out["tokens_per_step"] = (root, "proto-accum2")
    # identical protocol: the base run again under another name (a rerun)
    root = tmp_path_factory.mktemp("proto-same")
    shutil.copytree(base, root / BASE)
    shutil.copytree(base, root / "proto-rerun")
    out["same"] = (root, "proto-rerun")
    return out


def _expected_diff(root: Path, other: str, key: str, first: str = BASE) -> str:
    """The one difference the report must name, runs in the order the report sees them."""
    second = other if first == BASE else BASE
    a, b = load_run(root / first), load_run(root / second)
    diffs = protocol_differences(a, b)
    assert diffs == [f"{key} differs: {first} has {a.protocol[key]!r}, {second} has {b.protocol[key]!r}"], \
        f"the two runs must differ in {key} only: {diffs}"
    return diffs[0]


def test_every_training_protocol_key_is_tested():
    assert set(TRAIN_KEYS) == set(report_runs.PROTOCOL_KEYS)


@pytest.mark.parametrize("kind", ["benchmark", "optimization"])
@pytest.mark.parametrize("key", TRAIN_KEYS)
def test_named_runs_differing_in_one_key_are_refused(variants, key, kind, tmp_path):
    root, other = variants[key]
    diff = _expected_diff(root, other, key)
    with pytest.raises(ProtocolError, match=re.escape(diff)) as e:
        build(kind, root=root, names=[BASE, other], out_dir=tmp_path)
    assert "--allow-mixed-protocols" in str(e.value)
    assert not list(tmp_path.glob("*.md"))  # refused: nothing written


@pytest.mark.parametrize("key", TRAIN_KEYS)
def test_allow_mixed_compares_them_and_shows_the_difference(variants, key, tmp_path):
    root, other = variants[key]
    diff = _expected_diff(root, other, key)
    md, js = build("benchmark", root=root, names=[BASE, other], out_dir=tmp_path, allow_mixed=True)
    text, data = md.read_text(), json.loads(js.read_text())
    assert "**Mixed protocols**" in text and f"> - {diff}" in text
    assert data["mixed_protocols"] == [diff] and "protocol_splits" not in data
    (group,) = data["families"]["native"]  # one table with both runs
    assert {r["run"] for r in group["rows"]} == {BASE, other}


@pytest.mark.parametrize("key", TRAIN_KEYS)
def test_unnamed_runs_are_put_in_separate_tables_naming_the_key(variants, key, tmp_path):
    root, other = variants[key]
    diff = _expected_diff(root, other, key, first=min(BASE, other))  # runs found in name order
    md, js = build("benchmark", root=root, out_dir=tmp_path)  # every bench-track run under root
    text, data = md.read_text(), json.loads(js.read_text())
    assert data["protocol_splits"] == [diff] and f"> - {diff}" in text
    assert "Mixed protocols" not in text
    groups = data["families"]["native"]
    assert sorted(tuple(r["run"] for r in g["rows"]) for g in groups) == sorted([(BASE,), (other,)])


def test_runs_of_one_protocol_are_compared(variants, tmp_path):
    root, other = variants["same"]
    assert protocol_differences(load_run(root / BASE), load_run(root / other)) == []
    md, js = build("benchmark", root=root, names=[BASE, other], out_dir=tmp_path)
    text, data = md.read_text(), json.loads(js.read_text())
    assert "Mixed protocols" not in text and "mixed_protocols" not in data and "protocol_splits" not in data
    (group,) = data["families"]["native"]
    assert {r["run"] for r in group["rows"]} == {BASE, other}
    s = read_json(root / BASE / "train_summary.json")
    assert f"data `{s['fingerprint']['data_fingerprint']}`, sequence length 64, 64 tokens" in text


def test_report_script_refuses_with_exit_2_then_allows(variants, tmp_path):
    root, other = variants["data_fingerprint"]
    diff = _expected_diff(root, other, "data_fingerprint")
    cmd = [PY, "scripts/12_report.py", "benchmark", "--runs-root", str(root), "--runs", BASE, other,
           "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "report refused:" in r.stderr and diff in r.stderr, r.stderr[-2000:]
    r = subprocess.run(cmd + ["--allow-mixed-protocols"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert diff in (tmp_path / "cpt_benchmark.md").read_text()


# ============================================================================= serving benchmark

CONV = "data/cleaned/sft/val.jsonl"
BASE_BENCH = {"num_prompts": 3, "warmup_requests": 0, "slo": {"ttft": 200.0}, "max_concurrency": 0,
              "conversations": {"path": CONV}}
TOK_FP = "c09bf4d012673354"  # the tokenizer fingerprint of reports/serving_benchmark_backends.json
# key -> the setting of a run that differs from the base run in that key only
BENCH_VARIANTS = {
    "workload": {"workload": "conversations"},
    "random": {"random": {"input_len": 64}},
    "conversations": {"conversations": {"path": CONV, "max_prompt_tokens": 512}},
    "num_prompts": {"num_prompts": 4},
    "warmup_requests": {"warmup_requests": 1},
    "request_rate": {"request_rate": "4"},
    "burstiness": {"burstiness": 0.5},
    "max_concurrency": {"max_concurrency": 2},
    "temperature": {"temperature": 0.7},
    "seed": {"seed": 1},
    "slo": {"slo": {"ttft": 500.0}},
    "adapters": {"adapters": ["base", "math"]},  # a mixed-adapter workload
    "tokenizer_fingerprint": {},  # the same settings, another tokenizer (see _bench_run)
}


def _bench_run(root: Path, name: str, overrides: dict, tok_fp: str = TOK_FP) -> Path:
    """A benchmark run directory as run_and_report writes it (bench_summary.json through Run,
    report.json/report.md through write_report), from recorded request results."""
    c = cfg.build(BenchServingConfig, {**BASE_BENCH, **overrides})
    results = [RequestResult(i, ok=True, start=0.1 * i, ttft=0.1, latency=0.3, itl=[0.05, 0.1],
                             prompt_tokens=8, output_tokens=3, tokens_from="usage",
                             chunk_times=[0.1 * i + 0.1, 0.1 * i + 0.2, 0.1 * i + 0.3]) for i in range(3)]
    with Run("bench_serving", c, name, summary_name="bench_summary.json", runs_root=root) as run:
        run.tokenizer_fingerprint = tok_fp
        summary = summarize(results, duration=1.0, conf=c) | {
            "notes": [], "server_alive_after_run": True, "request_profile": "vllm",
            "request_extras": {"ignore_eos": True}, "concurrency_limit": 3, "not_sent": 0}
        context = {"title": name, "date": "2026-01-01T00:00:00+00:00", "command": "python scripts/11.py",
                   "server": {"url": "http://127.0.0.1:8000/v1", "backend": "vllm", "model": "model/x"},
                   "device": {"cpu_count": 2}, "tokenizer": "model/x",
                   "load_average_1m": {"before": 0.1, "after": 0.2}}
        report = {"context": context, "config": cfg.to_dict(c), "summary": summary}
        md = bench_report.write_report(report, {}, run.dir, "report", img_prefix="bench")
        run.summary.update(summary=summary, context=context, outputs=[str(md)])
    return run.dir


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-records")
    out = {"base": _bench_run(root, "base", {}), "rerun": _bench_run(root, "rerun", {})}
    for key, over in BENCH_VARIANTS.items():
        out[key] = _bench_run(root, f"v-{key}", over, tok_fp="0f1e2d3c4b5a6978" if key == "tokenizer_fingerprint"
                              else TOK_FP)
    return out


def _bench_values(d: Path, key: str):
    if key == "tokenizer_fingerprint":
        return read_json(d / "bench_summary.json")["fingerprint"]["tokenizer_fingerprint"]
    return read_json(d / "report.json")["config"][key]


def test_every_serving_protocol_key_is_tested():
    assert set(BENCH_VARIANTS) == set(bench_report.PROTOCOL_KEYS) | {"tokenizer_fingerprint"}


@pytest.mark.parametrize("key", list(BENCH_VARIANTS))
def test_benchmark_runs_differing_in_one_key_are_refused(bench_runs, key, tmp_path):
    a, b = bench_runs["base"], bench_runs[key]
    va, vb = _bench_values(a, key), _bench_values(b, key)
    assert va != vb
    diff = f"{key}: {json.dumps(va)} vs {json.dumps(vb)}"
    with pytest.raises(BenchError) as e:
        bench_report.compare([a, b], tmp_path / "cmp")
    msg = str(e.value)
    assert msg.startswith("runs measured different things, refusing to compare them (--force")
    assert msg.splitlines()[1:] == [f"  {diff}"]  # this key and no other
    assert not (tmp_path / "cmp.md").exists()


@pytest.mark.parametrize("key", list(BENCH_VARIANTS))
def test_force_compares_them_and_shows_the_difference(bench_runs, key, tmp_path):
    a, b = bench_runs["base"], bench_runs[key]
    diff = f"{key}: {json.dumps(_bench_values(a, key))} vs {json.dumps(_bench_values(b, key))}"
    md = bench_report.compare([a, b], tmp_path / "cmp", force=True)
    assert f"**Compared despite protocol differences:** {diff}" in md
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert data["differences"] == [diff] and len(data["runs"]) == 2


def test_identical_benchmark_runs_are_compared(bench_runs, tmp_path):
    md = bench_report.compare([bench_runs["base"], bench_runs["rerun"]], tmp_path / "cmp")
    assert "Compared despite" not in md and md.count("| vllm |") == 2
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert data["differences"] == [] and data["protocol"]["tokenizer_fingerprint"] == TOK_FP
    assert data["protocol"]["slo"] == {"ttft": 200.0}


def test_benchmark_script_compare_refuses_with_exit_2_then_forces(bench_runs, tmp_path):
    a, b = bench_runs["base"], bench_runs["seed"]
    cmd = [PY, "scripts/11_benchmark_serving.py", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]
    r = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "refusing to compare" in r.stderr and "seed: 0 vs 1" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(cmd + ["--force"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "**Compared despite protocol differences:** seed: 0 vs 1" in (tmp_path / "cmp.md").read_text()
