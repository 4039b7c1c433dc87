"""The reference check of the MMLU task: the same model and the same questions through
lm-evaluation-harness (in its own venv, fed the local data as custom tasks) and through
forgelab.eval.mmlu, then accuracies, per-question predictions, log-likelihoods and the exact
prompt strings compared.

Alignment: our prompt is already lm-eval's default MMLU layout (description line, exemplars
joined by blank lines, "question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", targets " A".." D",
no BOS token, no chat template). lm-eval gets the very questions we score as its test split and
our few-shot exemplars as its dev split, taken in order (sampler first_n), so both sides see
the same prompts; the check verifies that string by string.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..jsonl import iter_jsonl
from ..report.render import Report
from ..runs import PROJECT_ROOT, atomic_write_text
from .data import LETTERS
from .mmlu import build_prompt

TASK_PREFIX = "forgelab_mmlu_"
# lm-eval's own MMLU layout, as a Jinja template over its {question, choices, answer} rows
DOC_TO_TEXT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
               "D. {{choices[3]}}\nAnswer:")


def _rows(qs: list[dict]) -> str:
    return "".join(json.dumps({"question": q["question"], "choices": q["choices"], "answer": q["answer"],
                               "subject": q["subject"], "row": q["row"]}, ensure_ascii=False) + "\n" for q in qs)


def write_tasks(selection: dict, shots: int, task_dir: Path) -> list[str]:
    """One lm-eval task per subject over local jsonl files: test = our scored questions (in our
    order), dev = our exemplars (in our order)."""
    names = []
    for s, qs in selection["scored"].items():
        test, dev = task_dir / f"{s}.test.jsonl", task_dir / f"{s}.dev.jsonl"
        atomic_write_text(test, _rows(qs))
        atomic_write_text(dev, _rows(selection["pools"][s][:max(shots, 1)]))
        task = {
            "task": TASK_PREFIX + s,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(test.resolve()), "dev": str(dev.resolve())}},
            "test_split": "test",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
            "doc_to_text": DOC_TO_TEXT,
            "doc_to_choice": list(LETTERS),
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        atomic_write_text(task_dir / f"{TASK_PREFIX}{s}.yaml", yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
        names.append(TASK_PREFIX + s)
    return names


def lm_eval_command(venv: Path, model_path: Path, tasks: list[str], task_dir: Path, shots: int,
                    batch_size: int, out_dir: Path) -> list[str]:
    """The lm-eval command line, paths relative to the project root (where it runs)."""
    venv, model_path, task_dir, out_dir = (_rel(p) for p in (venv, model_path, task_dir, out_dir))
    return [str(Path(venv) / "bin" / "lm-eval"), "run", "--model", "hf",
            "--model_args", f"pretrained={model_path},dtype=float32",
            "--tasks", ",".join(tasks), "--include_path", str(task_dir),
            "--num_fewshot", str(shots), "--batch_size", str(batch_size), "--device", "cpu",
            "--output_path", str(out_dir), "--log_samples"]


def _rel(p: Path | str) -> str:
    try:
        return str(Path(p).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def run_lm_eval(cmd: list[str], log_path: Path, threads: int) -> float:
    """Run lm-eval offline (no hub) from the project root, output to log_path; returns the wall seconds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(log_path.parent / "hf_datasets_cache"))
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    if proc.returncode:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"lm-eval failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return time.time() - t0


def read_lm_eval(out_dir: Path, tasks: list[str]) -> dict:
    """task -> {acc, n, samples: doc_id -> {prompt, logliks}} from lm-eval's output folder."""
    results_files = sorted(out_dir.rglob("results_*.json"))
    if not results_files:
        raise FileNotFoundError(f"no lm-eval results_*.json under {out_dir}")
    res = json.loads(results_files[-1].read_text(encoding="utf-8"))
    out = {}
    for t in tasks:
        acc = res["results"][t]["acc,none"]
        sample_files = sorted(out_dir.rglob(f"samples_{t}_*.jsonl"))
        if not sample_files:
            raise FileNotFoundError(f"no lm-eval samples for {t} under {out_dir}")
        samples = {}
        for _, s in iter_jsonl(sample_files[-1]):
            args = s["arguments"]
            pairs = [tuple(a.values()) if isinstance(a, dict) else tuple(a)
                     for a in (args.values() if isinstance(args, dict) else args)]
            samples[int(s["doc_id"])] = {"prompt": pairs[0][0], "continuations": [p[1] for p in pairs],
                                         "logliks": [float(r[0]) for r in s["filtered_resps"]],
                                         "acc": float(s["acc"])}
        out[t] = {"acc": float(acc), "n": len(samples), "samples": samples}
    return {"tasks": out, "versions": res.get("versions", {}), "config": res.get("config", {}),
            "lm_eval_version": res.get("lm_eval_version") or res.get("config", {}).get("lm_eval_version"),
            "results_file": str(results_files[-1])}


def compare(selection: dict, shots: int, ours: dict, theirs: dict) -> dict:
    """Per-subject and overall accuracies of both sides, and where they differ."""
    by_subject: dict = {}
    prompt_mismatch, pred_mismatch, max_dll, n_all = 0, 0, 0.0, 0
    recs = {(r["subject"], r["row"]): r for r in ours["records"]}
    for s, qs in selection["scored"].items():
        t = theirs["tasks"][TASK_PREFIX + s]
        ex = selection["pools"][s][:shots]
        ours_correct = theirs_correct = 0
        for i, q in enumerate(qs):
            mine = recs[(s, q["row"])]
            ref = t["samples"][i]
            if ref["continuations"] != [f" {L}" for L in LETTERS]:
                raise ValueError(f"lm-eval continuations {ref['continuations']} are not ' A'..' D'")
            prompt_mismatch += ref["prompt"] != build_prompt(q, ex)
            ref_pred = max(range(4), key=lambda k: ref["logliks"][k])
            pred_mismatch += ref_pred != mine["pred"]
            max_dll = max(max_dll, max(abs(a - b) for a, b in zip(ref["logliks"], mine["logprobs"])))
            ours_correct += mine["correct"]
            theirs_correct += ref["acc"] == 1.0
        n_all += len(qs)
        by_subject[s] = {"n": len(qs), "ours": ours_correct / len(qs), "lm_eval": t["acc"],
                         "lm_eval_from_samples": theirs_correct / len(qs)}
    macro = lambda k: sum(v[k] for v in by_subject.values()) / len(by_subject)  # noqa: E731
    micro = lambda k: sum(v[k] * v["n"] for v in by_subject.values()) / n_all  # noqa: E731
    return {"shots": shots, "questions": n_all, "subjects": by_subject,
            "ours_macro": macro("ours"), "lm_eval_macro": macro("lm_eval"),
            "ours_micro": micro("ours"), "lm_eval_micro": micro("lm_eval"),
            "diff_macro_points": 100 * (macro("ours") - macro("lm_eval")),
            "diff_micro_points": 100 * (micro("ours") - micro("lm_eval")),
            "prompt_mismatches": prompt_mismatch, "prediction_mismatches": pred_mismatch,
            "max_abs_loglik_diff": max_dll}


def venv_versions(python: Path) -> dict:
    code = ("import json, importlib.metadata as m\n"
            "out = {}\n"
            "for n in ('lm_eval', 'torch', 'transformers', 'datasets'):\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def markdown(report: dict) -> str:
    L = ["# MMLU reference check: forgelab vs lm-evaluation-harness", "",
         f"Date: {report['date']}. Model: `{report['model']}`. Data: `{report['data']}`.", "",
         "Produced by:", "", f"    {report['command']}", "",
         "which ran, for the reference side:", "", f"    {report['lm_eval_commands'][0]}"]
    for c in report["lm_eval_commands"][1:]:
        L += [f"    {c}"]
    L += ["", "| setting | questions | forgelab | lm-eval | difference (points) | within 1 point | "
          "different predictions | max abs log-lik difference | prompts not identical |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in report["checks"]:
        for kind in ("macro", "micro"):
            L.append(f"| {c['shots']}-shot, {kind} | {c['questions']} | {100 * c['ours_' + kind]:.2f}% | "
                     f"{100 * c['lm_eval_' + kind]:.2f}% | {c['diff_' + kind + '_points']:+.2f} | "
                     f"{'yes' if abs(c['diff_' + kind + '_points']) <= 1 else 'NO'} | "
                     f"{c['prediction_mismatches']} | {c['max_abs_loglik_diff']:.2e} | {c['prompt_mismatches']} |")
    L += ["", "Macro = mean of per-subject accuracies (what reports/eval.md shows); micro = over all "
          "questions (lm-eval's group aggregate).", "", "## Per subject", "",
          "| setting | subject | n | forgelab | lm-eval |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        for s, v in c["subjects"].items():
            L.append(f"| {c['shots']}-shot | {s.replace('_', ' ')} | {v['n']} | {100 * v['ours']:.1f}% | "
                     f"{100 * v['lm_eval']:.1f}% |")
    L += ["", "## What was aligned", ""] + [f"- {a}" for a in report["aligned"]]
    L += ["", "## Versions and time", "",
          f"- forgelab side (`.venv`): {json.dumps(report['versions']['forgelab'])}",
          f"- lm-eval side (`{report['lm_eval_venv']}`): {json.dumps(report['versions']['lm_eval'])}",
          f"- machine: {report['hardware']['cpu_count']} CPU cores, {report['hardware'].get('ram_gib')} GiB RAM, "
          f"GPUs: {report['hardware'].get('gpus') or 'none'}; OMP_NUM_THREADS={report['threads']} for both sides; "
          f"1-minute load average {report['load_average_1min'][0]} at the start, {report['load_average_1min'][1]} "
          f"at the end (other work shared the machine: times are upper bounds)"]
    for c in report["checks"]:
        L.append(f"- {c['shots']}-shot: forgelab {c['ours_seconds']:.0f} s, lm-eval {c['lm_eval_seconds']:.0f} s "
                 f"(batch size {report['lm_eval_batch_size']}; includes model load)")
    L.append("")
    return "\n".join(L)


def write_report(report: dict, md_path: Path) -> None:
    """md_path and its JSON twin (the report dict itself)."""
    rep = Report.at(md_path, data=report)  # markdown() writes its own heading
    rep.add(markdown(report))
    rep.write()


ALIGNED = [
    "prompt: lm-eval's default MMLU layout, the one forgelab uses everywhere: description line "
    "'The following are multiple choice questions (with answers) about <subject>.' + blank line, "
    "exemplars 'question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X' joined by blank lines, then "
    "the question ending in 'Answer:'; question text stripped, choices as given",
    "targets ' A', ' B', ' C', ' D' (one token each); lm-eval's acc = argmax of their "
    "log-likelihoods, forgelab's = argmax of their next-token log-probabilities",
    "questions: lm-eval's test split is exactly forgelab's scored subset (local jsonl via "
    "dataset_path: json), in the same order",
    "exemplars: lm-eval's dev split is forgelab's exemplar pool (each subject's first questions "
    "of the test-only file, not scored), sampler first_n, so both use the same ones in the same order",
    "model: the same directory, float32, CPU, no BOS token added (SmolLM2's tokenizer adds none, "
    "as lm-eval's default), no chat template on either side",
]


def run_check(conf, run, venv: Path, few_shot_limit: int, batch_size: int, threads: int, command: str) -> dict:
    """Both sides on the configured MMLU subset, for each mmlu.shots setting."""
    import torch

    from ..runs import hardware, now_iso, package_versions
    from . import mmlu
    from .runtime import load_model

    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]  # the machine may be shared: timings depend on it
    spec = conf.models[0]
    full = mmlu.select(conf.mmlu, max(conf.mmlu.shots))
    t0 = time.time()
    lm = load_model(spec.name, spec.path, conf.runtime)
    load_s = time.time() - t0
    checks, lm_cmds = [], []
    for shots in conf.mmlu.shots:
        sel = dict(full)
        if shots and few_shot_limit:
            sel["scored"] = {s: q[:few_shot_limit] for s, q in full["scored"].items()}
        t = time.time()
        ours = mmlu.evaluate(lm, conf.mmlu, conf.runtime, shots, sel)
        ours_s = time.time() - t + load_s
        work = run.dir / f"{shots}shot"
        tasks = write_tasks(sel, shots, work / "tasks")
        cmd = lm_eval_command(venv, lm.path, tasks, work / "tasks", shots, batch_size, work / "lm_eval_out")
        lm_cmds.append(f"OMP_NUM_THREADS={threads} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 " + shlex.join(cmd))
        run.log.info("lm-eval %d-shot: %s", shots, lm_cmds[-1])
        lm_s = run_lm_eval(cmd, work / "lm_eval.log", threads)
        c = compare(sel, shots, ours, read_lm_eval(work / "lm_eval_out", tasks))
        c.update(ours_seconds=round(ours_s, 1), lm_eval_seconds=round(lm_s, 1))
        checks.append(c)
        run.log.info("%d-shot: forgelab %.4f, lm-eval %.4f (macro), %d different predictions", shots,
                     c["ours_macro"], c["lm_eval_macro"], c["prediction_mismatches"])
    hw = hardware()
    return {
        "date": now_iso(), "command": command, "lm_eval_commands": lm_cmds, "model": spec.path,
        "data": conf.mmlu.path, "lm_eval_venv": _rel(venv), "lm_eval_batch_size": batch_size,
        "threads": threads, "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "subset": {"subjects": list(full["scored"]), "per_subject_limit": conf.mmlu.per_subject_limit,
                   "few_shot_limit": few_shot_limit, "exemplar_source": full["exemplar_source"]},
        "checks": checks, "aligned": ALIGNED,
        "versions": {"forgelab": {k: v for k, v in package_versions().items() if v},
                     "lm_eval": venv_versions(python_of(venv))},
        "hardware": {k: hw.get(k) for k in ("cpu_count", "ram_gib", "gpus", "machine")},
    }


def python_of(venv: Path) -> Path:
    return venv / ("Scripts" if sys.platform == "win32" else "bin") / "python"
