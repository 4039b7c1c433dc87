"""The run directory of a training run: clearing an earlier run's outputs (or keeping the
interrupted session's summary when resuming), and the final model, written like checkpoints
(staging dir, then one rename)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..runs import read_json, write_json
from . import checkpoint as ckpt

# outputs of an earlier training session in a run dir (run.log and config.yaml are kept)
RUN_OUTPUTS = ("metrics.jsonl", "eval_metrics.jsonl", "tb", "final", "profile", "train_summary.json",
               "profile_summary.json", "resume_validation.json")


def prepare_run_dir(pre, is_main: bool) -> list[str]:
    """Rank 0: drop unfinished saves; when not resuming (and overwrite is on), clear old outputs."""
    if not is_main:
        return []
    done = [f"removed unfinished save {n}" for n in ckpt.clean_staging(pre.run_dir)]
    if pre.resume is None and pre.conf.checkpoint.overwrite and pre.run_dir.is_dir():
        for name in RUN_OUTPUTS:
            p = pre.run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
                done.append(f"cleared {name}/")
            elif p.exists():
                p.unlink()
                done.append(f"cleared {name}")
        for _, p in ckpt.complete_checkpoints(pre.run_dir):
            shutil.rmtree(p)
            done.append(f"cleared {p.name}")
        for p in pre.run_dir.glob("train_summary.step*.json"):
            p.unlink()
    elif pre.resume is not None and (pre.run_dir / "train_summary.json").is_file():
        # keep the interrupted/stopped session's summary next to the new one
        old = read_json(pre.run_dir / "train_summary.json")
        os.replace(pre.run_dir / "train_summary.json",
                   pre.run_dir / f"train_summary.step{old.get('steps', 'x')}.json")
    return done


def save_final(trainer, pre, extra: dict) -> Path:
    """final/: weights (safetensors) or the LoRA adapter, tokenizer + chat template, generation
    config; written to a staging dir and renamed, like checkpoints."""
    final = pre.run_dir / "final"
    staging = pre.run_dir / f"{ckpt.STAGING}final"
    main = trainer.args.should_save
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank: ZeRO-3 gathers the weights collectively
    if main:
        model = trainer.accelerator.unwrap_model(trainer.model)
        gen = getattr(model, "generation_config", None)
        if gen is not None and not (staging / "generation_config.json").exists() and \
                not (staging / "adapter_config.json").exists():
            gen.save_pretrained(staging)
        (staging / "training_args.bin").unlink(missing_ok=True)
        write_json(staging / "forgelab_train.json", extra)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final
