"""The embedded server under load and under failure, on the tiny model: 1,000 requests at
concurrency 32 without a failure; batch inference resumed after a kill without duplicates; a
benchmark whose server dies mid-run reports the failures instead of crashing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from forgelab import config as cfg
from forgelab.runs import PROJECT_ROOT, project_path
from forgelab.serve import server
from forgelab.serve.bench_config import BenchServingConfig
from forgelab.serve.bench_report import run_and_report
from forgelab.serve.config import ServeConfig

pytestmark = pytest.mark.slow
CONFIGS = PROJECT_ROOT / "configs"


def serve_conf(model, name: str, *overrides: str) -> ServeConfig:
    return cfg.load(ServeConfig, [CONFIGS / "serve" / "transformers.yaml"],
                    [f"model={model}", f"port={server.free_port()}", f"name={name}", *overrides])


def bench_conf(name: str, *overrides: str) -> BenchServingConfig:
    return cfg.load(BenchServingConfig, [CONFIGS / "bench" / "default.yaml"], [f"server={name}", *overrides])


@pytest.fixture(scope="module")
def batching_server(tiny_model_dir):
    """transformers serve with continuous batching: without it requests run one by one."""
    with server.running(serve_conf(tiny_model_dir, "test-load", "transformers.continuous_batching=true")) as st:
        yield st


def test_thousand_requests_at_concurrency_32(batching_server):
    t0 = time.time()
    report = run_and_report(bench_conf(
        "test-load", "num_prompts=1000", "max_concurrency=32", "warmup_requests=4",
        "random.input_len=16", "random.output_len=4", "random.range_ratio=0", "request_rate=inf",
        "request_timeout_s=120"), run_name="test-1000", progress=False)
    s = report["summary"]
    print(f"\n1000 requests at concurrency 32: {time.time() - t0:.1f} s wall, "
          f"{s['duration_s']:.1f} s measured, {s['request_throughput']:.2f} req/s, "
          f"TTFT median {s['ttft_ms']['median']:.0f} ms, p99 {s['ttft_ms']['p99']:.0f} ms")
    assert s["failed"] == 0, s.get("first_errors")
    assert s["completed"] == 1000 and s["peak_concurrency"] == 32
    assert 1 <= s["output_len"]["min"] and s["output_len"]["max"] <= 4  # eos may end one early
    assert s["server_alive_after_run"]


def test_time_limited_benchmark_reports_what_it_sent(batching_server):
    """max_duration_s bounds a run (a GPU batch with a fixed budget): requests still queued
    are counted as not sent, never as failures, and the metrics cover those that were sent."""
    report = run_and_report(bench_conf(
        "test-load", "num_prompts=400", "max_concurrency=4", "warmup_requests=1", "request_rate=20",
        "random.input_len=16", "random.output_len=4", "max_duration_s=2"), run_name="test-time-limit",
        progress=False)
    s = report["summary"]
    assert s["failed"] == 0 and 0 < s["completed"] < 400
    assert s["not_sent"] == 400 - s["requests"] > 0
    assert any("not sent" in n for n in s["notes"])


def test_batch_inference_resumes_without_duplicates(batching_server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    n = 100
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}?"}) + "\n"
                               for i in range(n)))
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "scripts/batch_infer.py", "--input", str(prompts), "--output", str(out),
           "--server", "test-load", "--concurrency", "8", "--max-tokens", "4", "--no-progress"]
    first = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 20:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be interrupted"
        first.send_signal(signal.SIGKILL)  # no chance to clean up: the hard case
    finally:
        first.wait(timeout=30)
    lines_before = out.read_text().count("\n")
    assert 20 <= lines_before < n
    second = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{n - lines_before} answered now, {lines_before} were already done" in second.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == n and set(ids) == {f"q{i}" for i in range(n)}
    third = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and f"0 answered now, {n} were already done" in third.stderr


N_KILLED = 1000  # requests of the benchmark whose server is killed; the rest fail fast (connection refused)


def test_benchmark_reports_a_server_that_dies_mid_run(tiny_model_dir, tmp_path):
    conf = serve_conf(tiny_model_dir, "test-victim")
    env = dict(os.environ)
    with server.running(conf) as state:
        bench = subprocess.Popen(
            [sys.executable, "scripts/11_benchmark_serving.py", "--set", "server=test-victim",
             "--set", f"num_prompts={N_KILLED}", "--set", "max_concurrency=4", "--set", "warmup_requests=1",
             "--set", "random.output_len=16", "--set", "random.range_ratio=0",
             "--run-name", "test-killed", "--no-progress"],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_log = project_path(os.environ["FORGELAB_RUNS_DIR"]) / "bench_serving" / "test-killed" / "run.log"
        deadline = time.time() + 180
        while time.time() < deadline and bench.poll() is None:
            if run_log.exists() and f"measuring {N_KILLED} requests" in run_log.read_text():
                break
            time.sleep(0.1)
        # let some requests complete: the tiny model answers 20+ per second, so 3 s finish some and
        # never all (80 requests did all finish in 4 s once)
        time.sleep(3)
        os.killpg(state["pgid"], signal.SIGKILL)  # the server crashes
        output, _ = bench.communicate(timeout=300)
    assert bench.returncode == 0, output[-3000:]  # some requests completed: a normal exit
    report = json.loads((run_log.parent / "report.json").read_text())
    s = report["summary"]
    assert 0 < s["completed"] < N_KILLED and s["completed"] + s["failed"] == N_KILLED
    assert s["failures_by_kind"].get("connection", 0) >= 1
    assert not s["server_alive_after_run"]
    md = (run_log.parent / "report.md").read_text()
    assert "The server stopped answering during the run" in md and "## Failures" in md
