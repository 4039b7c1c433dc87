"""Exact resume: a run killed (SIGKILL) mid-way, or while a checkpoint is being written,
continues with checkpoint.resume=auto and reproduces the uninterrupted loss curve to the bit;
the resume track writes resume_validation.json."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from forgelab.runs import PROJECT_ROOT, read_json
from helpers import PY, metrics, runs_dir, tiny_sets, train_cli, train_inproc

pytestmark = pytest.mark.slow

N, EVERY = 30, 6  # optimizer steps, checkpoint interval


def _args(model, data, name):
    return ["--config", "configs/train/cpt.yaml", *tiny_sets(model, data), "--set", f"steps.max_steps={N}",
            "--set", "steps.micro_batch_size=1", "--set", "steps.grad_accum=2", "--set", "optim.warmup_steps=4",
            "--set", f"checkpoint.every_steps={EVERY}",
            "--set", "checkpoint.keep_last=2", "--set", "checkpoint.save_final=false", "--run-name", name]


def _curve(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"]) for r in metrics(run)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, cpt_dir):
    train_inproc(*_args(tiny_model_dir, cpt_dir, "t-ref"))
    curve = _curve(runs_dir() / "t-ref")
    assert [c[0] for c in curve] == list(range(1, N + 1))
    return curve


def _start(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.Popen([PY, str(PROJECT_ROOT / "scripts/train.py"), *args], env=e, cwd=PROJECT_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc, ready, timeout=300):
    t0 = time.time()
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before the kill point")
            if time.time() - t0 > timeout:
                raise AssertionError("kill point not reached in time")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [int(x.split('"step": ')[1].split(",")[0]) for x in lines if '"step": ' in x]
    return max(steps, default=0)


def test_sigkill_mid_run_then_auto_resume_continues_the_exact_curve(tiny_model_dir, cpt_dir, reference):
    run = runs_dir() / "t-kill"
    args = _args(tiny_model_dir, cpt_dir, "t-kill")
    _kill_when(_start(args), lambda: _last_step(run) >= 15)
    killed_at = _last_step(run)
    assert 15 <= killed_at < N
    complete = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert complete and max(complete) <= killed_at
    train_inproc(*args, "--set", "checkpoint.resume=auto", "--set", "checkpoint.overwrite=false")
    s = read_json(run / "train_summary.json")
    assert s["resume"]["step"] == max(complete)
    assert s["resume"]["from_checkpoint"].endswith(f"checkpoint-{max(complete)}")
    assert s["resume"]["tokens"] == max(complete) * 2 * 64  # micro 1 x accumulation 2 x seq 64
    assert s["steps"] == N and s["steps_this_session"] == N - max(complete)
    assert _curve(run) == reference  # loss, lr, grad norm and tokens: bit for bit, no step twice or missing
    assert "resuming from" in (run / "run.log").read_text()


def test_sigkill_during_a_checkpoint_save_is_ignored_and_cleaned(tiny_model_dir, cpt_dir, reference):
    run = runs_dir() / "t-killsave"
    args = _args(tiny_model_dir, cpt_dir, "t-killsave")
    staged = run / ".staging-checkpoint-12" / "checkpoint-12" / "trainer_state.json"
    _kill_when(_start(args, {"FORGELAB_SAVE_DELAY_S": "300", "FORGELAB_SAVE_DELAY_STEP": "12"}), staged.is_file)
    assert not (run / "checkpoint-12").exists() and (run / "checkpoint-6" / "trainer_state.json").is_file()
    train_inproc(*args, "--set", "checkpoint.resume=auto", "--set", "checkpoint.overwrite=false")
    s = read_json(run / "train_summary.json")
    assert s["resume"]["step"] == 6
    assert not list(run.glob(".staging-*"))
    assert "removed unfinished save .staging-checkpoint-12" in (run / "run.log").read_text()
    assert _curve(run) == reference
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-24", "checkpoint-30"]


def test_resume_track_writes_the_validation_report(tiny_model_dir, sft_dir):
    """LoRA dropout makes the RNG state part of what a resume must restore."""
    r = train_cli("single", "--task", "sft_lora", *tiny_sets(tiny_model_dir, sft_dir),
                  "--set", "steps.max_steps=8", "--set", "resume_check.stop_at=4", "--set", "checkpoint.every_steps=2",
                  "--set", "lora.r=4", "--set", "lora.dropout=0.1", "--set", "steps.micro_batch_size=1",
                  "--run-name", "t-rtrack", launcher="scripts/train/resume.sh")
    resumed = runs_dir() / "t-rtrack-resumed"
    v = read_json(resumed / "resume_validation.json")
    assert v["steps_compared"] == 8 and v["missing_steps"] == [] and v["resumed_step"] == 4
    assert v["identical"] is True and v["max_abs_diff"] == 0.0 and v["tolerance"] == 0.0 and v["passed"] is True
    assert v["resumed_from"].endswith("checkpoint-4") and v["uninterrupted_run"].endswith("t-rtrack-uninterrupted")
    stage1 = read_json(resumed / "train_summary.step4.json")
    assert stage1["stopped_early"] is True and stage1["final_model"] is None
    s = read_json(resumed / "train_summary.json")
    assert s["track"] == "resume" and s["resume"]["step"] == 4 and (resumed / "final" / "adapter_config.json").is_file()
    assert "resume validation" in r.stderr
