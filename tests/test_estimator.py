"""The pre-flight estimator against what can be measured without a GPU: exact byte counts of
real weights, gradients and AdamW states; saved-for-backward activation bytes measured with
autograd's saved-tensor hooks (full, mixed precision, LoRA); the step formula on known cases;
and recorded H100 and H200 measurements (within 10%; the compiled mode's fit within 1%)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from forgelab.model.presets import build_config
from forgelab.runs import PROJECT_ROOT
from forgelab.estimate.estimator import (Knobs, estimate_run, estimate_steps, format_table, read_train_shape)

GiB = 2**30


# ----------------------------------------------------------------------------- steps

def test_steps_seed_example():
    # 2876 samples, 15% held out -> 2446; batch 1 x 2 GPUs x accumulation 8 = 16 per update
    s = estimate_steps(2446, micro_batch=1, world_size=2, grad_accum=8, epochs=3, rounding="floor")
    assert (s["effective_batch"], s["steps_per_epoch"], s["steps"]) == (16, 152, 456)
    # the HF Trainer keeps the last partial accumulation: ceil(ceil(2446 / 2) / 8)
    assert estimate_steps(2446, 1, 2, 8, 3, rounding="ceil")["steps_per_epoch"] == 153
    assert estimate_steps(2446, 1, 2, 8, 3, max_steps=100)["steps"] == 100
    assert estimate_steps(160, 4, 2, 2, 1.5, rounding="floor")["steps"] == 15
    with pytest.raises(ValueError):
        estimate_steps(10, 0, 1, 1)


def test_steps_from_a_config_dict():
    conf = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "num_train_epochs": 3,
            "dataloader_drop_last": True}
    e = estimate_run(conf, build_config("tiny"), 2446, 2)
    assert e["steps"] == 456 and e["steps_detail"]["steps_per_epoch"] == 152


def test_reads_the_training_schema():
    from forgelab import config as cfg
    from forgelab.train.config import TrainConfig
    conf = cfg.build(TrainConfig, {"task": "sft", "model": {"path": "m"},
                                   "steps": {"max_steps": 40, "micro_batch_size": 4, "grad_accum": 2},
                                   "runtime": {"gradient_checkpointing": True, "precision": "bf16"},
                                   "lora": {"r": 32, "dropout": 0.1}, "backend": "zero2",
                                   "dist": {"deepspeed": "configs/ds/zero2.json"}})
    s, notes = read_train_shape(conf)
    assert (s.micro_batch, s.grad_accum, s.max_steps, s.precision) == (4, 2, 40, "bf16")
    assert s.gradient_checkpointing and s.lora["r"] == 32 and s.lora["dropout"] == 0.1
    assert s.zero_stage == 2 and not s.offload_optimizer
    assert any("from steps.micro_batch_size" in n for n in notes)
    conf.task = "cpt"  # the lora section's defaults do not make a CPT run LoRA
    assert read_train_shape(conf)[0].lora is None


# ----------------------------------------------------------------------------- exact state bytes

def _real_step(model, params):
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    states = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    return states, grads


@pytest.mark.parametrize("dtype,prec", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_weight_grad_optimizer_bytes_are_exact(dtype, prec):
    from transformers import AutoModelForCausalLM
    c = build_config("tiny", vocab_size=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(c).to(dtype)
    params = [p for p in model.parameters()]
    states, grads = _real_step(model, params)
    e = estimate_run({"precision": prec, "model_dtype": str(dtype).split(".")[-1], "seq_len": 16,
                      "per_device_batch_size": 2}, c, 10, 1)
    b = e["breakdown"]
    assert b["weights"] == sum(p.numel() * p.element_size() for p in params)
    assert b["gradients"] == grads
    assert b["optimizer_states"] == states


def test_lora_trainable_counts_and_state_bytes_are_exact():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    c = build_config("tiny", vocab_size=512)
    model = get_peft_model(AutoModelForCausalLM.from_config(c),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    states, grads = _real_step(model, params)
    e = estimate_run({"precision": "fp32", "seq_len": 16, "method": "lora",
                      "lora": {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}}, c, 10, 1)
    assert e["params"]["trainable"] == sum(p.numel() for p in params)
    assert e["breakdown"]["optimizer_states"] == states and e["breakdown"]["gradients"] == grads


# ----------------------------------------------------------------------------- activations

def saved_bytes(model, ids, autocast: bool) -> int:
    """Bytes of every distinct non-parameter tensor autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.numel():
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, labels=ids)
    return sum(seen.values())


CASES = {  # name: (weights dtype, autocast, LoRA dropout or None)
    "bf16 weights": (torch.bfloat16, False, None),
    "fp32": (torch.float32, False, None),
    "fp32 weights + bf16 autocast": (torch.float32, True, None),
    "LoRA, dropout, autocast": (torch.bfloat16, True, 0.05),
    "LoRA, no dropout, fp32": (torch.float32, False, 0.0),
}


@pytest.mark.parametrize("arch", ["tiny", "qwen3-0.6b"])
@pytest.mark.parametrize("case", list(CASES))
def test_activation_formula_matches_saved_tensors(arch, case):
    from transformers import AutoModelForCausalLM
    wdtype, autocast, dropout = CASES[case]
    b, s, vocab = 2, 64, 512
    c = build_config(arch, vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, intermediate_size=384)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(c).to(wdtype)
    conf = {"per_device_batch_size": b, "seq_len": s, "model_dtype": str(wdtype).split(".")[-1],
            "precision": "bf16" if (autocast or wdtype == torch.bfloat16) else "fp32",
            # CPU dropout keeps its mask in the input dtype (fp32 after peft's cast); CUDA a bool
            "estimate": {"autocast": autocast, "dropout_mask_bytes": 4}}
    if dropout is not None:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                 target_modules="all-linear"))
        conf["lora"] = {"r": 8, "dropout": dropout, "target_modules": "all-linear"}
    model.train()
    got = saved_bytes(model, torch.randint(0, vocab, (b, s)), autocast)
    e = estimate_run(conf, c, 10, 1)
    # + the loss's saved fp32 log-probabilities; autocast's weight copies are their own term
    pred = e["breakdown"]["activations"] + e["breakdown"]["autocast_weight_cache"] + 4 * b * s * vocab
    assert pred == pytest.approx(got, rel=0.01), format_table(e)


def test_checkpointing_keeps_layer_inputs_only():
    c = build_config("qwen3-1.7b")
    base = {"per_device_batch_size": 2, "seq_len": 2048, "bf16": True}
    off = estimate_run(base, c, 100, 1)
    on = estimate_run({**base, "gradient_checkpointing": True}, c, 100, 1)
    per_layer = sum(off["activation_per_layer_per_token"].values()) * 4096
    saved = (off["breakdown"]["activations"] - on["breakdown"]["activations"])
    assert saved == pytest.approx(28 * per_layer - 28 * 2 * 2048 * 4096, rel=1e-6)
    assert on["breakdown"]["recomputed_layer"] == pytest.approx(per_layer, rel=1e-9)
    assert "layer_recompute" in on["phases"] and on["peak_phase"] == "loss_backward"


def test_zero_sharding_and_offload():
    c = build_config("qwen3-1.7b")
    base = {"per_device_batch_size": 1, "seq_len": 1024, "bf16": True}
    z2 = estimate_run({**base, "backend": "zero2"}, c, 100, 4)["breakdown"]
    z3 = estimate_run({**base, "backend": "zero3"}, c, 100, 4)["breakdown"]
    off = estimate_run({**base, "backend": "zero3_offload"}, c, 100, 4)
    P = 1_720_574_976
    assert z2["weights"] == 2 * P and z2["optimizer_states"] == 8 * P // 4 and z2["master_weights"] == P
    assert z2["gradients"] == 2 * P // 4
    assert z3["weights"] == 2 * P // 4
    assert off["breakdown"]["optimizer_states"] == 0 and off["breakdown"]["weights"] == 0
    assert off["host_memory_bytes"] >= 12 * P // 4
    assert off["peak_memory_bytes"] < estimate_run({**base, "backend": "zero3"}, c, 100, 4)["peak_memory_bytes"]


# ----------------------------------------------------------------------------- GPU measurements

# Peak GiB measured earlier on one H100: Qwen3 shapes, seq 2048, bf16, SDPA,
# HF Trainer or plain loop with bf16 weights, fused AdamW, random tokens.
GPU = [
    ("qwen3-0.6b", {"per_device_batch_size": 4}, 35.0),
    ("qwen3-0.6b", {"per_device_batch_size": 4, "use_liger_kernel": True}, 13.4),
    ("qwen3-1.7b", {"per_device_batch_size": 2, "gradient_checkpointing": True}, 17.1),
    ("qwen3-1.7b", {"per_device_batch_size": 2}, 28.7),
    ("qwen3-1.7b", {"per_device_batch_size": 4, "use_liger_kernel": True}, 25.8),
    ("qwen3-1.7b", {"per_device_batch_size": 2, "seq_len": 4096, "packing": True, "gradient_checkpointing": True,
                    "method": "lora", "lora": {"r": 64, "target_modules": "all-linear", "dropout": 0.05}}, 18.9),
    ("qwen3-1.7b", {"per_device_batch_size": 2, "seq_len": 4096, "packing": True,
                    "method": "lora", "lora": {"r": 64, "target_modules": "all-linear", "dropout": 0.05}}, 46.7),
]


# Measured with `scripts/estimate.py --measure 3` on one H100 (plain loop, fused AdamW).
FP32_AUTOCAST = {"precision": "bf16", "model_dtype": "float32"}
GPU += [
    ("qwen3-0.6b", {**FP32_AUTOCAST, "micro_batch_size": 2}, 23.60),
    ("qwen3-0.6b", {**FP32_AUTOCAST, "micro_batch_size": 2, "grad_accum": 2, "gradient_checkpointing": True}, 16.67),
    ("qwen3-0.6b", {"model_dtype": "bfloat16", "micro_batch_size": 2, "method": "lora",
                    "lora": {"r": 64, "dropout": 0.05}}, 17.51),
    ("medium", {**FP32_AUTOCAST, "micro_batch_size": 4, "grad_accum": 2}, 22.21),
    ("small", {**FP32_AUTOCAST, "micro_batch_size": 8, "seq_len": 1024, "attn_implementation": "eager"}, 7.05),
]


@pytest.mark.parametrize("preset,conf,measured", GPU)
def test_within_ten_percent_of_h100_measurements(preset, conf, measured):
    e = estimate_run({"seq_len": 2048, "bf16": True, **conf}, build_config(preset), 1000, 1)
    assert e["peak_memory_bytes"] / GiB == pytest.approx(measured, rel=0.10)


# Regional compile (runtime.compile_scope blocks), full training, seq 2048, fp32 weights + bf16
# autocast, fused AdamW, on one H200: the run records of reports/gpu_runs/h200_2026-12-01. The
# compiled-mode constants were fitted on these six, so they pin the fit; the H100 run of a
# whole-model compile (reports/gpu_performance_h100_2026-11-23.md, p17-compile-b4) is held out.
COMPILED = {**FP32_AUTOCAST, "torch_compile": True, "compile_scope": "blocks"}
GPU_COMPILED = [
    ("qwen3-0.6b", 4, 4, 27.19), ("qwen3-0.6b", 8, 2, 44.32), ("qwen3-0.6b", 16, 1, 76.36),
    ("qwen3-1.7b", 4, 4, 52.25), ("qwen3-1.7b", 8, 2, 75.58), ("qwen3-1.7b", 16, 1, 115.84),
]


@pytest.mark.parametrize("preset,micro,accum,measured", GPU_COMPILED)
def test_compiled_full_training_matches_h200_measurements(preset, micro, accum, measured):
    e = estimate_run({"seq_len": 2048, **COMPILED, "micro_batch_size": micro, "grad_accum": accum},
                     build_config(preset), 1000, 1)
    assert e["shape"]["kernels"] == "compiled"
    assert e["peak_memory_bytes"] / GiB == pytest.approx(measured, rel=0.01)


def test_compiled_mode_holds_out_a_whole_model_compile_and_leaves_lora_eager():
    c = build_config("qwen3-1.7b")
    whole = estimate_run({"seq_len": 2048, **COMPILED, "compile_scope": "model", "micro_batch_size": 4,
                          "grad_accum": 4}, c, 1000, 1)
    assert whole["peak_memory_bytes"] / GiB == pytest.approx(54.51, rel=0.10)  # measured on an H100
    long = estimate_run({"seq_len": 4096, **COMPILED, "micro_batch_size": 8}, c, 1000, 1)
    assert long["peak_memory_bytes"] / GiB == pytest.approx(115.84, rel=0.10)  # H200, p17-blocks-s4096-b8
    lora = {"seq_len": 4096, **COMPILED, "micro_batch_size": 2, "method": "lora",
            "lora": {"r": 64, "target_modules": "all-linear", "dropout": 0.05}}
    eager = {k: v for k, v in lora.items() if k != "torch_compile"}
    a, b = estimate_run(lora, c, 1000, 1), estimate_run(eager, c, 1000, 1)
    # not calibrated: the eager formula, which measured above the compiled run (41.41 GiB on the H200)
    assert a["peak_memory_bytes"] == b["peak_memory_bytes"] and a["peak_memory_bytes"] / GiB > 41.41
    assert any("not calibrated" in x for x in a["assumptions"])
    cuda = estimate_run({"seq_len": 2048, **COMPILED, "torch_compile": "cuda"}, c, 10, 1)
    assert cuda["shape"]["kernels"] == "compiled"


@pytest.mark.parametrize("checkpointing,measured", [(False, 96.6), (True, 36.0)])
def test_chunked_loss_at_seq_32768_matches_h200_measurements(checkpointing, measured):
    """reports/gpu_long32k.md (l17-s32k-chunk, -ckpt): one chunk's logits instead of all 32,768
    rows' (the formula without the chunk said 115.9 and 82.6 GiB); not fitted on these runs."""
    conf = {"seq_len": 32768, **COMPILED, "micro_batch_size": 1, "loss_chunk_tokens": 4096,
            "gradient_checkpointing": checkpointing}
    e = estimate_run(conf, build_config("qwen3-1.7b"), 1000, 1)
    assert e["peak_memory_bytes"] / GiB == pytest.approx(measured, rel=0.10)
    assert any("chunked loss" in a for a in e["assumptions"])
    # with more ranks the lab turns the chunked loss off (runtime.choose_loss_chunk): full logits again
    assert estimate_run(conf, build_config("qwen3-1.7b"), 1000, 2)["peak_memory_bytes"] > e["peak_memory_bytes"]


@pytest.mark.parametrize("seq,micro,measured", [(2048, 16, 95.7), (8192, 4, 95.1), (16384, 2, 95.1)])
def test_fp8_linears_match_h200_measurements(seq, micro, measured):
    """reports/gpu_fp8.md and gpu_round2.md (p17-fp8-tensorwise, p17-s8k-b4-fp8, p17-s16k-b2-fp8):
    float8 copies of the linears' inputs instead of bf16 ones; bf16 of the same shape measured 115.8."""
    conf = {"seq_len": seq, **COMPILED, "micro_batch_size": micro, "fp8": "tensorwise"}
    e = estimate_run(conf, build_config("qwen3-1.7b"), 1000, 1)
    assert e["peak_memory_bytes"] / GiB == pytest.approx(measured, rel=0.10)
    assert any("FP8 linears" in a for a in e["assumptions"])
    bf16 = estimate_run({k: v for k, v in conf.items() if k != "fp8"}, build_config("qwen3-1.7b"), 1000, 1)
    assert bf16["peak_memory_bytes"] / GiB == pytest.approx(115.8, rel=0.01)


def test_knobs_are_tunable():
    c = build_config("qwen3-0.6b")
    a = estimate_run({"per_device_batch_size": 4, "seq_len": 2048}, c, 10, 1)
    b = estimate_run({"per_device_batch_size": 4, "seq_len": 2048, "estimate": {"keep_logits_output": True}}, c, 10, 1)
    assert b["breakdown"]["logits"] - a["breakdown"]["logits"] == 2 * 4 * 2048 * 151936
    k = estimate_run({"per_device_batch_size": 4, "seq_len": 2048}, c, 10, 1, knobs=Knobs(activation_scale=0.5))
    assert k["breakdown"]["activations"] == pytest.approx(a["breakdown"]["activations"] / 2, abs=1)


@pytest.mark.slow
def test_script_prints_the_table(tmp_path):
    out = tmp_path / "e.json"
    p = subprocess.run([sys.executable, "scripts/estimate.py", "--model", "qwen3-1.7b", "--items", "2446",
                        "--world-size", "2", "--set", "per_device_batch_size=1", "--set", "grad_accum=8",
                        "--set", "epochs=3", "--set", "drop_last=true", "--set", "backend=zero2",
                        "--json", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    assert "steps: 456 (152 per epoch x 3 epochs" in p.stdout and "optimizer_states" in p.stdout
    p = subprocess.run([sys.executable, "scripts/estimate.py", "--model", "nope", "--items", "3"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "neither a preset" in p.stderr
