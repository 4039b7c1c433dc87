"""Experiment trackers that receive the per-step scalars next to metrics.jsonl: TensorBoard,
MLflow and Weights & Biases, chosen by ``metrics.tensorboard`` and ``metrics.trackers``.

Every tracker has the same three calls, made on the main rank only:
``start(params, run_name, run_dir, resume_step) -> where`` (where it writes, for the summary),
``log(scalars, step)`` and ``finish(ok)``. The ids a resumed session needs to continue the same
MLflow / W&B run are kept in ``<run dir>/trackers.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..runs import project_path, read_json, write_json

IDS_FILE = "trackers.json"


def select(metrics) -> list:
    """The trackers a MetricsSection turns on, not started yet."""
    out: list = [TensorBoard()] if metrics.tensorboard else []
    for name in dict.fromkeys(metrics.trackers):  # a name listed twice is one tracker
        out.append(MLflow(metrics.mlflow) if name == "mlflow" else WandB(metrics.wandb))
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}; lists stay whole values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _stored_id(run_dir: Path, name: str) -> dict:
    p = run_dir / IDS_FILE
    return (read_json(p).get(name) or {}) if p.is_file() else {}


def _store_id(run_dir: Path, name: str, entry: dict) -> None:
    p = run_dir / IDS_FILE
    ids = read_json(p) if p.is_file() else {}
    ids[name] = entry
    write_json(p, ids)


class TensorBoard:
    name = "tensorboard"

    def __init__(self):
        self.writer = None

    def start(self, params: dict, run_name: str, run_dir: Path, resume_step: int) -> str:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a killed session logged past the checkpoint we resume from
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        return "tb"

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, ok: bool) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class MLflow:
    """One MLflow run per training run, through MlflowClient (no process-global active run).
    A resumed session continues the run of the session before it; the points that session
    logged past the checkpoint stay in MLflow's history, next to the redone steps."""
    name = "mlflow"

    def __init__(self, conf):
        self.conf = conf
        self.client = None
        self.run_id = None

    def start(self, params: dict, run_name: str, run_dir: Path, resume_step: int) -> str:
        from mlflow.tracking import MlflowClient
        uri = self.conf.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; it is the one
            # backend that needs no server and no database packages (mlflow-skinny has none)
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.client = client = MlflowClient(uri)
        prev = _stored_id(run_dir, self.name) if resume_step else {}
        if prev.get("tracking_uri") == uri and self._exists(prev.get("run_id")):
            self.run_id = prev["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            client.set_tag(self.run_id, "forgelab.resumed_from_step", str(resume_step))
            # params stay those of the first session: MLflow refuses to change a logged param
            return uri
        exp = client.get_experiment_by_name(self.conf.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.conf.experiment)
        tags = {"forgelab.stage": "train", "forgelab.run_name": run_name,
                "forgelab.command": os.environ.get("FORGELAB_COMMAND") or ""}
        self.run_id = client.create_run(exp_id, run_name=run_name,
                                        tags={k: _clip(v, "tag") for k, v in tags.items()}).info.run_id
        self._log_params(params)
        _store_id(run_dir, self.name, {"tracking_uri": uri, "experiment_id": exp_id,
                                       "run_id": self.run_id})
        return uri

    def _exists(self, run_id: str | None) -> bool:
        from mlflow.exceptions import MlflowException
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH
        flat = [Param(k, _clip(v if isinstance(v, str) else json.dumps(v, default=str), "param"))
                for k, v in flatten(params).items()]
        for i in range(0, len(flat), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=flat[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def finish(self, ok: bool) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")
            self.run_id = None


def _clip(value: str, kind: str) -> str:
    """MLflow refuses param (and tag) values over its length limit; a long value (a sweep's run
    list, a model config dict) is cut to the limit and ends in '...[truncated]' so the cut shows.
    The whole config is always in <run dir>/config.yaml."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
    limit = MAX_PARAM_VAL_LENGTH if kind == "param" else MAX_TAG_VAL_LENGTH
    mark = "...[truncated]"
    return value if len(value) <= limit else value[:limit - len(mark)] + mark


class WandB:
    """A W&B run, offline by default: everything lands in ``<dir>/wandb/offline-run-*`` and
    ``wandb sync`` uploads it later. A resumed session reuses the run id, so its offline dir
    syncs into the same W&B run (W&B drops re-logged steps at or below the run's last step)."""
    name = "wandb"

    def __init__(self, conf):
        self.conf = conf
        self.run = None

    def start(self, params: dict, run_name: str, run_dir: Path, resume_step: int) -> str | None:
        import wandb
        mode = self.conf.mode
        # the W&B service reads the environment too: offline must never try the network
        os.environ["WANDB_MODE"] = mode
        root = project_path(self.conf.dir) if self.conf.dir else run_dir / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        prev = _stored_id(run_dir, self.name).get("run_id") if resume_step else None
        self.run = wandb.init(
            project=self.conf.project, name=run_name, dir=str(root), config=params, job_type="train",
            id=prev, resume="allow" if prev else None, mode=mode,
            # console off: the lab's own log file already records the output; W&B would wrap stdout
            settings=wandb.Settings(console="off", silent=True))
        if mode == "disabled":
            return None
        _store_id(run_dir, self.name, {"run_id": self.run.id, "project": self.conf.project, "mode": mode})
        return str(self.run.settings.sync_dir)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
