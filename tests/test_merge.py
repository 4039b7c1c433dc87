"""LoRA merge: a real adapter (trained a few steps by peft on KJV text) merged into the tiny
model reproduces the PEFT logits; an impossible threshold or a tampered adapter fails."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from forgelab import config as cfg
from forgelab.train.merge import CHECK_FILE, MergeCheckError, MergeConfig, merge_lora, verify_merge

LOG = logging.getLogger("test_merge")
PROMPTS = ["In the beginning God created the heaven and the earth.", "请用一句话介绍北京。"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, raw_data, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    verses = [json.loads(line)["text"] for line in raw_data["kjv"].read_text(encoding="utf-8").splitlines()[:64]]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(6):  # a few real steps: lora_B leaves zero
        batch = tok(verses[step * 8:(step + 1) * 8], return_tensors="pt", padding=True, truncation=True,
                    max_length=48)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    b_norm = sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    assert b_norm > 0
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    conf = json.loads((out / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(tiny_model_dir)
    (out / "adapter_config.json").write_text(json.dumps(conf))
    return out


def _conf(adapter, out, **kw) -> MergeConfig:
    return cfg.build(MergeConfig, {"adapter": str(adapter), "output": str(out), "dtype": "float32",
                                   "prompts": PROMPTS, **kw})


def test_merge_matches_peft_and_saves_a_servable_dir(adapter_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    s = merge_lora(_conf(adapter_dir, out), LOG)
    rec = json.loads((out / CHECK_FILE).read_text())
    assert rec["passed"] and rec["max_abs_diff"] <= 1e-4 and rec["saved"] <= 1e-4
    assert rec["check_dtype"] == "float64" and rec["saved_dtype"] == "float32"
    assert s["max_abs_diff"] == rec["max_abs_diff"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # the adapter changed the model: merged logits differ from the base model's
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        gap = (merged(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item()
    assert gap > 1e-3
    assert not any(k.startswith("base_model") or "lora" in k for k in merged.state_dict())


def test_float32_check_and_bf16_output(adapter_dir, tmp_path):
    out = tmp_path / "merged"
    s = merge_lora(_conf(adapter_dir, out, check_dtype="float32", dtype="bfloat16"), LOG)
    assert s["check_dtype"] == "float32" and s["saved_dtype"] == "bfloat16" and s["in_memory"] <= 1e-4
    assert s["saved_half_precision"] > s["in_memory"]  # bf16 rounding of the saved weights, recorded
    import json as _json
    assert _json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_impossible_threshold_fails_and_publishes_nothing(adapter_dir, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(MergeCheckError, match="max_abs_diff"):
        merge_lora(_conf(adapter_dir, out, max_abs_diff=1e-12, check_dtype="float32"), LOG)
    assert not out.exists()
    assert not list(tmp_path.glob("merged.tmp*"))


def test_verify_detects_a_tampered_adapter(adapter_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    out = tmp_path / "merged"
    merge_lora(_conf(adapter, out), LOG)
    assert verify_merge(out)["max_abs_diff"] <= 1e-4
    f = adapter / "adapter_model.safetensors"
    weights = load_file(f)
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key] * 3.0
    save_file(weights, f)
    with pytest.raises(MergeCheckError, match="differ from the PEFT model"):
        verify_merge(out)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(cfg.ConfigError, match="prompts"):
        cfg.build(MergeConfig, {"prompts": []})
    with pytest.raises(cfg.ConfigError, match="adapter_config.json"):
        merge_lora(_conf(tmp_path, tmp_path / "o"), LOG)
