"""Any intermediate checkpoint-N of any backend as a plain Hugging Face model directory, so a
run's middle can be evaluated, served or gated like its final model.

Where the weights come from, exact first:
- DeepSpeed ZeRO (any stage, any world size): the fp32 master weights reassembled from the
  ranks' partitions by DeepSpeed's own `zero_to_fp32` (not the 16-bit copy a ZeRO-3 save gathers);
- FSDP sharded state (torch.distributed.checkpoint, `pytorch_model_fsdp_0/`): merged by
  torch's `dcp_to_torch_save`;
- otherwise the checkpoint's own model files (single, ddp, fsdp with a full state dict);
- a LoRA checkpoint: its adapter (merge it with `forgelab merge`).
The checkpoint is verified against its manifest first; the result is written to a staging
folder and renamed into place, with `forgelab_source.json` saying what was converted."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .. import manifest
from ..config import RunError
from ..runs import now_iso, write_json
from .checkpoint import step_of

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
FSDP_DIR = "pytorch_model_fsdp_0"
FSDP_OPTIMIZER_DIR = "optimizer_0"


class ConvertError(RunError):
    """The checkpoint cannot be turned into a model; the message says why."""


def source_kind(ckpt: Path) -> str:
    if any(ckpt.glob("global_step*")) and (ckpt / "latest").is_file():
        return "deepspeed"
    if (ckpt / FSDP_DIR).is_dir():
        return "fsdp_sharded"
    if (ckpt / "adapter_model.safetensors").is_file():
        return "adapter"
    if (ckpt / "model.safetensors").is_file() or any(ckpt.glob("model-*.safetensors")) \
            or (ckpt / "pytorch_model.bin").is_file():
        return "model_files"
    raise ConvertError(f"{ckpt}: no weights found (no DeepSpeed global_step*/, no {FSDP_DIR}/, "
                       "no model*.safetensors, no adapter)")


def _zero_state(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))


def dcp_load(path: Path, key: str) -> dict:
    """Entry `key` of a torch.distributed.checkpoint folder, merged into full tensors in this
    process (accelerate saves {"model": state_dict} and {"optimizer": optimizer state})."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merged.pt"
        dcp_to_torch_save(str(path), str(out))
        state = torch.load(out, map_location="cpu", weights_only=True)
    return state.get(key, state)


def model_from_state(ckpt: Path, state: dict):
    """The checkpoint's architecture with `state` loaded; every weight must be there except
    the ones tied to another (the LM head of a tied embedding)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = AutoConfig.from_pretrained(ckpt)
    # built on the host with its own init: non-persistent buffers (RoPE frequencies) are not in
    # any state dict and must come from the model's code
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(conf.get_text_config() if hasattr(conf, "get_text_config") else conf, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConvertError(f"{ckpt}: the weights do not fit {conf.architectures}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model


def convert(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write checkpoint `ckpt` as a model directory `out`; returns the record written beside it."""
    ckpt, out = Path(ckpt).resolve(), Path(out)
    if not ckpt.is_dir():
        raise ConvertError(f"{ckpt}: not a directory")
    status, problems = manifest.verify(ckpt)
    if status == "bad":
        raise ConvertError(f"{ckpt} does not match its {manifest.NAME}: {'; '.join(problems)}")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} exists (pass --overwrite to replace it)")
    kind = source_kind(ckpt)
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        if kind == "adapter":
            for f in ADAPTER_FILES:
                shutil.copy2(ckpt / f, stage / f)
            how = "the LoRA adapter as saved (merge it into its base with forgelab merge)"
        else:
            if kind == "deepspeed":
                state = _zero_state(ckpt)
                ranks = len(list(next(ckpt.glob("global_step*")).glob("*optim_states.pt")))
                how = f"fp32 master weights reassembled from DeepSpeed ZeRO partitions of {ranks} rank(s)"
            elif kind == "fsdp_sharded":
                state = dcp_load(ckpt / FSDP_DIR, "model")
                how = f"FSDP sharded state ({FSDP_DIR}/) merged by torch.distributed.checkpoint"
            else:
                from transformers import AutoModelForCausalLM
                model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
                state = None
                how = "the checkpoint's own model files"
            if state is not None:
                model = model_from_state(ckpt, state)
            model.save_pretrained(stage, safe_serialization=True)
        for f in SIDE_FILES:
            if (ckpt / f).is_file() and not (stage / f).exists():
                shutil.copy2(ckpt / f, stage / f)
        rec = {"checkpoint": str(ckpt), "step": step_of(ckpt), "source": kind, "how": how,
               "checkpoint_manifest": status, "converted_at": now_iso()}
        write_json(stage / "forgelab_source.json", rec)
        manifest.write_manifest(stage)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return rec
