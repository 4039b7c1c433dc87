"""Faults that real machines have, injected for real on CPU runs of the tiny model: a corrupt
latest checkpoint (truncated and bit-flipped files), a full disk during a save (a small tmpfs
made here), two launches with the same run name, and SIGTERM mid-run, during a save and with
two ranks. Each asserts the clear message, that nothing is lost, and the resumed curve.
docs/reliability.md states the guarantees these tests hold the lab to."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from forgelab import config as cfg
from forgelab import manifest
from forgelab.runs import PROJECT_ROOT, read_json
from forgelab.train import checkpoint as ckpt
from helpers import PY, metrics, runs_dir, tiny_sets, train_inproc

pytestmark = pytest.mark.slow

N = 8  # optimizer steps of every run here


def _args(model, data, name, *extra):
    return ["--config", "configs/train/cpt.yaml", *tiny_sets(model, data), "--set", f"steps.max_steps={N}",
            "--set", "steps.micro_batch_size=2", "--set", "steps.grad_accum=1", "--set", "optim.warmup_steps=2",
            "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep_last=3",
            "--set", "checkpoint.save_final=false", "--set", "metrics.tensorboard=false", *extra, "--run-name", name]


def _curve(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metrics(run)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, cpt_dir):
    train_inproc(*_args(tiny_model_dir, cpt_dir, "f-ref"))
    return _curve(runs_dir() / "f-ref")


def _launch(args, backend="single", env=None, **kw):
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    if backend != "single":
        args = [*args, "--config", f"configs/train/backends/{backend}.yaml"]
    return subprocess.Popen([PY, str(PROJECT_ROOT / "scripts/train.py"), *args], env=e, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(proc, ready, timeout=300):
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"run ended (rc {proc.returncode}) before the point waited for:\n{out[-3000:]}")
        assert time.time() - t0 < timeout, "point not reached in time"
        time.sleep(0.05)


def _steps_logged(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len([x for x in p.read_text().splitlines() if x.strip()]) if p.is_file() else 0


# ----------------------------------------------------------------------------- 1. corrupt checkpoints

def test_a_corrupt_latest_checkpoint_is_skipped_and_the_curve_continues(tiny_model_dir, cpt_dir, reference):
    name = "f-corrupt"
    train_inproc(*_args(tiny_model_dir, cpt_dir, name, "--set", "steps.stop_after_steps=6"))
    run = runs_dir() / name
    assert [p.name for _, p in ckpt.complete_checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(manifest.verify(p)[0] == "ok" for _, p in ckpt.complete_checkpoints(run))
    weights = run / "checkpoint-6" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # a bad copy: half the file
        f.truncate(size // 2)
    train_inproc(*_args(tiny_model_dir, cpt_dir, name, "--set", "checkpoint.resume=auto"))
    s = read_json(run / "train_summary.json")
    assert s["outcome"] == "ok" and s["resume"]["step"] == 4
    log = (run / "run.log").read_text()
    assert "skipped checkpoint-6 (model.safetensors has" in log and f"the manifest says {size:,}" in log
    assert _curve(run) == reference  # steps 5-8 redone from checkpoint-4: the same curve to the bit


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"])
def test_a_bit_flip_in_any_checkpoint_file_is_detected(tiny_model_dir, cpt_dir, reference, tmp_path, victim):
    good = runs_dir() / "f-ref" / "checkpoint-8"
    copy = tmp_path / "run" / "checkpoint-8"
    shutil.copytree(good, copy)
    f = copy / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    f.write_bytes(bytes(data))
    ok, why = ckpt.check(copy)
    assert not ok and why == f"{victim} has other contents than when it was saved (sha256 differs)"
    with pytest.raises(cfg.ConfigError, match=f"does not match its manifest: {victim}"):
        ckpt.resolve_resume(str(copy), tmp_path / "run", lambda p: Path(p))
    with pytest.raises(cfg.ConfigError, match="auto found no checkpoint in .* that matches its manifest"):
        ckpt.resolve_resume("auto", tmp_path / "run", lambda p: Path(p))


# ----------------------------------------------------------------------------- 2. a full disk

@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        ok = os.environ.get("FORGELAB_TEST_NO_MOUNT") is None and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    except OSError:  # no mount command
        ok = False
    if not ok:
        yield None  # no mounting here: the test injects the error instead
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_during_a_save_fails_clearly_and_keeps_the_earlier_checkpoint(tiny_model_dir, cpt_dir,
                                                                                  small_fs, monkeypatch, reference):
    name = "f-full"
    if small_fs is None:
        # where no filesystem can be mounted: the second save's manifest write hits ENOSPC
        real, calls = manifest.write_manifest, []

        def full(d, hash="sha256"):
            calls.append(d)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(d, hash)
        monkeypatch.setattr(manifest, "write_manifest", full)
        with pytest.raises(ckpt.CheckpointError, match="checkpoint-4 could not be saved: the disk is full"):
            train_inproc(*_args(tiny_model_dir, cpt_dir, name))
        run, out = runs_dir() / name, ""
    else:
        runs = small_fs / "runs"
        p = _launch(_args(tiny_model_dir, cpt_dir, name), env={"FORGELAB_RUNS_DIR": str(runs)})
        out = p.communicate(timeout=600)[0]
        run = runs / "train" / name
        assert p.returncode == 1, out[-3000:]
        # one clear line, no traceback; the free space and what is intact are named
        line = [x for x in out.splitlines() if x.startswith("error: ")]
        assert line and "checkpoint-4 could not be saved: the disk is full (no space left on device)" in line[0]
        assert "MiB free on" in line[0] and "checkpoint-2 intact" in line[0] and "Traceback" not in out
        assert "disk:" in (run / "run.log").read_text()  # the pre-flight warned that keep_last + 1 would not fit
    s = read_json(run / "train_summary.json")
    assert s["outcome"] == "failed" and "CheckpointError" in s["error"] and "disk is full" in s["error"]
    assert [p.name for _, p in ckpt.complete_checkpoints(run)] == ["checkpoint-2"]
    assert ckpt.check(run / "checkpoint-2")[0] and not ckpt.staging_dirs(run)
    assert not [f for f in run.rglob("*") if ".tmp" in f.name]
    # nothing lost: resumed from checkpoint-2 (saving no more checkpoints on the still-full disk),
    # the run ends on the same curve
    again = _args(tiny_model_dir, cpt_dir, name, "--set", "checkpoint.resume=auto", "--set", "checkpoint.every_steps=0")
    if small_fs is None:
        monkeypatch.undo()
        train_inproc(*again)
    else:
        p = _launch(again, env={"FORGELAB_RUNS_DIR": str(runs)})
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    assert read_json(run / "train_summary.json")["resume"]["step"] == 2 and _curve(run) == reference
    if small_fs is not None:
        # and a disk that cannot hold even one checkpoint is refused before training starts
        shutil.rmtree(run)
        with open(small_fs / "filler", "wb") as f:
            f.write(b"\0" * (40 << 20))
        p = _launch(_args(tiny_model_dir, cpt_dir, "f-full2"), env={"FORGELAB_RUNS_DIR": str(runs)})
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 1 and "needs about" in out and "checkpoint.disk_check=false" in out, out[-2000:]
        assert not (runs / "train" / "f-full2" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- 3. two launches, one run dir

def test_a_second_launch_with_the_same_run_name_is_refused(tiny_model_dir, cpt_dir):
    name = "f-twice"
    run = runs_dir() / name
    # the first run pauses 20 s inside its step-2 save: the second starts while it holds the run dir
    first = _launch(_args(tiny_model_dir, cpt_dir, name), env={"FORGELAB_SAVE_DELAY_S": "20",
                                                               "FORGELAB_SAVE_DELAY_STEP": "2"})
    _wait_for(first, lambda: (run / "run.log").is_file() and "pausing inside" in (run / "run.log").read_text())
    second = _launch(_args(tiny_model_dir, cpt_dir, name))
    out2 = second.communicate(timeout=300)[0]
    out1 = first.communicate(timeout=600)[0]
    assert second.returncode == 1 and f"is in use by pid {first.pid} on" in out2, out2[-2000:]
    assert first.returncode == 0, out1[-3000:]
    assert [r["step"] for r in metrics(run)] == list(range(1, N + 1))  # one run's lines, none interleaved
    assert not (run / ".lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_model_dir, cpt_dir):
    name = "f-stale"
    run = runs_dir() / name
    run.mkdir(parents=True)
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                           "since": "earlier", "command": "a killed run"}))
    p = _launch(_args(tiny_model_dir, cpt_dir, name, "--set", "steps.max_steps=3", "--set", "checkpoint.every_steps=0"))
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "took over the stale lock" in out, out[-2000:]


# ----------------------------------------------------------------------------- 4. preemption

def _sigterm_and_resume(tiny_model_dir, cpt_dir, reference, name, when, backend="single", env=None,
                        expect_step=None):
    run = runs_dir() / name
    p = _launch(_args(tiny_model_dir, cpt_dir, name), backend=backend, env=env)
    _wait_for(p, lambda: when(run))
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    s = read_json(run / "train_summary.json")
    stop = s["interrupted"]
    assert s["outcome"] == "interrupted" and stop["signal"] == "SIGTERM" and s["steps"] == stop["step"] < N
    if expect_step is not None:
        assert stop["step"] == expect_step
    assert Path(stop["checkpoint"]).name == f"checkpoint-{stop['step']}" and ckpt.check(Path(stop["checkpoint"]))[0]
    assert "SIGTERM received: stopping after this step with a checkpoint" in (run / "run.log").read_text()
    # resume continues the exact curve
    r = _launch(_args(tiny_model_dir, cpt_dir, name, "--set", "checkpoint.resume=auto"), backend=backend)
    out = r.communicate(timeout=600)[0]
    assert r.returncode == 0, out[-3000:]
    assert read_json(run / "train_summary.json")["resume"]["step"] == stop["step"]
    return stop


# a pause in the step-6 save keeps a fast machine from finishing before the signal lands
LATE_PAUSE = {"FORGELAB_SAVE_DELAY_S": "10", "FORGELAB_SAVE_DELAY_STEP": "6"}


def test_sigterm_mid_run_saves_and_the_resumed_curve_is_exact(tiny_model_dir, cpt_dir, reference):
    _sigterm_and_resume(tiny_model_dir, cpt_dir, reference, "f-term", lambda run: _steps_logged(run) >= 3,
                        env=LATE_PAUSE)
    assert _curve(runs_dir() / "f-term") == reference


def test_sigterm_during_a_save_finishes_it_then_stops(tiny_model_dir, cpt_dir, reference):
    def saving(run):
        return (run / "run.log").is_file() and "pausing inside" in (run / "run.log").read_text()
    stop = _sigterm_and_resume(tiny_model_dir, cpt_dir, reference, "f-term-save", saving,
                               env={"FORGELAB_SAVE_DELAY_S": "4", "FORGELAB_SAVE_DELAY_STEP": "2"}, expect_step=3)
    # checkpoint-2 was completed, then the next step ended with the stop
    assert stop["step"] == 3 and ckpt.check(runs_dir() / "f-term-save" / "checkpoint-2")[0]
    assert _curve(runs_dir() / "f-term-save") == reference


def test_sigterm_with_two_ranks_stops_both_at_the_same_step(tiny_model_dir, cpt_dir):
    name = "f-term-ddp"
    ref = "f-ref-ddp"
    p = _launch(_args(tiny_model_dir, cpt_dir, ref), backend="ddp")
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-3000:]
    reference = _curve(runs_dir() / ref)
    _sigterm_and_resume(tiny_model_dir, cpt_dir, reference, name, lambda run: _steps_logged(run) >= 3, backend="ddp",
                        env=LATE_PAUSE)
    assert _curve(runs_dir() / name) == reference
    ck = [p for _, p in ckpt.complete_checkpoints(runs_dir() / name)][-1]
    assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file()
