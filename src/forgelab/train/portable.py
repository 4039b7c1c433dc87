"""Resuming a checkpoint under another world size or backend: what the checkpoint's layout
allows, said in the resume log, refused with the reason where it does not.

A checkpoint of single, ddp (or fsdp on CPU, which runs as DDP) holds full copies of the
model, optimizer and scheduler state plus one RNG state per rank; any of those backends can
continue it with any number of ranks, as long as the global batch (ranks x micro batch x
accumulation) is the one it trained with, so the items of each later step are the same. A
DeepSpeed checkpoint holds the ranks' ZeRO partitions (`global_stepN/`), which DeepSpeed
reloads only for the same partitioning, and FSDP's sharded state is tied to its mesh; those
are refused across a change, naming the way out."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config import ConfigError
from .config import DEEPSPEED_BACKENDS


def layout(ckpt: Path) -> dict:
    """What wrote the checkpoint: its run's backend and batch settings (the run dir's
    config.yaml) and how many ranks saved RNG states into it."""
    ranks = len(list(ckpt.glob("rng_state_*.pth"))) or (1 if (ckpt / "rng_state.pth").is_file() else 0)
    conf_path = ckpt.parent / "config.yaml"
    conf = yaml.safe_load(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    steps = (conf or {}).get("steps") or {}
    kind = ("deepspeed" if any(ckpt.glob("global_step*")) else
            "fsdp_sharded" if (ckpt / "pytorch_model_fsdp_0").is_dir() else "full")
    return {"kind": kind, "ranks": ranks, "backend": (conf or {}).get("backend"),
            "micro_batch_size": steps.get("micro_batch_size"), "grad_accum": steps.get("grad_accum")}


def check(ckpt: Path, conf, world: int) -> str:
    """'' when the checkpoint is resumed as it was written, else the sentence for the resume log;
    ConfigError when this configuration cannot continue it."""
    src = layout(ckpt)
    if not src["ranks"] or src["backend"] is None:
        return ""  # not enough known about its writer (an older run): resumed as before
    same = src["ranks"] == world and src["backend"] == conf.backend
    if same:
        return ""
    what = f"{ckpt.name} was written by {src['backend']} with {src['ranks']} rank(s); this run is {conf.backend} " \
           f"with {world}"
    if src["kind"] != "full" or conf.backend in DEEPSPEED_BACKENDS:
        raise ConfigError(
            f"key 'checkpoint.resume': {what}: a {'DeepSpeed ZeRO' if src['kind'] == 'deepspeed' else src['kind']} "
            "checkpoint resumes only under the backend and world size that wrote it"
            if src["kind"] != "full" else
            f"key 'checkpoint.resume': {what}: DeepSpeed cannot load a checkpoint without ZeRO partitions")
    if None not in (src["micro_batch_size"], src["grad_accum"]):
        had = src["ranks"] * src["micro_batch_size"] * src["grad_accum"]
        now = world * conf.steps.micro_batch_size * conf.steps.grad_accum
        if had != now:
            want = had / (world * conf.steps.micro_batch_size)
            hint = f"steps.grad_accum={int(want)}" if want == int(want) else "steps.micro_batch_size / grad_accum"
            raise ConfigError(
                f"key 'checkpoint.resume': {what}: it trained with a global batch of {had} ({src['ranks']} x "
                f"{src['micro_batch_size']} rows x {src['grad_accum']} micro-batches), this run has {now}; set "
                f"{hint} so the continued curve is comparable")
    if world == 1:
        rng = "not restored (one process reads rng_state.pth; they drive dropout only)"
    elif world <= src["ranks"]:
        rng = f"restored for ranks 0-{world - 1}"
    else:
        rng = f"restored for ranks 0-{src['ranks'] - 1} only (they drive dropout only)"
    return (f"{what}: converted nothing, model, optimizer and scheduler state are full copies and load as they "
            f"are; same global batch, so each later step trains the same items; per-rank RNG states {rng}")
