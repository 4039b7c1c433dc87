"""Reports from run directories the real trainer wrote, through the track launchers users run
(bench, optimize, profile, resume on single, ddp, zero2 and zero3_offload with 2 gloo ranks):
every number a report shows is read back from the run's own record."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgelab.report.builders import build, build_all
from forgelab.report.runs import ProtocolError, discover
from forgelab.runs import PROJECT_ROOT, read_json
from helpers import build_cpt, tiny_sets, train_cli


def _train(root: Path, launcher: str, backend: str, model: Path, data: Path, name: str, *sets: str) -> None:
    """One run through a track launcher, as a user starts it, recorded under root/train/."""
    train_cli(backend, *tiny_sets(model, data), "--set", "steps.micro_batch_size=2", *sets, "--run-name", name,
              launcher=f"scripts/train/{launcher}.sh", env={"FORGELAB_RUNS_DIR": str(root)}, timeout=900)


@pytest.fixture(scope="module")
def runs_root(tiny_model_dir, cpt_dir, tmp_path_factory):
    """Run directories written by the real trainer (tiny Llama, KJV blocks): bench runs of two
    protocols, a sweep, profiled ddp and zero3 runs, and the resume track's pair."""
    root = tmp_path_factory.mktemp("report-runs")
    cpt32 = build_cpt(tmp_path_factory.mktemp("cpt32") / "train", tiny_model_dir, seq_len=32)
    short = ("--set", "steps.max_steps=6", "--set", "metrics.steady_skip_steps=2")
    # bench: the same 512 tokens per step for one process (accumulation 4) and two ranks (2)
    for name, backend, accum in (("bench-single", "single", 4), ("bench-ddp", "ddp", 2), ("bench-zero2", "zero2", 2)):
        _train(root, "bench", backend, tiny_model_dir, cpt_dir, name, *short, "--set", f"steps.grad_accum={accum}",
               "--set", "checkpoint.every_steps=6")
    _train(root, "bench", "single", tiny_model_dir, cpt32, "bench-single-seq32", *short,  # another protocol
           "--set", "steps.grad_accum=4")
    # sweep: micro batch x accumulation at a fixed 512 tokens per step
    grid = [{"steps.micro_batch_size": m, "steps.grad_accum": a} for m, a in ((1, 8), (2, 4), (4, 2))]
    _train(root, "optimize", "single", tiny_model_dir, cpt_dir, "opt", "--set", "steps.max_steps=5",
           "--set", "metrics.steady_skip_steps=2", "--set", "sweep.name=opt", "--set", f"sweep.runs={json.dumps(grid)}")
    for name, backend in (("prof-ddp", "ddp"), ("prof-zero3", "zero3_offload")):
        _train(root, "profile", backend, tiny_model_dir, cpt_dir, name, "--set", "steps.grad_accum=2")
    _train(root, "resume", "single", tiny_model_dir, cpt_dir, "res", "--set", "steps.max_steps=6",
           "--set", "resume_check.stop_at=3", "--set", "checkpoint.every_steps=3")
    return root / "train"


def _js(md: Path) -> dict:
    return json.loads(md.with_suffix(".json").read_text())


def test_benchmark_report_families_scaling_and_protocol_split(runs_root, tmp_path):
    md, js = build("benchmark", root=runs_root, out_dir=tmp_path, command="test")
    text, data = md.read_text(), json.loads(js.read_text())
    assert "Native PyTorch" in text and "DeepSpeed" in text
    native = data["families"]["native"]
    assert len(native) == 2  # seq 64 runs vs the seq 32 run
    assert any("seq_len differs" in d for d in data["protocol_splits"])
    assert "seq_len differs" in text
    g = next(x for x in native if x["protocol"]["seq_len"] == 64)
    rows = {x["run"]: x for x in g["rows"]}
    assert set(rows) == {"bench-single", "bench-ddp"}
    # every number is the run's own
    s = json.loads((runs_root / "bench-ddp" / "train_summary.json").read_text())
    assert rows["bench-ddp"]["tokens_per_s_steady"] == s["tokens_per_s_steady"]
    assert rows["bench-ddp"]["predicted_peak_memory_bytes"] == s["estimate"]["predicted"]["peak_memory_bytes"]
    assert rows["bench-ddp"]["checkpoint_bytes"] == s["checkpoints"][0]["bytes"] > 0
    assert rows["bench-ddp"]["memory_measured_over_predicted"] is None  # CPU RSS is not GPU allocator memory
    assert "get no measured/predicted ratio" in text
    eff = g["scaling"][0]
    single = json.loads((runs_root / "bench-single" / "train_summary.json").read_text())
    assert eff["efficiency"] == pytest.approx(s["tokens_per_s_steady"] / (2 * single["tokens_per_s_steady"]))
    assert "Scaling efficiency" in text
    ds_rows = data["families"]["deepspeed"][0]["rows"]
    assert {x["backend"] for x in ds_rows} == {"zero2"}
    for img in data["images"]:
        assert (tmp_path / img).stat().st_size > 1000
    assert "bash scripts/train/bench.sh ddp --set model.path=" in text  # the command the run recorded


def test_named_runs_with_mixed_protocols_are_refused_then_allowed(runs_root, tmp_path):
    with pytest.raises(ProtocolError, match="seq_len differs: bench-single has 64, bench-single-seq32 has 32"):
        build("benchmark", root=runs_root, names=["bench-single", "bench-single-seq32"], out_dir=tmp_path)
    md, _ = build("benchmark", root=runs_root, names=["bench-single", "bench-single-seq32"], out_dir=tmp_path,
                  allow_mixed=True)
    assert "Mixed protocols" in md.read_text()
    assert len(_js(md)["families"]["native"][0]["rows"]) == 2


def test_optimization_report_marks_best_and_shows_knobs(runs_root, tmp_path):
    md, _ = build("optimization", root=runs_root, out_dir=tmp_path)
    data = _js(md)
    g = data["sweeps"]["opt"][0]
    assert g["knobs"] == ["steps.grad_accum", "steps.micro_batch_size"]
    best = max(g["rows"], key=lambda x: x["tokens_per_s_steady"])
    assert best["best"] and sum(x["best"] for x in g["rows"]) == 1
    assert f"**best** {best['run']}" in md.read_text()
    md2, _ = build("optimization", root=runs_root, out_dir=tmp_path, metric="final_loss")
    g2 = _js(md2)["sweeps"]["opt"][0]
    assert next(x for x in g2["rows"] if x["best"])["final_loss"] == min(x["final_loss"] for x in g2["rows"])


def test_resume_report_from_a_real_resume(runs_root, tmp_path):
    md, _ = build("resume", root=runs_root, out_dir=tmp_path)
    v = _js(md)["validations"][0]
    assert v["passed"] and v["identical"] and v["max_abs_diff"] == 0.0  # CPU fp32: bit-identical
    assert v["resume_step"] == 3 and len(v["curve"]) == 6 and v["reference_run"] == "res-uninterrupted"
    assert "**passed**" in md.read_text()
    assert (tmp_path / "img" / "cpt_resume_validation_res-resumed_loss.png").is_file()


def test_profile_and_comms_reports(runs_root, tmp_path):
    md, _ = build("profile", root=runs_root, out_dir=tmp_path)
    rows = _js(md)["groups"][0]["rows"]
    assert {x["run"] for x in rows} == {"prof-ddp", "prof-zero3"}
    assert all(x["forward_ms"] > 0 and x["backward_ms"] > 0 and x["flops_per_step"] > 0 for x in rows)
    md, _ = build("comms", root=runs_root, out_dir=tmp_path)
    data = _js(md)
    ops = {(x["run"], x["op"]): x for x in data["groups"][0]["rows"]}
    for run in ("prof-ddp", "prof-zero3"):  # the report's rows are the run's own measurements
        for c in read_json(runs_root / run / "profile_summary.json")["comms"]:
            assert ops[run, c["op"]]["bytes_per_step"] == c["bytes_per_step"] > 0
    params = read_json(runs_root / "prof-ddp" / "train_summary.json")["model"]["trainable_params"]
    # DDP: every fp32 gradient once per step, plus the step's int64 token count
    assert ops["prof-ddp", "all_reduce"]["bytes_per_step"] == params * 4 + 8
    # ZeRO-3 gathers the fp32 parameters it shards (about the model's size in each step)
    assert ops["prof-zero3", "all_gather"]["bytes_per_step"] == pytest.approx(params * 4, rel=0.01)
    assert "GB/s" in md.read_text()


def test_discover_filters_tracks_and_files(runs_root):
    assert {r.name for r in discover(runs_root, tracks=("profile",))} == {"prof-ddp", "prof-zero3"}
    assert [r.name for r in discover(runs_root, need="resume_validation.json")] == ["res-resumed"]


@pytest.mark.slow
def test_script_builds_all_reports(runs_root, tmp_path):
    out = tmp_path / "reports"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "scripts/12_report.py", "all", "--runs-root", str(runs_root),
                        "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    for kind in ("benchmark", "optimization", "resume_validation", "profile", "comms"):
        assert (out / f"cpt_{kind}.md").is_file() and (out / f"cpt_{kind}.json").is_file()
    p = subprocess.run([sys.executable, "scripts/12_report.py", "benchmark", "--runs-root", str(runs_root),
                        "--out", str(out), "--runs", "bench-single", "bench-single-seq32"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "seq_len differs" in p.stderr
    res = build_all(runs_root, tmp_path / "r2", log=lambda m: None)
    assert set(res["written"]) == {"benchmark", "optimization", "resume", "profile", "comms"}


def test_gpu_performance_report_rebuilds_from_the_committed_run_records(tmp_path):
    """reports/gpu_performance.md is rebuilt from the H200 run records kept in the repository:
    every target is answered by a named run, the floor and the profile sections come from their
    JSON records, and the estimator is re-run on each run's config."""
    from forgelab.report.gpu_performance import build_gpu_performance
    md, js = build_gpu_performance("configs/report/gpu_performance.yaml", out_dir=tmp_path, command="test")
    body = json.loads(js.read_text())
    assert body["device"] == "NVIDIA H200"
    assert all(t["met"] for t in body["targets"].values()), {k: t["measured"] for k, t in body["targets"].items()}
    assert body["targets"]["cpt17_mfu"]["measured"] >= 0.55
    assert body["targets"]["cpt17_vs_trainer"]["loss_agreement"]["steps"] == 14
    text = md.read_text()
    for section in ("## The device's floor", "## Where a tuned step's time goes", "## Memory estimator",
                    "## Packing without cross-contamination"):
        assert section in text
    now = {x["run"]: x["measured_over_now"] for x in body["estimator"]["now"]}
    assert 0.9 <= min(now.values()) and max(now.values()) <= 1.1
    assert (tmp_path / "img" / "gpu_performance_throughput.png").is_file()
