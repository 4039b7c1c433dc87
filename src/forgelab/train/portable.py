"""Resuming a checkpoint under another world size or backend: what the checkpoint's layout
allows, converted where it must be, said in the resume log, refused with the reason where it
cannot move.

A checkpoint of single, ddp (or fsdp on CPU, which runs as DDP) holds full copies of the
model, optimizer and scheduler state plus one RNG state per rank; any of those backends can
continue it with any number of ranks. A DeepSpeed checkpoint holds the ranks' ZeRO partitions
(`global_stepN/`), which DeepSpeed reloads only for the same partitioning: under another world
size or ZeRO stage it is first converted to DeepSpeed's universal checkpoint (its own
`ds_to_universal`, one file per parameter and optimizer moment) beside the new run
(`<run>/converted/checkpoint-N/`), which zero1/zero2 load with `checkpoint.load_universal`.
FSDP's sharded state (torch.distributed.checkpoint, keyed by parameter name) is merged into the
full files single and ddp load.
Either way the global batch (ranks x micro batch x accumulation) must be the one it trained
with, so the items of each later step are the same and the continued curve is comparable."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError
from .ckpt_model import FSDP_DIR
from .config import DEEPSPEED_BACKENDS


def layout(ckpt: Path) -> dict:
    """What wrote the checkpoint: its run's backend and batch settings (the run dir's
    config.yaml) and how many ranks saved RNG states into it."""
    ranks = len(list(ckpt.glob("rng_state_*.pth"))) or (1 if (ckpt / "rng_state.pth").is_file() else 0)
    conf_path = ckpt.parent / "config.yaml"
    conf = yaml.safe_load(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    steps = (conf or {}).get("steps") or {}
    dist = (conf or {}).get("dist") or {}
    kind = ("deepspeed" if any(ckpt.glob("global_step*")) else
            "fsdp_sharded" if (ckpt / FSDP_DIR).is_dir() else "full")
    return {"kind": kind, "ranks": ranks, "backend": (conf or {}).get("backend"),
            "micro_batch_size": steps.get("micro_batch_size"), "grad_accum": steps.get("grad_accum"),
            "parallel": (int(dist.get("tensor_parallel") or 1), int(dist.get("sequence_parallel") or 1))}


@dataclass
class ResumePlan:
    """How a checkpoint continues here: `message` for the resume log ('' when it resumes as it
    was written) and the layout it is converted to first: '' (none), 'universal' (ZeRO
    partitions as a DeepSpeed universal checkpoint) or 'full' (FSDP shards as one process's files)."""
    message: str = ""
    convert: str = ""


def check(ckpt: Path, conf, world: int) -> ResumePlan:
    """How this configuration continues `ckpt`; ConfigError when it cannot."""
    src = layout(ckpt)
    if not src["ranks"] or src["backend"] is None:
        return ResumePlan()  # not enough known about its writer (an older run): resumed as before
    parallel = (conf.dist.tensor_parallel, conf.dist.sequence_parallel)
    if src["ranks"] == world and src["backend"] == conf.backend and src["parallel"] == parallel:
        return ResumePlan()
    what = f"{ckpt.name} was written by {src['backend']} with {src['ranks']} rank(s); this run is {conf.backend} " \
           f"with {world}"
    to_zero = conf.backend in DEEPSPEED_BACKENDS

    def refuse(why: str):
        raise ConfigError(f"key 'checkpoint.resume': {what}: {why}")
    if src["parallel"] != (1, 1) or parallel != (1, 1):
        # DeepSpeed's universal conversion reassembles ZeRO partitions, not AutoTP shards
        refuse(f"it trained with tensor/sequence parallel {src['parallel']}, this run has {parallel}; a tensor- or "
               "sequence-parallel checkpoint resumes only with the sizes, backend and world size that wrote it")
    if src["kind"] == "deepspeed" and not to_zero:
        refuse("DeepSpeed ZeRO partitions continue only under a zero backend (any stage, any world size, through a "
               "universal checkpoint); for single/ddp/fsdp start from its weights (forgelab checkpoint-to-model "
               f"{ckpt} DIR, then model.path=DIR) with a new optimizer")
    if src["kind"] == "deepspeed" and conf.backend in ("zero3", "zero3_offload"):
        # measured: step 4 after a zero3 2 -> 1 rank resume is off the uninterrupted run's
        refuse("a universal checkpoint continues under zero1 or zero2; DeepSpeed's ZeRO-3 universal loader gives "
               "every parameter group the first group's settings (the norms would get weight decay), so across a "
               "change of world size or stage ZeRO checkpoints move to zero1/zero2")
    if src["kind"] == "fsdp_sharded" and conf.backend not in ("single", "ddp"):
        refuse("an FSDP sharded checkpoint moves to single or ddp (merged into full state), or resumes under fsdp "
               "with the world size that wrote it")
    if src["kind"] == "full" and to_zero:
        refuse("DeepSpeed cannot load a checkpoint without ZeRO partitions")
    _check_global_batch(src, conf, world, what)
    same = ("same global batch, so each later step trains the same items; per-rank RNG states "
            f"{_rng(src['ranks'], world)}")
    if src["kind"] == "deepspeed":
        return ResumePlan(
            f"{what}: ZeRO partitions of {src['ranks']} rank(s) converted to a DeepSpeed universal checkpoint (fp32 "
            f"master weights and Adam moments per parameter; scheduler and trainer state as saved), loaded with "
            f"checkpoint.load_universal; {same}", convert="universal")
    if src["kind"] == "fsdp_sharded":
        return ResumePlan(
            f"{what}: FSDP's sharded model and optimizer state of {src['ranks']} rank(s) merged into full copies "
            f"(model.safetensors, optimizer.pt by parameter index; scheduler and trainer state as saved); {same}",
            convert="full")
    return ResumePlan(f"{what}: converted nothing, model, optimizer and scheduler state are full copies and load as "
                      f"they are; {same}")


def _check_global_batch(src: dict, conf, world: int, what: str) -> None:
    if None in (src["micro_batch_size"], src["grad_accum"]):
        return
    had = src["ranks"] * src["micro_batch_size"] * src["grad_accum"]
    now = world * conf.steps.micro_batch_size * conf.steps.grad_accum
    if had != now:
        want = had / (world * conf.steps.micro_batch_size)
        hint = f"steps.grad_accum={int(want)}" if want == int(want) else "steps.micro_batch_size / grad_accum"
        raise ConfigError(
            f"key 'checkpoint.resume': {what}: it trained with a global batch of {had} ({src['ranks']} x "
            f"{src['micro_batch_size']} rows x {src['grad_accum']} micro-batches), this run has {now}; set "
            f"{hint} so the continued curve is comparable")


def _rng(had: int, world: int) -> str:
    if world == 1:
        return "not restored (one process reads rng_state.pth; they drive dropout only)"
    if world <= had:
        return f"restored for ranks 0-{world - 1}"
    return f"restored for ranks 0-{had - 1} only (they drive dropout only)"


# ----------------------------------------------------------------------------- conversions

CONVERTED_DIR = "converted"
SOURCE_FILE = "forgelab_source.json"
# files that describe the source's own layout; the converted copy has its own
_LAYOUT_FILES = ("latest", "zero_to_fp32.py", "zero_to_torch.py")


def converted_path(run_dir: Path, ckpt: Path) -> Path:
    return run_dir / CONVERTED_DIR / ckpt.name


def convert(ckpt: Path, run_dir: Path, how: str, log=None) -> Path:
    """Write `ckpt` in the layout this run loads ('universal' or 'full') under
    `<run_dir>/converted/`; returns its path. Reused when an earlier launch of this run converted
    the same checkpoint; staged and renamed into place, so a killed conversion is redone, never
    half-used. The trainer state, scheduler, RNG, config and tokenizer files are linked as saved."""
    import json
    import os
    import shutil

    from .. import manifest
    from ..runs import now_iso, write_json

    ckpt = ckpt.resolve()
    dest = converted_path(run_dir, ckpt)
    rec_path = dest / SOURCE_FILE
    if rec_path.is_file() and json.loads(rec_path.read_text(encoding="utf-8")).get("checkpoint") == str(ckpt):
        return dest
    stage = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        what = _to_universal(ckpt, stage, log) if how == "universal" else _fsdp_to_full(ckpt, stage, log)
        for f in ckpt.iterdir():  # after the conversion's own files: a link is never written through
            keep = f.name not in _LAYOUT_FILES and f.name != manifest.NAME
            if f.is_file() and keep and not (stage / f.name).exists():
                try:
                    os.link(f, stage / f.name)
                except OSError:
                    shutil.copy2(f, stage / f.name)
        write_json(stage / SOURCE_FILE, {"checkpoint": str(ckpt), "to": how, "how": what, "converted_at": now_iso()})
        manifest.write_manifest(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    stage.rename(dest)
    return dest


def _to_universal(ckpt: Path, stage: Path, log) -> str:
    import subprocess
    import sys

    from ..config import RunError
    tag = (ckpt / "latest").read_text(encoding="utf-8").strip()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag),
           "--output_folder", str(stage / f"{tag}_universal"), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if log:
        log.info("converting %s to a DeepSpeed universal checkpoint: %s", ckpt, " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not (stage / "latest_universal").is_file():
        raise RunError(f"{ckpt}: DeepSpeed's ds_to_universal failed (exit {p.returncode}):\n"
                       f"{(p.stdout + p.stderr)[-3000:]}")
    _zero3_to_zero12_layout(stage / f"{tag}_universal")
    return f"deepspeed ds_to_universal of {tag}"


def _fsdp_to_full(ckpt: Path, stage: Path, log) -> str:
    """FSDP's sharded model and optimizer (torch.distributed.checkpoint, keyed by parameter name)
    as the files one process loads: model.safetensors and an optimizer.pt numbered the way
    torch's optimizers number parameters (group by group, in the order each group lists them)."""
    import torch

    from .ckpt_model import FSDP_DIR, FSDP_OPTIMIZER_DIR, dcp_load, model_from_state
    if log:
        log.info("converting %s: FSDP sharded state merged by torch.distributed.checkpoint", ckpt)
    model_from_state(ckpt, dcp_load(ckpt / FSDP_DIR, "model")).save_pretrained(stage, safe_serialization=True)
    osd = dcp_load(ckpt / FSDP_OPTIMIZER_DIR, "optimizer")
    index = {n: i for i, n in enumerate(n for g in osd["param_groups"] for n in g["params"])}
    torch.save({"state": {index[n]: st for n, st in osd["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]},
               stage / "optimizer.pt")
    return f"FSDP sharded state ({FSDP_DIR}/, {FSDP_OPTIMIZER_DIR}/) merged by torch.distributed.checkpoint"


def _zero3_to_zero12_layout(udir: Path) -> None:
    """DeepSpeed's universal files differ by the stage that wrote them, and its ZeRO-1/2 loader
    reads only its own: a ZeRO-3 conversion has no mp_rank_00_model_states.pt (ZeRO-3 names one
    per rank, with placeholders for the partitioned parameters), flat tensors without the Adam
    step per parameter, and optimizer state without the DeepSpeed version. Rewritten into the
    ZeRO-1/2 form here; a ZeRO-1/2 conversion is left as it is."""
    import torch
    flat, z3 = udir / "mp_rank_00_model_states.pt", udir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if flat.is_file() or not z3.is_file():
        return
    sd = torch.load(z3, map_location="cpu", weights_only=False)
    shared = sd.get("shared_params") or {}  # tied weights: stored once, under the name they share

    def load(path: Path):
        return torch.load(path, map_location="cpu", weights_only=False)

    def fp32(name: str):
        t = load(udir / "zero" / shared.get(name, name) / "fp32.pt")
        return t["param"] if isinstance(t, dict) else t
    shapes = {k: v for group in sd["param_shapes"] for k, v in group.items()}
    opt_path = udir / "zero" / "optimizer_state.pt"
    opt = load(opt_path)
    opt.setdefault("ds_version", sd["ds_version"])
    torch.save(opt, opt_path)
    step = next(iter(opt["optimizer_state_dict"]["state"].values()))["step"]  # one step for every parameter
    for name, shape in shapes.items():
        pdir = udir / "zero" / name
        for f in pdir.glob("*.pt"):
            t = load(f)
            if not isinstance(t, dict):
                torch.save({"cat_dim": 0, "param": t.view(shape)}, f)
        if not (pdir / "step.pt").is_file():
            torch.save(step.clone(), pdir / "step.pt")
    sd["module"] = {k: fp32(k).view(shapes[k]) if k in shapes else fp32(k) for k in sd["module"]}
    torch.save(sd, flat)
