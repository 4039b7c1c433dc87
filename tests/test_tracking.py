"""Experiment tracking: a real 3-step run with the MLflow and W&B trackers on, read back through
MLflow's own client and W&B's own record protobufs, checked against metrics.jsonl; a resumed
run that continues the same MLflow run and W&B run id; config errors for an unknown tracker."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import yaml

from forgelab import config as cfg
from forgelab.runs import project_path, read_json
from forgelab.train.config import TrainConfig
from helpers import metrics, runs_dir, tiny_sets, train_inproc

STEPS = 3


def _train(model, data, name, *extra):
    train_inproc("--config", "configs/train/cpt.yaml", *tiny_sets(model, data), "--set", "steps.micro_batch_size=2",
                 "--set", "steps.grad_accum=1", "--set", "optim.warmup_steps=1", "--set", "optim.lr=3e-4",
                 "--set", "seed=7", "--set", "checkpoint.save_final=false",
                 "--set", "metrics.trackers=[mlflow, wandb]", *extra, "--run-name", name)
    return runs_dir() / name


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, cpt_dir) -> Path:
    return _train(tiny_model_dir, cpt_dir, "t-tracking", "--set", f"steps.max_steps={STEPS}")


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 asks for it to read a file store
    return MlflowClient(uri)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run)}


@pytest.mark.slow
def test_mlflow_run_has_the_config_and_the_loss_curve(tracked_run):
    s = read_json(tracked_run / "train_summary.json")
    uri = s["trackers"]["mlflow"]
    assert uri == (tracked_run / "mlruns").resolve().as_uri() and s["trackers"]["tensorboard"] == "tb"
    client = _mlflow_client(uri)
    run_id = read_json(tracked_run / "trackers.json")["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t-tracking"
    assert client.get_experiment(run.info.experiment_id).name == "forgelab"
    p = run.data.params
    assert p["seed"] == "7" and float(p["optim.lr"]) == 3e-4 and p["steps.max_steps"] == str(STEPS)
    assert p["metrics.trackers"] == json.dumps(["mlflow", "wandb"])
    assert run.data.tags["forgelab.stage"] == "train" and run.data.tags["forgelab.run_name"] == "t-tracking"
    history = client.get_metric_history(run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(_losses(tracked_run), rel=1e-6)
    assert len(history) == STEPS
    assert {m.step for m in client.get_metric_history(run_id, "train/lr")} == set(range(1, STEPS + 1))


def _wandb_records(path: Path):
    """The records of an offline .wandb file, decoded with W&B's own Record protobuf.

    wandb 0.31 no longer ships a Python reader (its Go core reads these files), so the framing is
    read here: a 7-byte header (':W&B', magic, version), then LevelDB log chunks in 32 KiB blocks,
    each a 7-byte header (crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) and its data.
    """
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or kind == 0:  # a block's zero-filled trailer
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            yield rec


@pytest.mark.slow
def test_wandb_offline_run_has_the_config_and_the_loss_curve(tracked_run):
    s = read_json(tracked_run / "train_summary.json")
    sync_dir = Path(s["trackers"]["wandb"])
    assert sync_dir.parent == tracked_run / "wandb" / "wandb" and sync_dir.name.startswith("offline-run-")
    run_id = read_json(tracked_run / "trackers.json")["wandb"]["run_id"]
    (wandb_file,) = sync_dir.glob("run-*.wandb")
    assert wandb_file.name == f"run-{run_id}.wandb"
    history, config, exit_code = {}, {}, None
    for rec in _wandb_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            assert rec.run.run_id == run_id and rec.run.display_name == "t-tracking"
            assert rec.run.project == "forgelab"
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[row["_step"]] = row
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    assert exit_code == 0
    assert {k: v["train/loss"] for k, v in history.items()} == pytest.approx(_losses(tracked_run), rel=1e-6)
    assert all("train/lr" in row and "memory/rss" in row for row in history.values())
    # the resolved config, nested as in config.yaml
    resolved = yaml.safe_load((tracked_run / "config.yaml").read_text())
    assert config["seed"] == 7 and config["optim"]["lr"] == 3e-4
    assert {k: config[k] for k in resolved} == json.loads(json.dumps(resolved))


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_mlflow_run_and_wandb_id(tiny_model_dir, cpt_dir):
    steps = ("--set", "steps.max_steps=4", "--set", "checkpoint.every_steps=2")
    run = _train(tiny_model_dir, cpt_dir, "t-tracking-resume", *steps, "--set", "steps.stop_after_steps=2")
    ids = read_json(run / "trackers.json")
    _train(tiny_model_dir, cpt_dir, "t-tracking-resume", *steps, "--set", "checkpoint.resume=auto",
           "--set", "checkpoint.overwrite=false")
    assert read_json(run / "train_summary.json")["resume"]["step"] == 2
    assert read_json(run / "trackers.json") == ids
    client = _mlflow_client(ids["mlflow"]["tracking_uri"])
    (only,) = client.search_runs([ids["mlflow"]["experiment_id"]])
    assert only.info.run_id == ids["mlflow"]["run_id"] and only.info.status == "FINISHED"
    assert only.data.tags["forgelab.resumed_from_step"] == "2"
    history = client.get_metric_history(only.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(_losses(run), rel=1e-6) and len(history) == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2, 3, 4]  # both sessions, every step once
    # one offline dir per session, both holding the same run id's records: wandb sync uploads them
    # into one run (wandb suffixes a dir name with -1 when both sessions start within one second,
    # so the id is read from the records file, not the dir name)
    dirs = sorted((run / "wandb" / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2
    assert [[f.name for f in d.glob("run-*.wandb")] for d in dirs] == [[f"run-{ids['wandb']['run_id']}.wandb"]] * 2


def test_unknown_tracker_is_a_config_error_naming_the_key():
    with pytest.raises(cfg.ConfigError, match=r"key 'metrics\.trackers\[1\]'.*'mlfow'.*did you mean 'mlflow'"):
        cfg.load(TrainConfig, [project_path("configs/train/cpt.yaml")], ["metrics.trackers=[wandb, mlfow]"])
    # TensorBoard keeps its own switch
    conf = cfg.load(TrainConfig, [project_path("configs/train/cpt.yaml")], ["metrics.tensorboard=false"])
    assert conf.metrics.tensorboard is False and conf.metrics.trackers == []
