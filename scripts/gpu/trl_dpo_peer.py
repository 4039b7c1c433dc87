#!/usr/bin/env python3
"""The peer of the lab's DPO bench: TRL's own DPOTrainer as its documentation starts it, with
TRL's defaults (DPOConfig: gradient checkpointing on, bf16 autocast, fp32 weights, max_length
1024, per-device batch 8), the same LoRA adapters, model shape, seed and pairs as the lab's run.
Only what a benchmark needs is added: one log line per step and a callback that times steps,
reads TRL's own token count (`num_tokens`) and the CUDA peak. Writes OUT/NAME.json.

  python scripts/gpu/trl_dpo_peer.py --out DIR --name trl-dpo17 --preset qwen3-1.7b --tok .gpu/tok \
      --data .gpu/pref_gsm.jsonl --steps 12 --skip 4 [--batch 8] [--set key=value ...]
"""
import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from forgelab.model.presets import build_config


class Clock(TrainerCallback):
    def __init__(self):
        self.rows, self.t = [], None

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.t = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and self.t is not None:
            self.rows.append({"step": state.global_step, "num_tokens": logs.get("num_tokens"),
                              "loss": logs["loss"], "seconds": time.perf_counter() - self.t})


def main() -> int:
    p = argparse.ArgumentParser()
    for k in ("--out", "--name", "--preset", "--tok", "--data"):
        p.add_argument(k, required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--set", action="append", default=[], help="DPOConfig field=value (JSON value)")
    a = p.parse_args()
    set_seed(42)
    tok = AutoTokenizer.from_pretrained(a.tok)
    mc = build_config(a.preset)
    mc.vocab_size = max(mc.vocab_size, len(tok))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # as the lab's random-init build sets them
        setattr(mc, k, getattr(tok, k) if getattr(tok, k) is not None else tok.eos_token_id)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(mc, dtype=torch.float32)
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    args = DPOConfig(output_dir=f"/tmp/{a.name}", max_steps=a.steps, per_device_train_batch_size=a.batch,
                     logging_steps=1, report_to="none", save_strategy="no", **extra)
    peft = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft, callbacks=[clock])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = clock.rows[a.skip:]
    toks = [r["num_tokens"] for r in clock.rows]
    step_tokens = [b - a_ for a_, b in zip([0.0] + toks[:-1], toks)][a.skip:]
    secs = sum(r["seconds"] for r in steady)
    res = {"name": a.name, "tool": "trl", "trl_config": {k: getattr(args, k) for k in (
        "gradient_checkpointing", "bf16", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
        "loss_type", "beta", "precompute_ref_log_probs", "padding_free", "torch_compile")},
        "steps": len(clock.rows), "steady_steps": len(steady), "tokens_per_s_steady": sum(step_tokens) / secs,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(), "final_loss": clock.rows[-1]["loss"],
        "rows": clock.rows, "command": "python scripts/gpu/trl_dpo_peer.py " + " ".join(
            f"{k} {v}" for k, v in vars(a).items() if not isinstance(v, list))}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{a.name}.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"{a.name}: {res['tokens_per_s_steady']:,.0f} tokens/s, peak {res['peak_memory_bytes'] / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
