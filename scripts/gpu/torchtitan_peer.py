#!/usr/bin/env python3
"""Peer runner: torchtitan 0.2.2's own Trainer on its Qwen3 model, fed the lab's pre-tokenized
CPT blocks, timed step by step for a side-by-side with the lab's bench track.

What is torchtitan's and what is ours:
- torchtitan: JobConfig (parsed by its ConfigManager from a CLI list), Trainer (init, train loop,
  train_step, loss, fused AdamW, LR schedule, compile, activation checkpointing, float8
  converters), its metrics (tps, memory) and its HF tokenizer wrapper.
- ours: a registered flavor copy when the run's seq len exceeds the stock RoPE cap, a train spec
  "qwen3_forgelab" = the stock qwen3 spec with a dataloader over blocks.npy, a logger added to
  torchtitan's LoggerContainer that records each step's metrics, and a train_step wrapper that
  times the step after a CUDA sync.

Mixed precision: one GPU means no FSDP (dp_shard resolves to 1), so torchtitan keeps fp32
params (training.dtype=float32) and runs forward + loss under torch.autocast(bf16)
(training.mixed_precision_param=bfloat16), its dist_utils.maybe_enable_amp path.

usage: python scripts/gpu/torchtitan_peer.py --data .gpu/cpt8192/train --flavor 1.7B --seq-len 8192 \
         --batch 4 --steps 20 --warmup-skip 6 --compile --out OUT --name titan17-s8k
       python scripts/gpu/torchtitan_peer.py --dry-run --data .gpu/cpt32k/train   (CPU check)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

STOCK_CAP = 4096  # torchtitan 0.2.2's qwen3 flavors: max_seq_len=4096 (RoPE table length)


# ---------------------------------------------------------------- data: the lab's CPT blocks
class BlockStream(IterableDataset, Stateful):
    """The lab's blocks.npy as torchtitan samples ({"input": LongTensor[L]}, labels LongTensor[L]).

    pack="stream" (default): the blocks are consecutive cuts of one EOS-joined token stream, so
    they are read as that stream and cut into windows of seq_len+1 with stride seq_len, exactly
    as torchtitan's own HuggingFaceTextDataset cuts its token buffer (input = w[:-1], label =
    w[1:]). Input length is then the run's seq_len (the lab's input length too) whatever the
    directory's block length, so .gpu/cpt32k serves every seq len.
    pack="block": one block per sample, input = block[:-1], label = block[1:] (seq_len - 1
    positions; needs the directory's block length == --seq-len).
    Loops forever (torchtitan's infinite=True); state = position, for its checkpoint protocol."""

    def __init__(self, path: str, seq_len: int, pack: str = "stream"):
        d = Path(path)
        self.meta = json.loads((d / "meta.json").read_text())
        self.blocks = np.load(d / "blocks.npy", mmap_mode="r")
        assert self.blocks.dtype == np.int32 and self.blocks.shape == (self.meta["n_blocks"], self.meta["seq_len"]), \
            f"{d}: blocks.npy {self.blocks.dtype} {self.blocks.shape} does not match meta.json"
        self.seq_len, self.pack = seq_len, pack
        if pack == "block":
            assert self.meta["seq_len"] == seq_len, f"pack=block needs block length {self.meta['seq_len']} == --seq-len"
            self.n = self.blocks.shape[0]
        else:
            self.flat = self.blocks.reshape(-1)  # a view of the memory map, no copy
            self.n = (self.flat.shape[0] - 1) // seq_len
        assert self.n > 0, f"{d}: fewer than seq_len+1 tokens"
        self.idx = 0

    def _sample(self, i: int) -> np.ndarray:
        if self.pack == "block":
            return np.asarray(self.blocks[i], dtype=np.int64)
        return np.asarray(self.flat[i * self.seq_len: (i + 1) * self.seq_len + 1], dtype=np.int64)

    def __iter__(self):
        while True:
            w = torch.from_numpy(self._sample(self.idx % self.n))
            self.idx += 1
            yield {"input": w[:-1]}, w[1:]

    def state_dict(self):
        return {"idx": self.idx}

    def load_state_dict(self, sd):
        self.idx = sd["idx"]


def build_block_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=True):
    """Same signature and return type as torchtitan's build_text_dataloader, so the Trainer calls
    it through the train spec; the data path comes from --training.dataset_path."""
    from torchtitan.components.dataloader import ParallelAwareDataloader
    assert dp_world_size == 1, "one GPU: no data-parallel sharding of the blocks"
    ds = BlockStream(job_config.training.dataset_path, job_config.training.seq_len, os.environ.get("TT_PEER_PACK", "stream"))
    kw = {**dataclasses.asdict(job_config.training.dataloader), "batch_size": job_config.training.local_batch_size}
    return ParallelAwareDataloader(ds, dp_rank=dp_rank, dp_world_size=dp_world_size, **kw)


# ---------------------------------------------------------------- model registry + train spec
def register(flavor: str, seq_len: int) -> str:
    """A flavor copy with max_seq_len = seq_len in torchtitan's own qwen3 flavor dict when the run
    is longer than the stock cap (0.2.2's update_from_config also raises it, with a warning; the
    copy keeps the stock entry untouched and names the long flavor in the logs), and the train
    spec qwen3_forgelab (stock spec, our dataloader). Returns the flavor name to run."""
    import torchtitan.models.qwen3 as q3
    import torchtitan.protocols.train_spec as ts
    name = flavor
    if seq_len > q3.qwen3_args[flavor].max_seq_len:
        name = f"{flavor}-{seq_len}"
        q3.qwen3_args[name] = dataclasses.replace(q3.qwen3_args[flavor], max_seq_len=seq_len)
    if "qwen3_forgelab" not in ts._extra_train_specs:
        spec = dataclasses.replace(q3.get_train_spec(), build_dataloader_fn=build_block_dataloader)
        ts.register_train_spec("qwen3_forgelab", spec)
    return name


def titan_args(a, flavor_name: str) -> list[str]:
    """torchtitan CLI flags (tyro) for the run; everything not named stays torchtitan's default
    (AdamW lr 8e-4, eps 1e-8, wd 0.1, fused; linear warmup/decay; max_norm 1.0)."""
    args = [
        "--model.name", "qwen3_forgelab", "--model.flavor", flavor_name, "--model.hf_assets_path", a.tok,
        "--training.dataset", "forgelab_cpt_blocks", "--training.dataset_path", a.data,
        "--training.local_batch_size", str(a.batch), "--training.seq_len", str(a.seq_len),
        "--training.steps", str(a.steps), "--lr_scheduler.warmup_steps", str(a.lr_warmup),
        "--optimizer.implementation", "fused", "--metrics.log_freq", "1",
        "--activation_checkpoint.mode", a.ac,  # 0.2.2's default is selective: always say which
        "--checkpoint.no-enable", "--job.dump_folder", f"/tmp/titan_dump/{a.name}",  # comm-trace dir only; kept out of OUT
        "--debug.seed", str(a.seed),
    ]
    if a.compile:
        args += ["--compile.enable"]
    if a.fp8 != "none":
        args += ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.recipe_name", a.fp8]
    return args + a.titan_extra


# ---------------------------------------------------------------- CPU dry run
def dry_run(a) -> int:
    import importlib.util
    import types
    if importlib.util.find_spec("triton") is None:
        # CPU torch has no triton; torchtitan imports its MoE triton kernel module at package
        # import (via the float8 converter). Qwen3 dense never calls it: a placeholder suffices here.
        stub = types.ModuleType("torchtitan.models.moe.kernels")
        stub.generate_permute_indices = None
        sys.modules["torchtitan.models.moe.kernels"] = stub
        print("no triton: torchtitan.models.moe.kernels replaced by a placeholder (CPU dry run only)")
    from torchtitan.config import ConfigManager
    import torchtitan.protocols.train_spec as ts
    import torchtitan
    flavor_name = register(a.flavor, a.seq_len)
    cfg = ConfigManager().parse_args(titan_args(a, flavor_name))
    spec = ts.get_train_spec(cfg.model.name)
    margs = spec.model_args[cfg.model.flavor]
    margs.update_from_config(cfg)
    print(f"torchtitan {torchtitan.__version__}; JobConfig ok: model {cfg.model.name}/{cfg.model.flavor} "
          f"max_seq_len {margs.max_seq_len} vocab {margs.vocab_size} ac {cfg.activation_checkpoint.mode} "
          f"compile {cfg.compile.enable} converters {cfg.model.converters} "
          f"float8 recipe {cfg.quantize.linear.float8.recipe_name} lr {cfg.optimizer.lr} "
          f"warmup {cfg.lr_scheduler.warmup_steps} steps {cfg.training.steps} "
          f"impl {cfg.optimizer.implementation} dtype {cfg.training.dtype} mp {cfg.training.mixed_precision_param}")
    with torch.device("meta"):
        model = spec.model_cls(margs)
    nparams, flops = margs.get_nparams_and_flops(model, cfg.training.seq_len)
    print(f"meta model {cfg.model.flavor}: {nparams:,} params, {flops:,} flops/token")
    tok = spec.build_tokenizer_fn(cfg)
    dl = spec.build_dataloader_fn(dp_world_size=1, dp_rank=0, tokenizer=tok, job_config=cfg)
    it = iter(dl)
    for k in range(2):
        x, y = next(it)
        inp = x["input"]
        want = a.seq_len - (a.pack == "block")  # block: input = block[:-1]
        ok = inp.shape == y.shape == (a.batch, want) and bool((inp[:, 1:] == y[:, :-1]).all())
        print(f"batch {k}: input {tuple(inp.shape)} {inp.dtype} labels {tuple(y.shape)} shifted-by-one {ok} "
              f"max id {int(inp.max())} < vocab {margs.vocab_size}: {int(inp.max()) < margs.vocab_size}")
        assert ok
    # a tiny real model of the same class on CPU: forward + torchtitan's loss + backward on a cut batch
    tiny = dataclasses.replace(margs, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, hidden_dim=128,
                               max_seq_len=a.seq_len)
    with torch.device("meta"):
        m = spec.model_cls(tiny)
    m.to_empty(device="cpu")
    with torch.no_grad():
        m.init_weights(buffer_device=None)
    loss_fn = spec.build_loss_fn(cfg, parallel_dims=None)
    n = min(a.seq_len, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = m(inp[:1, :n])
        loss = loss_fn(pred, y[:1, :n]) / n  # torchtitan's loss is a sum; the Trainer divides by valid tokens
    loss.backward()
    print(f"tiny qwen3 on CPU: logits {tuple(pred.shape)} loss {loss.item():.3f} (ln V = {np.log(tiny.vocab_size):.3f})")
    return 0


# ---------------------------------------------------------------- GPU run
def run(a) -> int:
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)  # one process without torchrun: torchtitan reads these
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import torchtitan
    from torchtitan.components.metrics import BaseLogger
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger
    from torchtitan.train import Trainer
    init_logger()
    flavor_name = register(a.flavor, a.seq_len)
    targs = titan_args(a, flavor_name)
    cfg = ConfigManager().parse_args(targs)
    rows: list[dict] = []
    peak = {"alloc": 0}

    class Capture(BaseLogger):
        """Wraps torchtitan's metric logger (a no-op BaseLogger without tensorboard/wandb): gets each
        step's metrics dict (log_freq=1) before torchtitan resets the peak-memory counters, so
        max_memory_allocated here is that step's peak; forwards to the wrapped logger."""
        def __init__(self, inner):
            self.inner = inner

        def log(self, metrics, step):
            peak["alloc"] = max(peak["alloc"], torch.cuda.max_memory_allocated())
            rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
            self.inner.log(metrics, step)

        def close(self):
            self.inner.close()

    class TimedTrainer(Trainer):
        def train_step(self, data_iterator):
            torch.cuda.synchronize()
            t, n0 = time.perf_counter(), self.ntokens_seen
            super().train_step(data_iterator)
            torch.cuda.synchronize()
            rows_t.append((self.step, time.perf_counter() - t, self.ntokens_seen - n0))

    rows_t: list[tuple] = []
    trainer = TimedTrainer(cfg)
    trainer.metrics_processor.logger = Capture(trainer.metrics_processor.logger)
    t0 = time.time()
    status = "ok"
    try:
        trainer.train()
    except torch.OutOfMemoryError as e:
        status = f"oom: {str(e)[:200]}"
    except Exception as e:  # keep the steps measured so far; the traceback goes to the log
        import traceback
        traceback.print_exc()
        status = f"error: {e!r}"[:300]
    finally:
        trainer.close()
    by = {r["step"]: r for r in rows}
    steps = []
    for s, dt, ntok in rows_t:
        r = by.get(s, {})
        steps.append({"step": s, "loss": r.get("loss_metrics/global_avg_loss"), "seconds": dt, "tokens": ntok,
                      "tokens_per_s": ntok / dt, "titan_tps": r.get("throughput(tps)"), "titan_mfu_pct": r.get("mfu(%)"),
                      "titan_max_reserved_gib": r.get("memory/max_reserved(GiB)"),
                      "titan_max_active_gib": r.get("memory/max_active(GiB)"), "grad_norm": r.get("grad_norm")})
    steady = [x for x in steps if x["step"] > a.warmup_skip]
    tps = [x["tokens_per_s"] for x in steady]
    ttps = [x["titan_tps"] for x in steady if x["titan_tps"]]
    out = {
        "name": a.name, "status": status, "torchtitan_version": torchtitan.__version__,
        "torch_version": torch.__version__, "device": torch.cuda.get_device_name(),
        "command": [sys.executable, *sys.argv], "torchtitan_args": targs,
        "flavor": a.flavor, "flavor_registered": flavor_name, "seq_len": a.seq_len, "local_batch_size": a.batch,
        "compile": a.compile, "fp8": a.fp8, "activation_checkpoint": a.ac, "pack": a.pack, "data": a.data,
        "mixed_precision": f"fp32 params (training.dtype={cfg.training.dtype}) + torch.autocast("
                           f"{cfg.training.mixed_precision_param}) (single GPU: no FSDP)",
        "optimizer": {"name": cfg.optimizer.name, "lr": cfg.optimizer.lr, "implementation": cfg.optimizer.implementation,
                      "weight_decay": cfg.optimizer.weight_decay, "warmup_steps": cfg.lr_scheduler.warmup_steps},
        "num_params": sum(p.numel() for m in trainer.model_parts for p in m.parameters()), "flops_per_token": trainer.metrics_processor.num_flops_per_token,
        "warmup_skip": a.warmup_skip, "steady_steps": len(steady),
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "tokens_per_s_mean": sum(x["tokens"] for x in steady) / sum(x["seconds"] for x in steady) if steady else None,
        "titan_tps_median": statistics.median(ttps) if ttps else None,
        "titan_mfu_pct_median": statistics.median([x["titan_mfu_pct"] for x in steady if x["titan_mfu_pct"]] or [0]),
        "peak_memory_allocated_bytes": peak["alloc"],
        "titan_max_reserved_gib": max((x["titan_max_reserved_gib"] or 0 for x in steps), default=None),
        "titan_max_active_gib": max((x["titan_max_active_gib"] or 0 for x in steps), default=None),
        "final_loss": steps[-1]["loss"] if steps else None, "wall_s": time.time() - t0, "steps": steps,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, f"{a.name}.json").write_text(json.dumps(out, indent=1))
    print(f"SUMMARY {a.name}: status {status} tok/s median {out['tokens_per_s_median'] or 0:,.0f} mean "
          f"{out['tokens_per_s_mean'] or 0:,.0f} (titan tps {out['titan_tps_median'] or 0:,.0f}, mfu "
          f"{out['titan_mfu_pct_median']:.1f}%) peak alloc {peak['alloc']/2**30:.1f} GiB reserved "
          f"{out['titan_max_reserved_gib'] or 0:.1f} GiB loss {out['final_loss']} steps {len(steps)}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if status == "ok" else 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="1.7B", choices=["0.6B", "1.7B"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="local batch size (one GPU: also the global one)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-skip", type=int, default=6, help="steps left out of the steady tokens/s")
    p.add_argument("--lr-warmup", type=int, default=2, help="LR warmup steps (torchtitan's 200 exceeds a short run)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp8", default="none", choices=["none", "tensorwise", "rowwise"])
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    p.add_argument("--pack", default="stream", choices=["stream", "block"], help="see BlockStream")
    p.add_argument("--data", default=".gpu/cpt2048/train", help="dir with blocks.npy + meta.json")
    p.add_argument("--tok", default=".gpu/tok", help="HF tokenizer dir (torchtitan's model.hf_assets_path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/gpu_out")
    p.add_argument("--name", default="titan")
    p.add_argument("--dry-run", action="store_true", help="CPU: config, flavor, meta model, 2 batches, tiny fwd/bwd")
    p.add_argument("titan_extra", nargs="*", help="after --: more torchtitan flags, passed through")
    a = p.parse_args()
    os.environ["TT_PEER_PACK"] = a.pack  # read by build_block_dataloader (its signature is torchtitan's)
    return dry_run(a) if a.dry_run else run(a)


if __name__ == "__main__":
    sys.exit(main())
