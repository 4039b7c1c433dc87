"""The memory estimate of the alignment methods: the frozen reference copy of full-weight DPO (none
under LoRA; partitioned under ZeRO-3), preference pairs training two sequences per item, KTO's
no-grad passes, GRPO's generation KV cache by its formula, and a tiny full-weight DPO run on CPU
recording the reference term in train_summary.json."""
from __future__ import annotations

import dataclasses

import json

import pytest

from forgelab import config as cfg
from forgelab.estimate.estimator import estimate_run, format_table
from forgelab.estimate.shape import TrainShape
from forgelab.model.presets import build_config
from forgelab.runs import PROJECT_ROOT, read_json
from forgelab.train.config import TrainConfig

QWEN = build_config("qwen3-0.6b")
P = 596_049_920  # Qwen3-0.6B shape, tied embeddings


def _shape(task: str, *sets: str, precision: str = "bf16", seq_len: int = 512) -> TrainShape:
    """The shape a run of configs/train/<task>.yaml resolves, its method's estimator terms included."""
    conf = cfg.load(TrainConfig, [PROJECT_ROOT / "configs/train" / f"{task}.yaml"], ["model.path=m", *sets])
    shape, _ = TrainShape.from_train_config(conf, precision=precision, seq_len=seq_len, kernels="eager",
                                            trainable=conf.method.estimate_terms(conf))
    return shape


def _est(shape: TrainShape, world: int = 1) -> dict:
    return estimate_run(shape, QWEN, 1000, world)


MB = ("steps.micro_batch_size=4", "steps.grad_accum=1")


def test_full_dpo_reference_adds_exactly_the_weight_bytes_and_lora_dpo_none():
    full, sft = _shape("dpo_full", *MB), _shape("sft_full", *MB)
    assert full.reference_model and full.sequences_per_item == 2 and full.nograd_sequences_per_item == 2
    e = _est(full)
    b = e["breakdown"]
    assert e["params"]["total"] == P
    assert b["reference_weights"] == b["weights"] == 4 * P  # fp32 weights + autocast: the reference is fp32 too
    # the same run without its reference copy: every phase lower by exactly those bytes
    no_ref = _est(TrainShape(**{**full.__dict__, "reference_model": False}))
    assert {k: v - no_ref["phases"][k] for k, v in e["phases"].items()} == {k: 4 * P for k in e["phases"]}
    assert "reference_weights" not in _est(sft)["breakdown"]  # cpt/sft breakdowns as before

    lora = _shape("dpo", *MB)
    assert not lora.reference_model and lora.lora and lora.nograd_sequences_per_item == 2
    el = _est(lora)
    assert el["breakdown"]["reference_weights"] == 0
    lora_sft = TrainShape(**{**lora.__dict__, "sequences_per_item": 1, "nograd_sequences_per_item": 0})
    assert el["breakdown"]["weights"] == _est(lora_sft)["breakdown"]["weights"]
    assert el["breakdown"]["nograd_forward"] > 0  # the adapters-off reference forward is still run
    # precomputed reference log-probs: no copy, no reference forward
    pre = _shape("dpo_full", *MB, "align.precompute_ref_log_probs=true")
    assert not pre.reference_model and pre.nograd_sequences_per_item == 0
    # orpo / simpo: pairs, no reference
    for task in ("orpo_full", "simpo_full"):
        s = _shape(task, *MB)
        assert (s.sequences_per_item, s.reference_model, s.nograd_sequences_per_item) == (2, False, 0)


def test_reference_is_partitioned_under_zero3():
    ds = {"zero_optimization": {"stage": 3}}
    full = _shape("dpo_full", *MB)
    z3 = TrainShape(**{**full.__dict__, "backend": "zero3", "zero_stage": 3, "ds": ds})
    b = _est(z3, world=4)["breakdown"]
    assert b["reference_weights"] == b["weights"] == 2 * P // 4  # DeepSpeed casts both to bf16
    z2 = TrainShape(**{**full.__dict__, "backend": "zero2", "zero_stage": 2, "ds": {"zero_optimization": {"stage": 2}}})
    assert _est(z2, world=4)["breakdown"]["reference_weights"] == 2 * P  # TRL runs the reference at stage 0


def test_pairs_double_the_activation_term_relative_to_sft():
    dpo, sft = _est(_shape("dpo_full", *MB)), _est(_shape("sft_full", *MB))
    a, s = dpo["breakdown"], sft["breakdown"]
    assert dpo["tokens_per_micro_batch"] == 2 * sft["tokens_per_micro_batch"] == 2 * 4 * 512
    # every token-proportional term doubles; the rotary cos/sin (fp32, one per position) is shared
    assert a["activations"] - 2 * s["activations"] == pytest.approx(-2 * 4 * QWEN.head_dim * 512, abs=2)
    assert a["activations"] == pytest.approx(2 * s["activations"], rel=1e-4)
    # TRL's fused LM head computes DPO's log-probs in tiles: no logits tensor; without it they double
    assert a["logits"] < s["logits"] / 10
    unfused = dataclasses.replace(_shape("dpo_full", *MB), fused_lm_head=False)
    assert _est(unfused)["breakdown"]["logits"] == 2 * s["logits"]
    # the reference forward: one layer's working set of the 2B rows, while the policy's are held
    assert 0 < a["nograd_forward"] < a["activations"] / QWEN.num_hidden_layers * 1.5
    # the reference forward runs while the policy's activations are held (with the fused head, that is the peak)
    assert dpo["phases"]["nograd_forward"] > a["activations"] + a["nograd_forward"]

    kto = _shape("kto_full", *MB)
    assert (kto.sequences_per_item, kto.nograd_sequences_per_item, kto.reference_model) == (1, 1, True)
    k = _est(kto)["breakdown"]
    assert k["activations"] == s["activations"] and k["nograd_forward"] * 2 == pytest.approx(a["nograd_forward"], abs=2)
    assert _shape("kto", *MB).nograd_sequences_per_item == 1  # the KL pass runs under LoRA too


@pytest.mark.parametrize("precision,kv_bytes", [("bf16", 4), ("fp32", 4)])
def test_grpo_kv_cache_matches_the_formula(precision, kv_bytes):
    shape = _shape("grpo_full", "steps.micro_batch_size=4", "steps.grad_accum=2", "align.max_completion_length=32",
                   "align.num_generations=4", precision=precision, seq_len=512)
    assert not shape.reference_model  # beta 0: no reference
    assert shape.generation == {"batch": 8, "num_generations": 4, "completion_len": 32, "engine": "transformers"}
    e = _est(shape)
    b = e["breakdown"]
    layers, kv_heads, head_dim = 28, 8, 128
    G, T = 4 * 2, 512 + 32  # completions per device x (prompt + completion)
    assert b["generation_kv_cache"] == 2 * layers * kv_heads * head_dim * G * T * kv_bytes
    assert e["tokens_per_micro_batch"] == 4 * T  # the trained rows are prompt + answer
    static = b["weights"] + b["master_weights"] + b["optimizer_states"] + b["workspace"] + b["reference_weights"]
    assert e["phases"]["generation"] == pytest.approx(
        static + b["autocast_weight_cache"] + max(b["generation_kv_cache"], b["generation_prefill"])
        + b["generation_logits"], abs=8)
    assert e["peak_memory_bytes"] == max(e["phases"].values())
    assert "generation_kv_cache" in format_table(e)
    # bf16 weights: a bf16 cache
    half = _est(TrainShape(**{**shape.__dict__, "params_in_half": True}))
    if precision == "bf16":
        assert half["breakdown"]["generation_kv_cache"] == b["generation_kv_cache"] // 2
    # a KL term brings the reference copy
    ref = _shape("grpo_full", "steps.micro_batch_size=4", "steps.grad_accum=2", "align.beta=0.04")
    assert ref.reference_model and _est(ref)["breakdown"]["reference_weights"] == 4 * P


def test_record_round_trip_keeps_the_alignment_fields():
    e = _est(_shape("grpo_full", "steps.micro_batch_size=4", "steps.grad_accum=2", "align.beta=0.04"))
    again = estimate_run(TrainShape.from_record(json.loads(json.dumps(e["shape"]))), QWEN, 1000, 1)
    assert again["breakdown"] == e["breakdown"]


def test_tiny_full_dpo_run_records_the_reference_term(tiny_model_dir, tmp_path):
    from helpers import runs_dir, tiny_sets, train_inproc
    say = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "chosen": say(f"{2 * i}"),
             "rejected": say(f"{2 * i + 1}")} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = "t-est-dpo-full"
    train_inproc("--config", "configs/train/dpo_full.yaml", *tiny_sets(tiny_model_dir, data),
                 "--set", "steps.max_steps=1", "--set", "steps.micro_batch_size=2", "--set", "steps.grad_accum=1",
                 "--set", "optim.warmup_steps=0", "--set", "checkpoint.save_final=false",
                 "--set", "align.max_length=64", "--run-name", name)
    s = read_json(runs_dir() / name / "train_summary.json")
    pred = s["estimate"]["predicted"]
    assert pred is not None, s["estimate"]
    b = pred["breakdown"]
    assert b["reference_weights"] == b["weights"] > 0  # fp32 on CPU, like the policy
    assert b["nograd_forward"] > 0 and pred["shape"]["sequences_per_item"] == 2
    assert pred["shape"]["reference_model"] is True
