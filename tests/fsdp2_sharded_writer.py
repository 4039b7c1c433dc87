"""Rewrite a one-process checkpoint-N as the sharded checkpoint FSDP2 writes through
accelerate (fsdp_version 2, SHARDED_STATE_DICT): 2 gloo ranks shard the model with torch's
fully_shard, load the checkpoint's model and optimizer state into it, and save both with
torch.distributed.checkpoint the way accelerate's save_fsdp_model / save_fsdp_optimizer do
({"model": ...} under pytorch_model_fsdp_0/, {"optimizer": ...} under optimizer_0/, keyed by
parameter name). accelerate runs FSDP on GPUs only, so this is how a CPU test gets a real one.

torchrun --nproc_per_node=2 tests/fsdp2_sharded_writer.py SRC_CHECKPOINT DEST_CHECKPOINT"""
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from forgelab.train.optim import decay_parameter_names


def main(src: Path, dest: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    decay = set(decay_parameter_names(model))
    # the lab Trainer's optimizer groups: weight-decayed parameters, then the rest, each in model order
    order = [n for n in names if n in decay] + [n for n in names if n not in decay]
    saved = torch.load(src / "optimizer.pt", map_location="cpu", weights_only=True)
    flat_ids = [i for g in saved["param_groups"] for i in g["params"]]
    assert len(flat_ids) == len(order), "optimizer.pt does not hold the Trainer's two groups"
    by_name = dict(zip(flat_ids, order))
    full_osd = {"state": {by_name[i]: s for i, s in saved["state"].items()},
                "param_groups": [{**g, "params": [by_name[i] for i in g["params"]]} for g in saved["param_groups"]]}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = [[p for n, p in model.named_parameters() if n in decay],
              [p for n, p in model.named_parameters() if n not in decay]]
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
    opt = torch.optim.AdamW([{**h, "params": ps} for h, ps in zip(hyper, params)])
    full = StateDictOptions(full_state_dict=True)
    full_sd = {k: v for k, v in model.state_dict().items()}  # names only; values from the checkpoint
    from safetensors.torch import load_file
    weights = load_file(src / "model.safetensors")
    full_sd = {k: weights[k] if k in weights else weights["model.embed_tokens.weight"] for k in full_sd}
    set_model_state_dict(model, full_sd, options=full)
    set_optimizer_state_dict(model, opt, optim_state_dict=full_osd, options=full)
    sharded = StateDictOptions(full_state_dict=False)
    dcp.save({"model": get_model_state_dict(model, options=sharded)}, checkpoint_id=str(dest / "pytorch_model_fsdp_0"))
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt, options=sharded)},
             checkpoint_id=str(dest / "optimizer_0"))
    if rank == 0:
        for f in src.iterdir():
            if f.is_file() and f.name not in ("model.safetensors", "optimizer.pt", "rng_state.pth",
                                              "forgelab_manifest.json"):
                shutil.copy2(f, dest / f.name)
    shutil.copy2(src / "rng_state.pth", dest / f"rng_state_{rank}.pth")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
