"""Merge a peft LoRA adapter into its base model and prove the merge: the merged model's logits
must match the PEFT model's on real prompts (max |diff| <= threshold), else nothing is
published. Both are evaluated in float64 by default: in float32 the two computation orders
(W x + s B A x vs (W + s B A) x) alone differ by ~1e-4 on SmolLM2's logits for any non-zero
adapter, which is the threshold itself. In float64 what remains is the saved weights' rounding
plus the fp32 upcast inside the RMSNorms (~1e-5). The output is a plain transformers model dir: safetensors, tokenizer + chat
template, generation config, and merge_check.json (the measured difference)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, field
from ..runs import now_iso, project_path, sha256_file, write_json

CHECK_FILE = "merge_check.json"

DEFAULT_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Continue the verse: In the beginning God created the heaven and the earth.",
    "请用一句话介绍北京。",
    "Write a short haiku about autumn rain.",
]


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce the adapter's outputs."""


@dataclass
class MergeConfig:
    adapter: str = field("runs/train/sft_lora/final",
                         help="LoRA adapter dir (adapter_config.json + adapter_model.safetensors)")
    base_model: Optional[str] = field(None, help="base model dir; null = the adapter's base_model_name_or_path")
    output: str = field("model/merged-sft", help="output model dir (replaced only when the check passes)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="dtype of the saved weights; auto = the base model's dtype")
    prompts: list[str] = field(DEFAULT_PROMPTS, help="prompts (rendered with the chat template) for the check")
    max_abs_diff: float = field(1e-4, help="fail when max |logits(merged) - logits(PEFT)| exceeds this")
    check_dtype: Literal["float64", "float32"] = field(
        "float64", help="precision both models are evaluated in for the check; float64 measures the merged "
                        "weights, float32 adds fp32 evaluation noise (~1e-4 on SmolLM2 logits)")
    threads: Optional[int] = field(None, help="torch CPU threads (default: torch's)")
    dequantize_base: Literal["auto", "nf4", "none"] = field(
        "auto", help="nf4: the adapter was trained on an NF4 base (QLoRA): the base is quantized and "
                     "dequantized the same way first, so the merge adds the adapter to the weights it "
                     "trained against (CUDA + bitsandbytes); auto: from the training run's lora.quantize_base")

    def validate(self) -> None:
        if not self.prompts:
            raise ConfigError("key 'prompts' is empty: the merge check needs at least one prompt")
        if self.max_abs_diff < 0:
            raise ConfigError(f"key 'max_abs_diff' must be >= 0, got {self.max_abs_diff}")


def resolve_base(adapter: Path, base: str | None) -> Path:
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"key 'adapter': {cfg_file} not found (not a peft adapter dir)")
    if base:
        path = project_path(base)
    else:
        name = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not name:
            raise ConfigError(f"{cfg_file}: no base_model_name_or_path; set key 'base_model'")
        path = project_path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(f"base model {path} has no config.json (set key 'base_model')")
    return path


def _tokenizer_source(adapter: Path, base: Path) -> Path:
    """The adapter dir when training saved the tokenizer there (the one SFT used), else the base."""
    return adapter if (adapter / "tokenizer_config.json").is_file() else base


def render_prompts(tok, prompts: list[str]) -> list[str]:
    if getattr(tok, "chat_template", None):
        return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                        add_generation_prompt=True) for p in prompts]
    return list(prompts)


def prompt_logits(model, tok, texts: list[str]):
    """Logits of each prompt (one at a time: no padding enters the comparison)."""
    import torch
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", add_special_tokens=False).input_ids
            out.append(model(input_ids=ids).logits.double())  # no rounding of the logits themselves
    return out


def max_abs_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _dtype(name: str, base: Path):
    import torch
    if name == "auto":
        conf = json.loads((base / "config.json").read_text(encoding="utf-8"))
        name = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_dtype(name: str):
    import torch
    return {"float64": torch.float64, "float32": torch.float32}[name]


def trained_on_nf4(adapter: Path, setting: str = "auto") -> bool:
    """Whether the adapter's base was NF4 during training (its run's config.yaml says so)."""
    if setting != "auto":
        return setting == "nf4"
    import yaml
    for conf_file in (adapter / "config.yaml", adapter.parent / "config.yaml"):
        if conf_file.is_file():
            data = yaml.safe_load(conf_file.read_text(encoding="utf-8")) or {}
            return ((data.get("lora") or {}).get("quantize_base") or "none") == "nf4"
    return False


def load_base(base: Path, dt, nf4: bool = False):
    """The base model in dtype dt; nf4: quantized to NF4 and dequantized again (what QLoRA trained on)."""
    import torch
    from transformers import AutoModelForCausalLM
    if not nf4:
        return AutoModelForCausalLM.from_pretrained(base, dtype=dt)
    if not torch.cuda.is_available():
        raise ConfigError("this adapter was trained on an NF4 base (QLoRA): merging it needs the same NF4 "
                          "rounding of the base, which bitsandbytes does on CUDA only; merge on a GPU machine "
                          "(or set dequantize_base: none to merge into the unquantized base, knowingly)")
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=q,
                                                 device_map={"": 0})
    return model.dequantize().to("cpu", dt)


def peft_reference(base: Path, adapter: Path, texts: list[str], tok, check_dtype: str = "float64",
                   nf4: bool = False):
    """(PEFT model with base and adapter weights in the check dtype, its logits on the prompts)."""
    from peft import PeftModel
    dt = _check_dtype(check_dtype)
    model = load_base(base, dt, nf4)
    peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False).to(dt)
    peft_model.eval()
    return peft_model, prompt_logits(peft_model, tok, texts)


def verify_merged(merged_dir: Path, reference: list, tok, texts: list[str], threshold: float,
                  check_dtype: str = "float64") -> float:
    """Reload a merged dir in the check dtype and compare with the reference logits; raise when over."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=_check_dtype(check_dtype))
    model.eval()
    diff = max_abs_diff(prompt_logits(model, tok, texts), reference)
    if diff > threshold:
        raise MergeCheckError(f"{merged_dir}: merged logits differ from the PEFT model by {diff:.3e} "
                              f"> max_abs_diff {threshold:.1e} on {len(texts)} prompts")
    return diff


def merge_lora(conf: MergeConfig, log) -> dict:
    """Merge, save to a staging dir, check the saved model against PEFT, then publish."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    if conf.threads:
        torch.set_num_threads(conf.threads)
    adapter = project_path(conf.adapter)
    from ..manifest import require_intact
    require_intact(adapter, "adapter")
    base = resolve_base(adapter, conf.base_model)
    out = project_path(conf.output)
    tok = AutoTokenizer.from_pretrained(_tokenizer_source(adapter, base))
    texts = render_prompts(tok, conf.prompts)
    save_dtype = _dtype(conf.dtype, base)

    log.info("PEFT reference: %s + %s (%s, %d prompts)", base, adapter, conf.check_dtype, len(texts))
    nf4 = trained_on_nf4(adapter, conf.dequantize_base)
    if nf4:
        log.info("QLoRA adapter: the base is NF4-quantized and dequantized before the merge")
    peft_model, reference = peft_reference(base, adapter, texts, tok, conf.check_dtype, nf4)
    # merged in the check dtype, rounded once to the saved dtype
    merged = peft_model.merge_and_unload()
    in_memory = max_abs_diff(prompt_logits(merged, tok, texts), reference)
    log.info("merged in memory: max |diff| %.3e", in_memory)

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            gen = GenerationConfig.from_pretrained(base)
        except OSError:
            gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
        gen.save_pretrained(tmp)
        check = {"prompts": len(texts), "threshold": conf.max_abs_diff, "check_dtype": conf.check_dtype,
                 "in_memory": in_memory, "saved_dtype": str(save_dtype).replace("torch.", "")}
        if in_memory > conf.max_abs_diff:
            raise MergeCheckError(f"merged logits differ from the PEFT model by {in_memory:.3e} > "
                                  f"max_abs_diff {conf.max_abs_diff:.1e} (in memory, {conf.check_dtype})")
        if save_dtype in (torch.float32, torch.float64):
            check["saved"] = verify_merged(tmp, reference, tok, texts, conf.max_abs_diff, conf.check_dtype)
        else:
            # half-precision weights cannot reproduce full-precision logits to 1e-4: the merge in
            # the check dtype is the gate, the saved files' difference is recorded for information
            check["saved_half_precision"] = verify_merged(tmp, reference, tok, texts, float("inf"),
                                                          conf.check_dtype)
        check["max_abs_diff"] = max(check.get("saved", 0.0), in_memory)
        check["passed"] = True
        adapter_file = adapter / "adapter_model.safetensors"
        record = {"base_model": str(base), "adapter": str(adapter),
                  "adapter_sha256": sha256_file(adapter_file) if adapter_file.is_file() else None,
                  "checked_at": now_iso(), **check}
        write_json(tmp / CHECK_FILE, record)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(p.numel() for p in merged.parameters())
    log.info("merged model -> %s (%s, %d params, max |diff| %.3e)", out, record["saved_dtype"], params,
             record["max_abs_diff"])
    return {"output": str(out), "params": params, **record}


def verify_merge(merged_dir: str | Path, adapter: str | Path | None = None, base_model: str | None = None,
                 prompts: list[str] | None = None, threshold: float | None = None,
                 check_dtype: str | None = None) -> dict:
    """Re-check a published merge against its adapter (e.g. after the adapter changed)."""
    merged_dir = project_path(merged_dir)
    rec_file = merged_dir / CHECK_FILE
    rec = json.loads(rec_file.read_text(encoding="utf-8")) if rec_file.is_file() else {}
    adapter = project_path(adapter or rec.get("adapter") or "")
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"no adapter to verify {merged_dir} against (pass adapter; {rec_file} has none)")
    base = resolve_base(adapter, base_model or rec.get("base_model"))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(merged_dir)
    texts = render_prompts(tok, prompts or DEFAULT_PROMPTS)
    thr = rec.get("threshold", 1e-4) if threshold is None else threshold
    dt = check_dtype or rec.get("check_dtype", "float64")
    _, reference = peft_reference(base, adapter, texts, tok, dt)
    diff = verify_merged(merged_dir, reference, tok, texts, thr, dt)
    return {"merged": str(merged_dir), "adapter": str(adapter), "max_abs_diff": diff, "threshold": thr,
            "check_dtype": dt}
