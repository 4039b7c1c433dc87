"""The alignment methods (dpo, orpo, simpo, kto, grpo; TRL trainers under the lab's session) on
the tiny model with real ASDiv problems: each trains through the launchers and records its
method metrics; bad data fails before any model loads, naming file:line; a DPO and a GRPO run
killed with SIGKILL (mid-run, and during a checkpoint save) resume to the uninterrupted curve
bit for bit on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgelab import config as cfg
from forgelab.runs import read_json
from forgelab.train.config import TrainConfig
from forgelab.train.entry import preflight
from helpers import metrics, runs_dir, tiny_sets, train_cli, train_inproc
from test_train_resume import _kill_when, _last_step, _start

pytestmark = pytest.mark.slow


def _sanity(task: str, model: Path, data: Path, name: str, *sets: str):
    return train_cli("single", "--task", task, *tiny_sets(model, data), *sets, "--run-name", name,
                     launcher="scripts/train/sanity.sh")


@pytest.mark.parametrize("task,kind,sets,keys", [
    ("dpo", "pref", (), ("rewards/margins", "rewards/accuracies", "rewards/chosen", "logps/rejected")),
    ("dpo_full", "pref", ("--set", "align.loss_type=[ipo]"), ("rewards/margins", "rewards/accuracies")),
    ("orpo", "pref", (), ("rewards/margins", "log_odds_ratio", "nll_loss")),
    ("simpo", "pref", (), ("rewards/margins", "rewards/accuracies")),
    ("kto", "kto", (), ("kl",)),
    ("grpo", "prompts", ("--set", "align.max_completion_length=8", "--set", "align.beta=0.04"),
     ("reward", "reward_std", "kl", "completions/mean_length", "rewards/math_exact_match/mean")),
])
def test_each_method_trains_through_the_launcher_and_records_its_metrics(tiny_model_dir, align_data, task, kind,
                                                                         sets, keys):
    name = f"t-align-{task}"
    _sanity(task, tiny_model_dir, align_data[kind], name, *sets)
    run = runs_dir() / name
    recs = metrics(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for k in keys:  # what TRL logged, in the lab's per-step record
        assert all(isinstance(r.get(k), (int, float)) for r in recs), (k, recs[-1])
    assert all(r["step_tokens"] > 0 for r in recs) and recs[-1]["tokens"] == sum(r["step_tokens"] for r in recs)
    s = read_json(run / "train_summary.json")
    method, mode = task.split("_")[0], "full" if task.endswith("_full") else "lora"
    assert s["task"] == method and s["align"]["method"] == method and s["align"]["mode"] == mode
    assert s["align"]["reference"] is (method in ("dpo", "kto") or task == "grpo")
    assert set(keys) <= set(s["method_metrics"]) and s["data"]["kind"] == kind
    assert s["tokens"] == recs[-1]["tokens"] and s["sequence_tokens_mean"] > 10
    assert ("reference forward" in s["flops_formula"]) is (method in ("dpo", "kto"))
    final = Path(s["final_model"])
    assert (final / ("adapter_config.json" if mode == "lora" else "config.json")).is_file()
    assert not (final / "ref").exists()  # TRL's copy of the initial adapters is not part of the result
    assert (run / "checkpoint-4" / "forgelab_manifest.json").is_file()


def test_bad_preference_data_fails_before_any_model_loads_naming_the_line(tiny_model_dir, align_data, tmp_path):
    good = align_data["pref"].read_text().splitlines()
    rec = json.loads(good[2])
    del rec["rejected"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(good[:2] + [json.dumps(rec)] + good[3:]) + "\n")

    def conf(task, data):
        return cfg.load(TrainConfig, [Path("configs/train") / f"{task}.yaml"],
                        [f"model.path={tiny_model_dir}", f"data.train={data}"])

    with pytest.raises(cfg.ConfigError, match=rf"{bad}:3: missing field 'rejected'"):
        preflight(conf("dpo", bad))
    bad.write_text(good[0] + "\n{not json\n")
    with pytest.raises(cfg.ConfigError, match=rf"{bad}:2: invalid JSON"):
        preflight(conf("dpo", bad))
    one_label = tmp_path / "kto.jsonl"
    one_label.write_text("".join(x + "\n" for x in align_data["kto"].read_text().splitlines()[::2]))
    with pytest.raises(cfg.ConfigError, match="KTO needs both labels"):
        preflight(conf("kto", one_label))
    with pytest.raises(cfg.ConfigError, match="is a directory"):
        preflight(conf("dpo", tmp_path))
    with pytest.raises(cfg.ConfigError, match="multiple of align.num_generations"):
        cfg.load(TrainConfig, [Path("configs/train/grpo.yaml")],
                 [f"model.path={tiny_model_dir}", f"data.train={align_data['prompts']}", "steps.micro_batch_size=3",
                  "steps.grad_accum=1"])
    with pytest.raises(cfg.ConfigError, match="align.rewards\\[0\\]"):
        cfg.load(TrainConfig, [Path("configs/train/grpo.yaml")],
                 [f"model.path={tiny_model_dir}", "align.rewards=[no_such_module:f]", "align.reward_weights=null"])


# ----------------------------------------------------------------------------- kill and resume

N, EVERY = 12, 4


def _resume_args(task, model, data, name, *extra):
    return ["--config", f"configs/train/{task}.yaml", *tiny_sets(model, data), "--set", f"steps.max_steps={N}",
            "--set", "optim.warmup_steps=2", "--set", f"checkpoint.every_steps={EVERY}", "--set",
            "checkpoint.keep_last=2", "--set", "checkpoint.save_final=false", "--set", "steps.micro_batch_size=2",
            "--set", "steps.grad_accum=2", *extra, "--run-name", name]


CURVE_KEYS = {"dpo": ("loss", "lr", "grad_norm", "tokens", "rewards/margins", "logps/chosen"),
              "grpo": ("loss", "lr", "grad_norm", "tokens", "reward", "completions/mean_length", "kl")}
EXTRA = {"dpo": (), "grpo": ("--set", "align.max_completion_length=8", "--set", "align.beta=0.04",
                             "--set", "align.num_generations=2")}


def _curve(run: Path, task: str) -> list[tuple]:
    return [(r["step"], *(r[k] for k in CURVE_KEYS[task])) for r in metrics(run)]


@pytest.mark.parametrize("task,kind", [("dpo", "pref"), ("grpo", "prompts")])
def test_sigkill_mid_run_and_mid_save_resume_to_the_exact_curve(tiny_model_dir, align_data, task, kind):
    data = align_data[kind]
    train_inproc(*_resume_args(task, tiny_model_dir, data, f"t-{task}-ref", *EXTRA[task]))
    ref = _curve(runs_dir() / f"t-{task}-ref", task)
    assert [c[0] for c in ref] == list(range(1, N + 1))
    resume = ("--set", "checkpoint.resume=auto", "--set", "checkpoint.overwrite=false")

    # mid-run: killed after step 6 (checkpoint-4 complete), resumed from 4
    run = runs_dir() / f"t-{task}-kill"
    args = _resume_args(task, tiny_model_dir, data, run.name, *EXTRA[task])
    _kill_when(_start(args), lambda: _last_step(run) >= 6)
    done = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    train_inproc(*args, *resume)
    s = read_json(run / "train_summary.json")
    assert s["resume"]["step"] == done and s["steps"] == N
    assert _curve(run, task) == ref  # every logged value, bit for bit; GRPO's samples included

    # mid-save: killed while checkpoint-8 is being written; resumed from checkpoint-4
    run = runs_dir() / f"t-{task}-killsave"
    args = _resume_args(task, tiny_model_dir, data, run.name, *EXTRA[task])
    staged = run / ".staging-checkpoint-8" / "checkpoint-8" / "trainer_state.json"
    _kill_when(_start(args, {"FORGELAB_SAVE_DELAY_S": "300", "FORGELAB_SAVE_DELAY_STEP": "8"}), staged.is_file)
    assert not (run / "checkpoint-8").exists()
    train_inproc(*args, *resume)
    assert read_json(run / "train_summary.json")["resume"]["step"] == 4
    assert not list(run.glob(".staging-*"))
    assert _curve(run, task) == ref
