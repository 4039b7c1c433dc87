"""The run directory of a training run: clearing an earlier run's outputs (or keeping the
interrupted session's summary when resuming), and the final model, written like checkpoints
(staging dir, then one rename)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import manifest
from ..config import RunError
from ..model.tokenizer_info import FILES as TOKENIZER_FILES
from ..runs import read_json, write_json
from . import checkpoint as ckpt

# outputs of an earlier training session in a run dir (run.log and config.yaml are kept)
RUN_OUTPUTS = ("metrics.jsonl", "eval_metrics.jsonl", "tb", "final", "profile", "train_summary.json",
               "profile_summary.json", "resume_validation.json", "samples")


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
    try:
        trainer.save_model(str(staging))  # every rank: ZeRO-3 gathers the weights collectively
        if main:
            model = trainer.accelerator.unwrap_model(trainer.model)
            gen = getattr(model, "generation_config", None)
            if gen is not None and not (staging / "generation_config.json").exists() and \
                    not (staging / "adapter_config.json").exists():
                gen.save_pretrained(staging)
            (staging / "training_args.bin").unlink(missing_ok=True)
            # TRL's DPO/KTO keep a copy of the initial adapters as the reference ("ref"): not part of the result
            shutil.rmtree(staging / "ref", ignore_errors=True)
            (staging / "README.md").unlink(missing_ok=True)  # TRL's generated model card
            write_json(staging / "forgelab_train.json", extra)
            manifest.write_manifest(staging, hash=pre.conf.checkpoint.manifest)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
    except Exception as e:
        why = ckpt.save_failure(final, e)
        shutil.rmtree(staging, ignore_errors=True)
        raise ckpt.CheckpointError(why) from e
    trainer.accelerator.wait_for_everyone()
    return final


def disk_check(pre, counts, lora: bool) -> tuple[dict, str | None]:
    """Free space against what the run will write: one checkpoint (fp32 weights saved, or the
    adapters; AdamW's two fp32 states per trainable parameter, ZeRO's fp32 master copy too;
    the tokenizer files) x (keep_last + 1, as a new one lands before the oldest goes), plus
    final/. Raises RunError when not even one save fits; returns (record, warning or None)."""
    conf = pre.conf
    ck = conf.checkpoint
    tok = sum((pre.tokenizer_dir / n).stat().st_size for n in TOKENIZER_FILES if (pre.tokenizer_dir / n).is_file())
    weights = 4 * (counts.trainable_params if lora else counts.params)
    per_param = 12 if pre.ds_config is not None else 8
    one = weights + per_param * counts.trainable_params + tok + 2**20
    final = weights + tok if ck.save_final else 0
    saves = ck.every_steps > 0 or bool(conf.steps.stop_after_steps)
    existing = len(ckpt.complete_checkpoints(pre.run_dir))
    n_new = max(1, ck.keep_last + 1 - existing) if ck.every_steps > 0 else (1 if saves else 0)
    need = one * n_new + final
    pre.run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(pre.run_dir).free
    rec = {"free_bytes": free, "checkpoint_bytes_estimate": one, "final_bytes_estimate": final,
           "needed_bytes": need, "checkpoints_counted": n_new}
    mib = 2**20
    first = one if saves else final
    if first and free < first:
        raise RunError(f"{pre.run_dir}: {free / mib:,.0f} MiB free, but one {'checkpoint' if saves else 'final model'} "
                       f"needs about {first / mib:,.0f} MiB; free space, move runs/ (FORGELAB_RUNS_DIR), or set "
                       "checkpoint.disk_check=false to try anyway")
    if need > free:
        return rec, (f"{free / mib:,.0f} MiB free in {pre.run_dir}, but {n_new} checkpoint(s) of about "
                     f"{one / mib:,.0f} MiB" + (f" and a final model of {final / mib:,.0f} MiB" if final else "")
                     + f" need {need / mib:,.0f} MiB: a save may fail (the earlier checkpoints stay intact); lower "
                       "checkpoint.keep_last or free space")
    return rec, None
