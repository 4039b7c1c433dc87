"""Turn a GGUF checkpoint into a plain Hugging Face model directory (safetensors, tokenizer,
chat template, generation config), once. transformers can load GGUF but refuses to save a
GGUF-loaded model, so the dequantized weights go into a fresh model of the same config."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..runs import read_json, sha256_file, write_json

STAMP = "forgelab_source.json"


def gguf_to_hf(gguf_path: Path, out_dir: Path, log=None) -> dict:
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src_sha = sha256_file(gguf_path)
    stamp = out_dir / STAMP
    if stamp.exists() and read_json(stamp).get("sha256") == src_sha:
        return {"output": str(out_dir), "action": "skipped (up to date)"}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if log:
        log.info("dequantizing %s -> %s", gguf_path.name, out_dir)
    d, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    conf_dict = gguf_model.config.to_dict()
    conf_dict.pop("quantization_config", None)
    conf_dict["torch_dtype"] = "float32"
    conf = AutoConfig.for_model(**conf_dict)
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()

    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    gen.save_pretrained(tmp)
    write_json(tmp / STAMP, {"source": str(gguf_path), "sha256": src_sha,
                             "params": sum(p.numel() for p in model.parameters())})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {"output": str(out_dir), "action": "converted",
            "params": sum(p.numel() for p in model.parameters())}
