"""checkpoint-to-model on the layout accelerate writes for FSDP's sharded state dict
(torch.distributed.checkpoint under pytorch_model_fsdp_0/, saved as {"model": state_dict});
on CPU accelerate runs FSDP as DDP, so the layout is written here by torch's own DCP writer
from a real model. The 2-rank ZeRO and fsdp runs are converted in tests/test_train_dist.py."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from forgelab import manifest
from forgelab.train.ckpt_model import ConvertError, convert


def test_fsdp_sharded_checkpoint_becomes_the_model(tiny_model_dir, tmp_path):
    import torch.distributed.checkpoint as dcp
    ckpt = tmp_path / "checkpoint-7"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "model.safetensors").unlink()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    dcp.save({"model": ref.state_dict()}, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    manifest.write_manifest(ckpt)
    rec = convert(ckpt, tmp_path / "model")
    assert rec["source"] == "fsdp_sharded" and rec["step"] == 7 and rec["checkpoint_manifest"] == "ok"
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ids = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)
    assert manifest.verify(tmp_path / "model")[0] == "ok"
    with pytest.raises(ConvertError, match="exists"):
        convert(ckpt, tmp_path / "model")


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ConvertError, match="no weights found"):
        convert(tmp_path / "checkpoint-1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
