"""QLoRA (lora.quantize_base: nf4) is a CUDA feature: on CPU it is refused before any training
with a message that says what to set, and a merge of a QLoRA adapter refuses to fold it into the
unquantized base silently (the GPU batch runs the real thing: scripts/gpu/)."""
from __future__ import annotations

import json

from helpers import tiny_sets, train_cli

from forgelab.train.merge import trained_on_nf4


def test_qlora_is_refused_on_cpu(tiny_model_dir, sft_dir):
    r = train_cli("single", "--task", "sft_lora", "--run-name", "qlora-cpu", *tiny_sets(tiny_model_dir, sft_dir),
                  "--set", "lora.quantize_base=nf4", "--set", "steps.max_steps=2", check=False,
                  launcher="scripts/train/sanity.sh")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "nf4 (QLoRA) needs a CUDA GPU" in r.stderr and "lora.quantize_base: none" in r.stderr


def test_qlora_on_a_full_weight_task_is_refused(tiny_model_dir, sft_dir):
    r = train_cli("single", "--task", "sft_full", "--run-name", "qlora-full", *tiny_sets(tiny_model_dir, sft_dir),
                  "--set", "lora.quantize_base=nf4", "--set", "steps.max_steps=2", check=False,
                  launcher="scripts/train/sanity.sh")
    assert r.returncode == 2 and "trains every weight" in r.stderr, r.stderr[-2000:]


def test_merge_knows_a_qlora_adapter_from_its_run_config(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps({"lora": {"quantize_base": "nf4"}}))
    assert trained_on_nf4(run / "final")
    (run / "config.yaml").write_text(json.dumps({"lora": {"quantize_base": "none"}}))
    assert not trained_on_nf4(run / "final")
    assert trained_on_nf4(run / "final", "nf4") and not trained_on_nf4(tmp_path, "auto")
