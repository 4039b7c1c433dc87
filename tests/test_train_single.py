"""Training on one process, as users launch it: the sanity track for CPT, pretraining from
scratch, LoRA and full SFT on packed data, the profile track, and config errors that stop a
run before any model loads."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from forgelab.runs import read_json
from helpers import metrics, runs_dir, tiny_sets, train_cli, train_inproc

pytestmark = pytest.mark.slow


def test_cpt_sanity_single_writes_record_metrics_checkpoint_and_loadable_final(tiny_model_dir, cpt_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    train_cli("single", *tiny_sets(tiny_model_dir, cpt_dir), "--set", "steps.max_steps=6",
              "--set", "steps.micro_batch_size=2", "--run-name", "t-cpt-sanity", launcher="scripts/train/sanity.sh")
    run = runs_dir() / "t-cpt-sanity"
    s = read_json(run / "train_summary.json")
    assert (s["outcome"], s["task"], s["track"], s["backend"], s["world_size"]) == \
        ("ok", "cpt", "sanity", "single", 1)
    assert s["steps"] == 6 and s["seq_len"] == 64 and s["global_batch"] == 4
    assert s["tokens"] == 6 * 4 * 64 and s["tokens_per_step"] == 256
    assert s["fingerprint"]["data_fingerprint"] == json.loads((cpt_dir / "meta.json").read_text())["data_fingerprint"]
    assert s["fingerprint"]["tokenizer_fingerprint"] == s["data"]["tokenizer_fingerprint"]
    m = s["model"]
    assert m["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert m["trainable_params"] == m["params"] and m["non_embedding_params"] < m["params"]
    assert s["precision"] == "fp32" and any("fp32" in n for n in s["notices"])
    assert s["peak_memory_bytes"] > 0 and "RSS" in s["peak_memory_measure"]
    assert s["tokens_per_s_steady"] > 0 and s["steady_steps"] == 4 and s["mfu_mean"] is None
    assert s["estimate"]["predicted"]["steps"] == 6 and s["estimate"]["measured"]["steps"] == 6
    assert s["resume"] is None and s["best_loss"] <= s["final_loss"] + 1e-9
    # checkpoints: every 2 steps, only the newest kept, each one complete
    assert [c["step"] for c in s["checkpoints"]] == [2, 4, 6]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6"]
    assert all(c["bytes"] > 0 and c["seconds"] >= 0 for c in s["checkpoints"])
    # one metrics line per optimizer step, with the documented fields
    lines = metrics(run)
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert [r["tokens"] for r in lines] == [256 * i for i in range(1, 7)]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "rss", "time", "step_time_s"):
        assert key in lines[0]
    # schedule: 1 warm-up step (the lr applied at step 1 is 0), then cosine from 1e-4 to 1e-5
    peak, floor, warm, total = 1e-4, 1e-5, 1, 6
    want = [peak * i / warm if i < warm else
            floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (i - warm) / (total - warm))) for i in range(total)]
    assert [r["lr"] for r in lines] == pytest.approx(want, rel=1e-6)
    # AdamW groups: 2 layers x 7 matmuls get decay; the tied embedding and the 5 norms do not
    groups = torch.load(run / "checkpoint-6" / "optimizer.pt", weights_only=True)["param_groups"]
    decay = [len(g["params"]) for g in groups if g["weight_decay"] == 0.1]
    assert decay == [14] and sum(len(g["params"]) for g in groups) == 14 + 1 + 5
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # the final model is a normal model directory for every later stage
    final = run / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and GenerationConfig.from_pretrained(final).eos_token_id == tok.eos_token_id
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight,
                           AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].mlp.up_proj.weight)
    # the same command again without overwrite is refused instead of mixing two runs
    r = train_cli("single", *tiny_sets(tiny_model_dir, cpt_dir), "--set", "checkpoint.overwrite=false",
                  "--run-name", "t-cpt-sanity", launcher="scripts/train/sanity.sh", check=False)
    assert r.returncode == 2 and "checkpoint.resume=auto" in r.stderr


def test_pretrain_from_scratch_of_a_preset_with_its_tokenizer(tiny_model_dir, cpt_dir):
    from transformers import AutoModelForCausalLM
    train_inproc("--config", "configs/train/pretrain.yaml", "--config", "configs/train/tracks/sanity.yaml",
              "--set", "model.preset=tiny", "--set", f"model.tokenizer={tiny_model_dir}",
              "--set", f"data.train={cpt_dir}", "--set", f"data.eval={cpt_dir}", "--set", "eval.every_steps=2",
              "--set", "eval.max_items=8", "--run-name", "t-pretrain")
    run = runs_dir() / "t-pretrain"
    ev = [json.loads(x) for x in (run / "eval_metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ev] == [2, 4] and all(e["eval_loss"] > 0 for e in ev)  # held-out loss
    s = read_json(run / "train_summary.json")
    assert s["task"] == "pretrain" and s["steps"] == 4 and "preset tiny" in s["model"]["source"]
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.vocab_size >= 49152 and model.config.num_hidden_layers == 2
    assert model.config.hidden_size == 128  # the preset's shape, not the tokenizer dir's model
    # it learned: step 1 (lr 0 in the warm-up) is the random init, uniform over the vocabulary;
    # after the 2 real updates the training loss is clearly lower (seen: 10.80 -> 10.62, 10.42),
    # and so is the loss on the same held-out items between steps 2 and 4 (seen: 10.54 -> 10.29).
    # With optim.lr=1e-12 neither drops (seen: train +0.01, held-out 0.00); at the init the
    # loss differs from batch to batch by ~0.02.
    losses = [r["loss"] for r in metrics(run)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(model.config.vocab_size), abs=0.1)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.15
    assert ev[-1]["eval_loss"] < ev[0]["eval_loss"] - 0.1
    assert s["final_loss"] == losses[-1]


def _separate_samples_loss(model_dir, ds, rows) -> float:
    """Token-mean cross-entropy over the label tokens of packed rows, each sample forwarded alone."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in rows:
            item = ds[i]
            cuts = (item["position_ids"] == 0).nonzero().flatten().tolist() + [len(item["input_ids"])]
            logits = torch.cat([model(input_ids=item["input_ids"][a:b][None]).logits[0]
                                for a, b in zip(cuts, cuts[1:])])
            labels = item["labels"][1:]
            total += float(F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum"))
            n += int((labels != -100).sum())
    return total / n


def test_sft_lora_on_packed_rows_counts_real_tokens_and_saves_the_adapter(tiny_model_dir, sft_dir):
    from forgelab.data.sft_store import SFTDataset
    ds = SFTDataset(sft_dir)
    # 4 rows, 2 per micro-batch x 2 accumulation: each step sees every row once
    train_cli("single", "--task", "sft_lora", *tiny_sets(tiny_model_dir, sft_dir, **{"data.max_train_items": 4,
                                                                              "steps.micro_batch_size": 2,
                                                                              "steps.grad_accum": 2}),
              "--set", "lora.r=4", "--set", "lora.alpha=8", "--run-name", "t-sft-lora",
              launcher="scripts/train/sanity.sh")
    run = runs_dir() / "t-sft-lora"
    s = read_json(run / "train_summary.json")
    real = sum(ds.row_length(i) for i in range(4))
    assert [r["step_tokens"] for r in metrics(run)] == [real] * 4
    assert s["tokens"] == 4 * real and s["sft_mode"] == "lora"
    # LoRA starts as the identity, so step 1's loss is the base model's over the 4 rows; packed
    # samples must not see each other: it equals the loss of each sample run on its own
    assert metrics(run)[0]["loss"] == pytest.approx(_separate_samples_loss(tiny_model_dir, ds, range(4)), rel=1e-5)
    assert 0 < s["model"]["lora_params"] == s["model"]["trainable_params"] < s["model"]["params"] / 10
    assert s["flops_formula"].startswith("lora") and s["attention_span"] < 256 / 2  # within-sample span
    final = run / "final"
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file() and not (final / "model.safetensors").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)


def test_sft_full_on_packed_rows(tiny_model_dir, sft_dir):
    train_inproc("--config", "configs/train/sft_full.yaml", "--config", "configs/train/tracks/sanity.yaml",
                 *tiny_sets(tiny_model_dir, sft_dir), "--set", "steps.micro_batch_size=1", "--run-name", "t-sft-full")
    s = read_json(runs_dir() / "t-sft-full" / "train_summary.json")
    assert s["sft_mode"] == "full" and s["model"]["trainable_params"] == s["model"]["params"]
    assert s["steps"] == 4 and (runs_dir() / "t-sft-full" / "final" / "model.safetensors").is_file()
    assert s["tokens"] < s["steps"] * s["tokens_per_step_capacity"]  # padding is not counted


def test_profile_track_single(tiny_model_dir, cpt_dir):
    train_cli("single", *tiny_sets(tiny_model_dir, cpt_dir), "--set", "steps.micro_batch_size=2",
              "--run-name", "t-prof", launcher="scripts/train/profile.sh")
    run = runs_dir() / "t-prof"
    p = read_json(run / "profile_summary.json")
    s = read_json(run / "train_summary.json")
    assert p["flops_per_step"] == pytest.approx(s["flops_per_token"] * 256)
    assert p["flops_per_step_profiler_per_rank"] > 0
    ts = p["time_split_ms"]
    assert ts["steps_measured"] == 4 and all(ts[k] > 0 for k in ("forward", "backward", "optimizer", "data"))
    assert p["comms"] == [] and p["trace_files"] == ["profile/trace_rank0.json"]
    trace = json.loads((run / "profile" / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forgelab.forward", "forgelab.forward_backward"} <= names


def test_config_errors_stop_before_any_model_loads(tiny_model_dir, cpt_dir, tmp_path):
    t0 = time.time()
    r = train_cli("--config", "configs/train/cpt.yaml", "--set", "optim.lrr=1", check=False)
    assert r.returncode == 2 and "unknown key 'optim.lrr'" in r.stderr and "did you mean 'optim.lr'" in r.stderr
    r = train_cli("--config", "configs/train/cpt.yaml", "--set", "steps.stop_after_steps=40", check=False)
    assert r.returncode == 2 and "stop_after_steps" in r.stderr
    r = train_cli("single", "--task", "pretrain", "--set", "model.tokenizer=null", check=False,
                  launcher="scripts/train/sanity.sh")
    assert r.returncode == 2 and "model.tokenizer" in r.stderr
    # data tokenized with another tokenizer: refused (names both fingerprints), before loading
    other = tmp_path / "other-tok"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special")):
            (other / f.name).write_bytes(f.read_bytes())
    (other / "chat_template.jinja").write_text("{{ messages }}")
    r = train_cli("--config", "configs/train/cpt.yaml", *tiny_sets(tiny_model_dir, cpt_dir),
                  "--set", f"model.tokenizer={other}", "--run-name", "t-mismatch", check=False)
    assert r.returncode == 2 and "tokenized with tokenizer" in r.stderr and "allow_tokenizer_mismatch" in r.stderr
    assert "Loading weights" not in r.stderr and not (runs_dir() / "t-mismatch").exists()
    r = train_cli("--config", "configs/train/sft_lora.yaml", *tiny_sets(tiny_model_dir, cpt_dir), check=False)
    assert r.returncode == 2 and "holds CPT data but task sft needs SFT data" in r.stderr
    r = train_cli("zero2", *tiny_sets(tiny_model_dir, cpt_dir), "--set", "dist.deepspeed=configs/ds/nope.json",
                  check=False, launcher="scripts/train/sanity.sh")
    assert r.returncode == 2 and "nope.json" in r.stderr
    assert time.time() - t0 < 120  # six refusals, no training
