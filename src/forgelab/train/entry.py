"""The one training entry point: ``python scripts/train.py`` or ``python -m forgelab.train.entry``.

  python scripts/train.py --config configs/train/cpt.yaml --set steps.max_steps=20
  python scripts/train.py --config configs/train/sft_lora.yaml
      --config configs/train/tracks/sanity.yaml --config configs/train/backends/ddp.yaml
  scripts/train/<track>.sh <backend> [--task ...]   composes these overlays for you

Run as a plain command it is the *driver*: it validates the config and the data (before any
model loads), builds the plan (one run; a sweep; or the resume track's three runs), launches
each run (in this process for a one-run single-process plan; else through torchrun or the
DeepSpeed launcher, one process per rank) and finishes the plan (resume_validation.json, the
sweep index). Launched by torchrun/DeepSpeed (LOCAL_RANK set) it is a *worker*: one training
session on one rank.

Multi-node: start the same command on every node with NNODES, NODE_RANK, MASTER_ADDR and
MASTER_PORT set (torchrun's static rendezvous), or set dist.launcher=deepspeed and
dist.hostfile for DeepSpeed's launcher. Env NPROC overrides dist.nproc_per_node.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field as dfield, replace
from pathlib import Path

from .. import cli
from .. import config as cfg
from ..runlock import RunLock
from ..runs import project_path, read_json, runs_dir, write_json
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import DataInfo, inspect
from .text_data import KINDS as TEXT_KINDS, inspect_text
from .run_dir import RUN_OUTPUTS

# the driver's own lines; inside a run, forgelab.runs.Run sets up logging for the "forgelab" tree
log = logging.getLogger("forgelab.driver")


def _driver_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False



# ----------------------------------------------------------------------------- pre-flight

@dataclass
class Preflight:
    conf: TrainConfig
    run_name: str
    run_dir: Path
    train: DataInfo
    eval: DataInfo | None
    tokenizer_dir: Path
    tokenizer_fp: str
    model_config: dict
    model_source: str
    ds_config: dict | None
    nproc: int
    nnodes: int
    resume: Path | None
    resume_msg: str
    notices: list[str] = dfield(default_factory=list)
    chat_template: str | None = None  # the SFT store's own template (tokenize_sft chat_template), set on the tokenizer
    convert_from: Path | None = None  # a checkpoint resumed through a converted copy (portable.py) ...
    convert_to: str = ""  # ... in this layout: 'universal' or 'full'


def runs_root() -> Path:
    return runs_dir("train")


def resolve_nproc(conf: TrainConfig) -> int:
    env = os.environ.get("NPROC")
    n = conf.dist.nproc_per_node
    if env:
        try:
            n = int(env)
        except ValueError:
            raise cfg.ConfigError(f"env NPROC={env!r} is not an integer") from None
    if conf.backend == "single":
        if n not in ("auto", 1):
            raise cfg.ConfigError(f"backend single runs one process; dist.nproc_per_node/NPROC is {n} "
                                  "(use backend ddp, fsdp, zero1, zero2, zero3 or zero3_offload)")
        return 1
    if n == "auto":
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 2
    return int(n)


def _pretrain_config(conf: TrainConfig) -> tuple[dict, str]:
    m = conf.model
    d: dict = {}
    sources = []
    if m.preset:
        try:
            from ..model import presets
        except ImportError:
            raise cfg.ConfigError("key 'model.preset': forgelab.model.presets is not available; use model.config "
                                  "or model.config_file") from None
        try:
            d.update(presets.build_config(m.preset).to_dict())
        except ValueError as e:  # PresetError: unknown name, bad YAML, bad shape
            raise cfg.ConfigError(f"key 'model.preset': {e}") from None
        sources.append(f"preset {m.preset}")
    if m.config_file:
        p = project_path(m.config_file)
        if not p.is_file():
            raise cfg.ConfigError(f"key 'model.config_file': {p} does not exist")
        d.update(json.loads(p.read_text(encoding="utf-8")))
        sources.append(str(p))
    if m.config:
        d.update(m.config)
        sources.append("model.config")
    if "model_type" not in d:
        raise cfg.ConfigError("pretrain: the model config has no model_type (e.g. llama, qwen3)")
    return d, "from scratch: " + " + ".join(sources)


def preflight(conf: TrainConfig, run_name: str | None = None, check_run_dir: bool = True) -> Preflight:
    """Everything that can be checked without loading a model; raises ConfigError."""
    from ..model.tokenizer_info import tokenizer_fingerprint

    notices: list[str] = []
    run_name = run_name or conf.resolved_run_name()
    run_dir = runs_root() / run_name
    kind = conf.method.data_kind
    if kind in TEXT_KINDS:  # text records that TRL tokenizes with the model's chat template
        def look(path, n, what):
            return inspect_text(project_path(path), kind, n, conf.align.max_length, what, conf.task)
    else:
        def look(path, n, what):
            return inspect(project_path(path), kind, n, what, conf.task)
    train = look(conf.data.train, conf.data.max_train_items, "data.train")
    ev = None
    if conf.data.eval:
        ev = look(conf.data.eval, conf.eval.max_items, "data.eval")
        if ev.seq_len != train.seq_len:
            notices.append(f"held-out seq_len {ev.seq_len} differs from train seq_len {train.seq_len}")

    m = conf.model
    tok_dir = project_path(m.tokenizer or m.path)
    if not tok_dir.is_dir():
        raise cfg.ConfigError(f"key 'model.tokenizer': {tok_dir} does not exist")
    try:
        tok_fp = tokenizer_fingerprint(tok_dir)
    except FileNotFoundError as e:
        raise cfg.ConfigError(f"key 'model.tokenizer': {e}") from None
    template = _store_template(train, ev)
    if template is not None:
        # the data was tokenized with a template of its own: the run trains (and final/ saves) the
        # tokenizer with that template, whose fingerprint is what the store recorded
        from ..model.tokenizer_info import tokenizer_fingerprint_with_template
        tok_fp = tokenizer_fingerprint_with_template(tok_dir, template)

    if conf.random_init:
        model_config, source = _pretrain_config(conf)
    else:
        path = project_path(m.path)
        if not (path / "config.json").is_file():
            raise cfg.ConfigError(f"key 'model.path': {path} has no config.json (not a model dir)")
        model_config, source = json.loads((path / "config.json").read_text(encoding="utf-8")), str(path)

    for info, key in ((train, "data.train"), (ev, "data.eval")):
        if info is None:
            continue
        data_fp = info.tokenizer_fingerprint
        if info.kind in TEXT_KINDS:
            continue  # tokenized by this run, with this tokenizer
        if data_fp != tok_fp:
            msg = (f"key '{key}': {info.path} was tokenized with tokenizer {data_fp}, but the model's tokenizer "
                   f"({tok_dir}) is {tok_fp}")
            if not conf.data.allow_tokenizer_mismatch:
                raise cfg.ConfigError(msg + "; re-tokenize the data, or set data.allow_tokenizer_mismatch=true")
            notices.append(msg + " (allowed by data.allow_tokenizer_mismatch)")
    text_conf = model_config.get("text_config") or model_config
    max_pos = text_conf.get("max_position_embeddings")
    if max_pos and train.seq_len > int(max_pos):
        raise cfg.ConfigError(f"data seq_len {train.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    vocab = text_conf.get("vocab_size")
    data_vocab = train.meta.get("vocab_size")
    if not conf.random_init and vocab and data_vocab and int(data_vocab) > int(vocab):
        raise cfg.ConfigError(f"data vocab_size {train.meta['vocab_size']} exceeds the model's vocab_size {vocab}")

    ds_config = None
    if conf.dist.deepspeed:
        p = project_path(conf.dist.deepspeed)
        try:
            ds_config = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise cfg.ConfigError(f"key 'dist.deepspeed': {p} does not exist") from None
        except json.JSONDecodeError as e:
            raise cfg.ConfigError(f"key 'dist.deepspeed': {p} is not valid JSON: {e}") from None
    if conf.dist.launcher == "deepspeed" and conf.dist.hostfile and not project_path(conf.dist.hostfile).is_file():
        raise cfg.ConfigError(f"key 'dist.hostfile': {project_path(conf.dist.hostfile)} does not exist")

    nproc = resolve_nproc(conf)
    nnodes = int(os.environ.get("NNODES", "1"))
    resume, resume_msg = ckpt.resolve_resume(conf.checkpoint.resume, run_dir, project_path)
    convert_from, convert_to = None, ""
    if resume is not None:
        from . import portable
        plan = portable.check(resume, conf, nproc * nnodes)
        resume_msg += f"; {plan.message}" if plan.message else ""
        if plan.convert:
            convert_from, convert_to = resume, plan.convert
            if plan.convert == "universal":
                ds_config = dict(ds_config or {})
                ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
            if "LOCAL_RANK" in os.environ:  # a rank: its driver converted it before launching
                resume = portable.converted_path(run_dir, convert_from)
                if not (resume / portable.SOURCE_FILE).is_file():
                    raise cfg.ConfigError(f"key 'checkpoint.resume': {convert_from} is resumed through a converted "
                                          f"copy at {resume}, which is missing; launch through scripts/train.py, "
                                          "which makes it")
    if check_run_dir and resume is None and not conf.checkpoint.overwrite:
        earlier = [n for n in RUN_OUTPUTS if (run_dir / n).exists()] + [p.name for _, p in
                                                                        ckpt.complete_checkpoints(run_dir)]
        if earlier:
            raise cfg.ConfigError(
                f"run dir {run_dir} holds an earlier run ({', '.join(sorted(earlier)[:4])}); continue it with "
                "--set checkpoint.resume=auto, replace it with --set checkpoint.overwrite=true, or pick another "
                "--run-name")
    return Preflight(conf=conf, run_name=run_name, run_dir=run_dir, train=train, eval=ev, tokenizer_dir=tok_dir,
                     tokenizer_fp=tok_fp, model_config=model_config, model_source=source, ds_config=ds_config,
                     nproc=nproc, nnodes=nnodes, resume=resume, resume_msg=resume_msg, notices=notices,
                     chat_template=template, convert_from=convert_from,
                     convert_to=convert_to)


def _store_template(train: DataInfo, ev: DataInfo | None) -> str | None:
    """The chat template an SFT store was tokenized with (its meta.json), if it set its own;
    train and held-out data must agree on it."""
    t = train.meta.get("chat_template") or None
    e = (ev.meta.get("chat_template") or None) if ev is not None else t
    if ev is not None and (t or {}).get("sha256") != (e or {}).get("sha256"):
        raise cfg.ConfigError(f"key 'data.eval': {ev.path} was tokenized with another chat template than "
                              f"{train.path} (sha256 {(e or {}).get('sha256')} vs {(t or {}).get('sha256')}); "
                              "tokenize both with the same tokenize_sft chat_template")
    return t["template"] if t else None


# ----------------------------------------------------------------------------- the plan

@dataclass
class PlanStep:
    run_name: str
    overrides: list[str]
    info: dict


def _set(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def make_plan(conf: TrainConfig) -> tuple[str, list[PlanStep]]:
    """('single' | 'sweep' | 'resume', steps). Each step is one training run."""
    base = conf.resolved_run_name()
    if conf.resume_check.stop_at:
        k, n = conf.resume_check.stop_at, conf.steps.max_steps
        if not 0 < k < n:
            raise cfg.ConfigError(f"key 'resume_check.stop_at' must be between 1 and steps.max_steps - 1, got {k}")
        common = [_set("resume_check.stop_at", 0), _set("sweep.runs", [])]
        fresh = [_set("checkpoint.resume", "none"), _set("checkpoint.overwrite", True)]
        return "resume", [
            PlanStep(f"{base}-uninterrupted", common + fresh, {"resume_track": "uninterrupted", "steps": n}),
            PlanStep(f"{base}-resumed", common + fresh + [_set("steps.stop_after_steps", k)],
                     {"resume_track": "stage1", "stop_at": k}),
            PlanStep(f"{base}-resumed", common + [_set("checkpoint.resume", "auto")],
                     {"resume_track": "stage2", "stop_at": k}),
        ]
    if conf.sweep.runs:
        name = conf.sweep.name or base
        steps = []
        for i, over in enumerate(conf.sweep.runs):
            sets = [_set(k, v) for k, v in over.items()] + [_set("sweep.runs", [])]
            steps.append(PlanStep(f"{name}--{i:02d}", sets,
                                  {"sweep": {"name": name, "index": i, "of": len(conf.sweep.runs),
                                             "overrides": over}}))
        return "sweep", steps
    return "single", [PlanStep(base, [], {})]


# ----------------------------------------------------------------------------- launching

def launch_command(pre: Preflight, worker_args: list[str]) -> list[str]:
    """The command that starts one run's ranks on this node."""
    conf = pre.conf
    py = sys.executable
    worker = ["-m", "forgelab.train.entry", "--worker", *worker_args]
    if conf.backend == "single":
        return [py, *worker]
    node_rank = os.environ.get("NODE_RANK", "0")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT", str(conf.dist.master_port))
    if conf.dist.launcher == "deepspeed":
        cmd = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(pre.nproc),
               "--master_addr", addr, "--master_port", port]
        if conf.dist.hostfile:
            cmd += ["--hostfile", str(project_path(conf.dist.hostfile))]
        elif pre.nnodes > 1:
            cmd += ["--num_nodes", str(pre.nnodes), "--node_rank", node_rank, "--no_ssh"]
        return cmd + ["--module", "forgelab.train.entry", "--worker", *worker_args]
    cmd = [py, "-m", "torch.distributed.run", f"--nproc_per_node={pre.nproc}"]
    if pre.nnodes > 1 or "MASTER_PORT" in os.environ:
        cmd += [f"--nnodes={pre.nnodes}", f"--node_rank={node_rank}", f"--master_addr={addr}",
                f"--master_port={port}"]
    else:
        cmd += ["--standalone"]  # one node: torchrun picks a free port
    return cmd + worker


def _worker_env(pre: Preflight) -> dict:
    env = dict(os.environ)
    if pre.conf.runtime.threads:
        env["OMP_NUM_THREADS"] = str(pre.conf.runtime.threads)
    elif pre.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["FORGELAB_DRIVER"] = "1"
    if pre.resume is not None:
        env[ckpt.VERIFIED_ENV] = str(pre.resume)  # checked against its manifest here already
    return env


def run_step(pre: Preflight, step: PlanStep, config_args: list[str], in_process: bool) -> int:
    if pre.convert_from is not None and pre.resume == pre.convert_from:  # once, before any rank starts
        from .portable import convert
        done = convert(pre.convert_from, pre.run_dir, pre.convert_to, log)
        log.info("%s resumes from its converted copy %s", pre.convert_from, done)
        if in_process:
            pre = replace(pre, resume=done)
    if in_process:
        from .session import run_session
        return run_session(pre, step.info)
    args = config_args + [x for o in step.overrides for x in ("--set", o)] + \
        ["--run-name", step.run_name, "--plan-info", json.dumps(step.info)]
    cmd = launch_command(pre, args)
    log.info("launch: %s", shlex.join(cmd))
    from .graceful import forward_signals
    proc = subprocess.Popen(cmd, env=_worker_env(pre), cwd=str(project_path(".")))
    with forward_signals(proc):  # SIGTERM/SIGINT reach the ranks, which save and stop (graceful.py)
        rc = proc.wait()
    sig = getattr(proc, "forwarded_signal", None)
    return 128 + sig if sig and rc != 0 else rc


# ----------------------------------------------------------------------------- finishing a plan

def validate_resume(full_dir: Path, resumed_dir: Path, conf: TrainConfig) -> dict:
    """Compare the resumed run's loss curve with the uninterrupted one, step by step."""
    from ..runs import read_metrics
    a = {r["step"]: r for r in read_metrics(full_dir / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(resumed_dir / "metrics.jsonl")}
    summary = read_json(resumed_dir / "train_summary.json") if (resumed_dir / "train_summary.json").is_file() else {}
    on_gpu = (summary.get("device") or {}).get("type") == "cuda"
    tol = conf.resume_check.tolerance_gpu if on_gpu else conf.resume_check.tolerance_cpu
    steps = sorted(set(a) | set(b))
    rows, diffs, gdiffs = [], [], []
    for s in steps:
        la, lb = a.get(s, {}).get("loss"), b.get(s, {}).get("loss")
        d = abs(la - lb) if la is not None and lb is not None else None
        ga, gb = a.get(s, {}).get("grad_norm"), b.get(s, {}).get("grad_norm")
        gd = abs(ga - gb) if ga is not None and gb is not None else None
        if d is not None:
            diffs.append(d)
        if gd is not None:
            gdiffs.append(gd)
        rows.append({"step": s, "loss_uninterrupted": la, "loss_resumed": lb, "abs_diff": d,
                     "grad_norm_abs_diff": gd, "lr_uninterrupted": a.get(s, {}).get("lr"),
                     "lr_resumed": b.get(s, {}).get("lr")})
    missing = [s for s in steps if s not in a or s not in b]
    resume = summary.get("resume") or {}
    max_diff = max(diffs) if diffs else None
    identical = bool(diffs) and not missing and all(r["loss_uninterrupted"] == r["loss_resumed"] for r in rows)
    return {
        "uninterrupted_run": str(full_dir), "resumed_run": str(resumed_dir),
        "steps_compared": len(diffs), "missing_steps": missing,
        "stop_at": conf.resume_check.stop_at, "resumed_from": resume.get("from_checkpoint"),
        "resumed_step": resume.get("step"), "device": "cuda" if on_gpu else "cpu",
        "max_abs_diff": max_diff, "max_grad_norm_abs_diff": max(gdiffs) if gdiffs else None,
        "identical": identical, "tolerance": tol,
        "passed": max_diff is not None and not missing and max_diff <= tol,
        "curve": rows,
    }


def finish_plan(kind: str, conf: TrainConfig, steps: list[PlanStep], rcs: list[int]) -> None:
    root = runs_root()
    if kind == "resume" and len(rcs) == 3 and all(rc == 0 for rc in rcs):
        full, resumed = root / steps[0].run_name, root / steps[1].run_name
        rep = validate_resume(full, resumed, conf)
        write_json(resumed / "resume_validation.json", rep)
        log.info("resume validation: %d steps, max |loss diff| %s, identical %s, passed %s -> %s",
                 rep["steps_compared"], rep["max_abs_diff"], rep["identical"], rep["passed"],
                 resumed / "resume_validation.json")
    elif kind == "sweep":
        name = steps[0].info["sweep"]["name"]
        runs = []
        for st, rc in zip(steps, rcs):
            s = root / st.run_name / "train_summary.json"
            body = read_json(s) if s.is_file() else {}
            runs.append({"run_name": st.run_name, "overrides": st.info["sweep"]["overrides"], "returncode": rc,
                         "summary": str(s) if s.is_file() else None,
                         "tokens_per_s_steady": body.get("tokens_per_s_steady"),
                         "peak_memory_bytes": body.get("peak_memory_bytes"), "final_loss": body.get("final_loss")})
        write_json(root / f"{name}.sweep.json", {"sweep": name, "task": conf.task, "backend": conf.backend,
                                                 "runs": runs})
        log.info("sweep %s: %d runs -> %s", name, len(runs), root / f"{name}.sweep.json")


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, default_config="configs/train/cpt.yaml")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config and data, print the plan and launch commands, train nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plan-info", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _config_args(args) -> list[str]:
    out = []
    for c in args.config or [args._default_config]:
        out += ["--config", str(project_path(c))]
    for o in args.overrides:
        out += ["--set", o]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_name:
        args.overrides = list(args.overrides) + [_set("run_name", args.run_name)]
    conf = cli.load_config(TrainConfig, args)
    # launched by torchrun / the DeepSpeed launcher (by the driver or by hand): one rank of one run
    if args.worker or "LOCAL_RANK" in os.environ:
        from .session import run_session
        rank0 = int(os.environ.get("RANK", "0")) == 0
        # ranks started by hand (torchrun without the driver): rank 0 locks the run dir
        with RunLock(runs_root() / conf.resolved_run_name(), os.environ.get("FORGELAB_COMMAND")) if rank0 \
                else contextlib.nullcontext():
            pre = preflight(conf, check_run_dir=rank0)
            return run_session(pre, json.loads(args.plan_info) if args.plan_info else {})

    _driver_logging()
    # the user's command, recorded in every run's summary (launchers set it before calling us);
    # set for this call only, so a caller that drives several runs in one process (a test, a
    # notebook) does not hand one run's command to the next
    given = os.environ.get("FORGELAB_COMMAND")
    os.environ["FORGELAB_COMMAND"] = given or shlex.join(["python", "scripts/train.py", *(argv or sys.argv[1:])])
    kind, steps = make_plan(conf)
    with contextlib.ExitStack() as held:
        held.callback(lambda: os.environ.pop("FORGELAB_COMMAND") if given is None
                      else os.environ.update(FORGELAB_COMMAND=given))
        if not args.dry_run and os.environ.get("NODE_RANK", "0") == "0":
            # one process tree per run dir: a second launch with the same run name stops here
            for name in dict.fromkeys(st.run_name for st in steps):
                lock = held.enter_context(RunLock(runs_root() / name, os.environ["FORGELAB_COMMAND"]))
                if lock.notice:
                    log.warning("%s", lock.notice)
        return _drive(args, conf, kind, steps)


def _drive(args, conf: TrainConfig, kind: str, steps: list[PlanStep]) -> int:
    # every run of the plan is validated, with its data, before the first one starts
    pres = []
    for st in steps:
        variant = cfg.load(TrainConfig, [project_path(c) for c in args.config or [args._default_config]],
                           list(args.overrides) + st.overrides + [_set("run_name", st.run_name)])
        is_stage2 = st.info.get("resume_track") == "stage2"
        pres.append(preflight(variant, check_run_dir=not is_stage2))
    in_process = kind == "single" and pres[0].nproc == 1 and pres[0].nnodes == 1 and conf.backend == "single"
    if args.dry_run:
        print(f"plan: {kind}, {len(steps)} run(s)")
        for st, pre in zip(steps, pres):
            wa = _config_args(args) + [x for o in st.overrides for x in ("--set", o)] + ["--run-name", st.run_name]
            print(f"- {st.run_name}: {pre.resume_msg}")
            print("  " + shlex.join(launch_command(pre, wa)))
        return 0
    if os.environ.get("NODE_RANK", "0") != "0" and kind != "single":
        log.info("node %s: following the plan of node 0", os.environ["NODE_RANK"])
    rcs = []
    for st, pre in zip(steps, pres):
        log.info("run %s (%s, %d/%d)", st.run_name, kind, len(rcs) + 1, len(steps))
        rc = run_step(pre, st, _config_args(args), in_process)
        rcs.append(rc)
        if rc != 0:
            log.error("run %s failed with exit code %d; stopping the plan", st.run_name, rc)
            return rc
    if os.environ.get("NODE_RANK", "0") == "0":
        finish_plan(kind, conf, steps, rcs)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
