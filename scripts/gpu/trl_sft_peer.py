#!/usr/bin/env python3
"""The peer of the lab's packed SFT LoRA bench: TRL's own SFTTrainer with its packing
(best-fit decreasing, which turns on padding-free batches: one flat row per batch with
position_ids restarting at each sample, so transformers' packed-sequence mask keeps samples
apart under sdpa and flex attention alike), on exactly the samples the lab trains on: the
lab's packed store is split back into its samples (position_ids restart at 0), each given to
TRL as pre-tokenized input_ids with its completion mask (loss on the answer only, as the lab).
Same random-init model shape, LoRA (r, alpha, dropout, all linear layers), seed and max length.
A callback times steps and reads TRL's own token count (`num_tokens`) and the CUDA peak.
Writes OUT/NAME.json.

  python scripts/gpu/trl_sft_peer.py --out DIR --name trl-sft17 --preset qwen3-1.7b --tok .gpu/tok \
      --data .gpu/sft_gsm_packed/train --steps 12 --skip 4 [--batch 2] [--attn sdpa] [--set key=value ...]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from forgelab.model.presets import build_config


class Clock(TrainerCallback):
    def __init__(self):
        self.rows, self.t = [], None

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and self.t is not None:
            self.rows.append({"step": state.global_step, "num_tokens": logs.get("num_tokens"),
                              "loss": logs["loss"], "seconds": time.perf_counter() - self.t})


def samples(store: Path) -> list[dict]:
    """The lab's packed rows split back into samples: input_ids + completion_mask each."""
    ids = np.load(store / "input_ids.npy", mmap_mode="r")
    labels = np.load(store / "labels.npy", mmap_mode="r")
    pos = np.load(store / "position_ids.npy", mmap_mode="r")
    ids, labels, pos = (np.asarray(a).reshape(-1) for a in (ids, labels, pos))
    starts = np.flatnonzero(pos == 0).tolist() + [len(pos)]  # rows are stored unpadded
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        out.append({"input_ids": ids[a:b].tolist(),
                    "completion_mask": (labels[a:b] != -100).astype(np.int64).tolist()})
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    for k in ("--out", "--name", "--preset", "--tok", "--data"):
        p.add_argument(k, required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script only")
    p.add_argument("--set", action="append", default=[], help="SFTConfig field=value (JSON value)")
    a = p.parse_args()
    set_seed(42)
    tok = AutoTokenizer.from_pretrained(a.tok)
    mc = build_config(a.preset)
    mc.vocab_size = max(mc.vocab_size, len(tok))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # as the lab's random-init build sets them
        setattr(mc, k, getattr(tok, k) if getattr(tok, k) is not None else tok.eos_token_id)
    mc._attn_implementation = a.attn
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(mc, dtype=torch.float32, attn_implementation=a.attn)
    rows = samples(Path(a.data))
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    args = SFTConfig(output_dir=f"/tmp/{a.name}", max_steps=a.steps, per_device_train_batch_size=a.batch,
                     max_length=a.max_length, packing=True, packing_strategy="bfd", completion_only_loss=True,
                     bf16=a.device == "cuda", use_cpu=a.device == "cpu", learning_rate=1e-4, warmup_steps=2, logging_steps=1, report_to="none",
                     save_strategy="no", dataset_num_proc=4, **extra)
    peft = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft, callbacks=[clock])
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = clock.rows[a.skip:]
    toks = [r["num_tokens"] for r in clock.rows]
    step_tokens = [b - a_ for a_, b in zip([0.0] + toks[:-1], toks)][a.skip:]
    secs = sum(r["seconds"] for r in steady)
    res = {"name": a.name, "tool": "trl", "samples": len(rows), "sample_tokens": sum(len(r["input_ids"]) for r in rows),
           "attn_implementation": a.attn, "padding_free_effective": trainer.padding_free,
           "trl_config": {k: getattr(args, k) for k in (
               "gradient_checkpointing", "bf16", "max_length", "per_device_train_batch_size",
               "gradient_accumulation_steps", "packing", "packing_strategy", "padding_free", "completion_only_loss",
               "torch_compile")},
           "steps": len(clock.rows), "steady_steps": len(steady), "tokens_per_s_steady": sum(step_tokens) / secs,
           "tokens_per_step_steady": sum(step_tokens) / max(1, len(step_tokens)),
           "peak_memory_bytes": torch.cuda.max_memory_allocated() if a.device == "cuda" else 0, "final_loss": clock.rows[-1]["loss"],
           "rows": clock.rows, "command": "python scripts/gpu/trl_sft_peer.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if not isinstance(v, list))
           + "".join(f" --set {s}" for s in a.set)}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{a.name}.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"{a.name}: {res['tokens_per_s_steady']:,.0f} tokens/s, {res['tokens_per_step_steady']:,.0f} tokens/step, "
          f"peak {res['peak_memory_bytes'] / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
