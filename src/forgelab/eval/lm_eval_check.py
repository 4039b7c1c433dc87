"""The reference check of the MMLU and math tasks: the same model and the same questions through
lm-evaluation-harness (in its own venv, fed the local data as custom tasks) and through
forgelab.eval.mmlu / forgelab.eval.gsm, then accuracies, per-question predictions (MMLU:
log-likelihoods; math: generated texts) and the exact prompt strings compared.

Alignment: our prompt is already lm-eval's default MMLU layout (description line, exemplars
joined by blank lines, "question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", targets " A".." D",
no BOS token, no chat template). lm-eval gets the very questions we score as its test split and
our few-shot exemplars as its dev split, taken in order (sampler first_n), so both sides see
the same prompts; the check verifies that string by string.

Math: the scored problems (same rows, same question text) become a generate_until task whose
prompt is the question alone, rendered by lm-eval with the model's chat template
(--apply_chat_template; no system message, so the template's default, as ours), greedy, at most
math.max_new_tokens tokens, stopped only at the end token. Its process_results scores with our
own extract_answer + is_correct (imported into lm-eval's process) and, beside it, with lm-eval's
standard GSM8K flexible-extract filter and exact_match.
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
from ..runs import PROJECT_ROOT, atomic_write_text, display_path
from .data import LETTERS
from .lm_eval_backend import OFFLINE_ENV, newest_output, run_command
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
                    batch_size: int, out_dir: Path, device: str = "cpu", dtype: str = "float32",
                    extra: tuple[str, ...] = ()) -> list[str]:
    """The lm-eval command line, paths relative to the project root (where it runs)."""
    venv, model_path, task_dir, out_dir = (display_path(p) for p in (venv, model_path, task_dir, out_dir))
    return [str(Path(venv) / "bin" / "lm-eval"), "run", "--model", "hf",
            "--model_args", f"pretrained={model_path},dtype={dtype}",
            "--tasks", ",".join(tasks), "--include_path", str(task_dir),
            "--num_fewshot", str(shots), "--batch_size", str(batch_size), "--device", device,
            "--output_path", str(out_dir), "--log_samples", *extra]




def run_lm_eval(cmd: list[str], log_path: Path, threads: int) -> float:
    """Run lm-eval offline (no hub) from the project root, output to log_path; returns the wall seconds."""
    env = dict(OFFLINE_ENV, OMP_NUM_THREADS=str(threads),
               HF_DATASETS_CACHE=str(log_path.parent / "hf_datasets_cache"))  # the local files, not a stale cache
    return run_command(cmd, env, log_path)  # output to the log and, live, to stderr


def read_lm_eval(out_dir: Path, tasks: list[str]) -> dict:
    """task -> {acc, n, samples: doc_id -> {prompt, logliks}} from lm-eval's output folder."""
    results_file = newest_output(out_dir, "results_*.json")
    res = json.loads(results_file.read_text(encoding="utf-8"))
    out = {}
    for t in tasks:
        acc = res["results"][t]["acc,none"]
        samples = {}
        for _, s in iter_jsonl(newest_output(out_dir, f"samples_{t}_*.jsonl")):
            args = s["arguments"]
            pairs = [tuple(a.values()) if isinstance(a, dict) else tuple(a)
                     for a in (args.values() if isinstance(args, dict) else args)]
            samples[int(s["doc_id"])] = {"prompt": pairs[0][0], "continuations": [p[1] for p in pairs],
                                         "logliks": [float(r[0]) for r in s["filtered_resps"]],
                                         "acc": float(s["acc"])}
        out[t] = {"acc": float(acc), "n": len(samples), "samples": samples}
    return {"tasks": out, "versions": res.get("versions", {}), "config": res.get("config", {}),
            "lm_eval_version": res.get("lm_eval_version") or res.get("config", {}).get("lm_eval_version"),
            "results_file": str(results_file)}


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
    """The whole report: the MMLU part (top-level keys) and the math part (report["math"])."""
    L = ["# Reference check: forgelab vs lm-evaluation-harness", ""]
    if report.get("checks"):
        L += mmlu_markdown(report)
    if report.get("math"):
        L += math_markdown(report["math"])
    return "\n".join(L)


def mmlu_markdown(report: dict) -> list[str]:
    L = ["## MMLU", "",
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
          "questions (lm-eval's group aggregate).", "", "### Per subject", "",
          "| setting | subject | n | forgelab | lm-eval |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        for s, v in c["subjects"].items():
            L.append(f"| {c['shots']}-shot | {s.replace('_', ' ')} | {v['n']} | {100 * v['ours']:.1f}% | "
                     f"{100 * v['lm_eval']:.1f}% |")
    L += ["", "### What was aligned", ""] + [f"- {a}" for a in report["aligned"]]
    L += ["", "### Versions and time", "",
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
    return L


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
        "data": conf.mmlu.path, "lm_eval_venv": display_path(venv), "lm_eval_batch_size": batch_size,
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


# ----------------------------------------------------------------------------- math

MATH_TASK_PREFIX = "forgelab_math_"
# lm-eval's standard GSM8K scoring (tasks/gsm8k/gsm8k.yaml, filter "flexible-extract"): the last
# number-like string of the response, compared as a string after exact_match's normalisation
FLEX_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FLEX_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
MATH_UTILS = '''"""Scoring of the forgelab math check inside lm-eval (written by forgelab.eval.lm_eval_check)."""
import sys

sys.path.insert(0, {src!r})  # forgelab.eval.answers is pure Python: no forgelab venv needed

from forgelab.eval.answers import extract_answer, is_correct  # noqa: E402
from lm_eval.api.metrics import exact_match_hf_evaluate  # noqa: E402
from lm_eval.filters.extraction import RegexFilter  # noqa: E402

_FLEX = RegexFilter(regex_pattern={regex!r}, group_select=-1)


def process_results(doc, results):
    text = results[0]
    flex = list(_FLEX.apply([[text]], [doc]))[0][0]
    em = exact_match_hf_evaluate([flex], [doc["gold"]], regexes_to_ignore={ignore!r}, ignore_case=True)
    return {{"exact_match": float(is_correct(extract_answer(text), doc["gold"])),
            "flexible_extract": float(em["exact_match"])}}
'''


def write_math_task(name: str, problems: list[dict], max_new_tokens: int, task_dir: Path) -> str:
    """A generate_until task over our scored problems (in our order) and its utils.py."""
    test = task_dir / f"math_{name}.test.jsonl"
    atomic_write_text(test, "".join(json.dumps({"question": p["question"], "gold": p["gold"], "row": p["row"]},
                                               ensure_ascii=False) + "\n" for p in problems))
    task = {
        "task": MATH_TASK_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(test.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "question",  # a column name: the question text verbatim, as our user turn
        "doc_to_target": "gold",
        "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": max_new_tokens},
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("exact_match", "flexible_extract")],
        "metadata": {"version": 1.0},
    }
    atomic_write_text(task_dir / "utils.py", MATH_UTILS.format(src=str(PROJECT_ROOT / "src"), regex=FLEX_REGEX,
                                                               ignore=FLEX_IGNORE))
    # !function is lm-eval's YAML tag for a callable: appended by hand, safe_dump cannot write it
    text = yaml.safe_dump(task, sort_keys=False, allow_unicode=True) + "process_results: !function utils.process_results\n"
    atomic_write_text(task_dir / f"{MATH_TASK_PREFIX}{name}.yaml", text)
    return MATH_TASK_PREFIX + name


def read_math_samples(out_dir: Path, task: str) -> dict:
    """{exact_match, flexible_extract (lm-eval's aggregates), samples: doc_id -> {prompt, text,
    exact_match, flexible_extract}} of one math task."""
    res = json.loads(newest_output(out_dir, "results_*.json").read_text(encoding="utf-8"))["results"][task]
    samples = {}
    for _, s in iter_jsonl(newest_output(out_dir, f"samples_{task}_*.jsonl")):
        args = s["arguments"]["gen_args_0"]
        samples[int(s["doc_id"])] = {"prompt": args["arg_0"], "text": s["filtered_resps"][0],
                                     "exact_match": float(s["exact_match"]),
                                     "flexible_extract": float(s["flexible_extract"])}
    return {"exact_match": float(res["exact_match,none"]), "flexible_extract": float(res["flexible_extract,none"]),
            "samples": samples}


def compare_math(records: list[dict], prompts: list[str], theirs: dict) -> dict:
    """Our records and prompts against lm-eval's samples (doc_id = position in our order)."""
    from .answers import extract_answer

    n = len(records)
    if sorted(theirs["samples"]) != list(range(n)):
        raise ValueError(f"lm-eval scored {len(theirs['samples'])} problems, we scored {n}")
    diffs = {"prompt": 0, "text": 0, "prediction": 0}
    examples = []
    for i, (mine, prompt) in enumerate(zip(records, prompts)):
        ref = theirs["samples"][i]
        diff = {"prompt": ref["prompt"] != prompt, "text": ref["text"] != mine["response"],
                "prediction": extract_answer(ref["text"]) != mine["pred"]}
        for k, v in diff.items():
            diffs[k] += v
        if any(diff.values()) and len(examples) < 3:  # a few, to see what differs
            examples.append({"row": mine["row"], "ours": mine["response"], "lm_eval": ref["text"],
                             "prompt_identical": not diff["prompt"]})
    ours = sum(r["correct"] for r in records) / n
    return {"n": n, "rows": [r["row"] for r in records], "ours": ours, "lm_eval": theirs["exact_match"],
            "lm_eval_from_samples": sum(s["exact_match"] for s in theirs["samples"].values()) / n,
            "lm_eval_flexible_extract": theirs["flexible_extract"],
            "diff_points": 100 * (ours - theirs["exact_match"]),
            "prompt_mismatches": diffs["prompt"], "text_mismatches": diffs["text"],
            "prediction_mismatches": diffs["prediction"], "mismatch_examples": examples,
            "example_prompt": prompts[0]}


MATH_ALIGNED = [
    "problems: lm-eval's test split is exactly forgelab's scored subset (local jsonl via "
    "dataset_path: json), same rows, same order, the same question text (ASDiv: passage + ' ' + question)",
    "prompt: the question alone as the one user turn (doc_to_text = the question column, no "
    "description, 0-shot), rendered by lm-eval with the model's chat template "
    "(--apply_chat_template, add_generation_prompt) and no system message on either side, so "
    "SmolLM2's template adds its default one to both; compared as exact strings",
    "generation: greedy (do_sample false, temperature 0), at most math.max_new_tokens new tokens, "
    "until = [] so only the end token stops it (lm-eval adds it to the stop strings), the "
    "continuation decoded without special tokens on both sides",
    "scoring: lm-eval's process_results calls forgelab.eval.answers.extract_answer + is_correct "
    "(imported into lm-eval's process from src/), the very functions forgelab scores with; lm-eval's "
    "standard GSM8K flexible-extract (last number-like string, exact_match after removing ',', '$', "
    "a trailing '.') is computed beside it from the same responses",
    "model: the same directory, the same device and dtype as forgelab's runtime, no BOS token added",
]


def run_math_check(conf, run, venv: Path, batch_size: int, threads: int, command: str) -> dict:
    """Both sides on the configured math datasets: our generation and lm-eval's from the same prompts."""
    import torch

    from ..runs import hardware, now_iso, package_versions
    from . import gsm
    from .runtime import load_model

    if conf.math.shots:
        raise ValueError(f"math.shots is {conf.math.shots}: the lm-eval math check runs the 0-shot "
                         "protocol (set math.shots=0)")
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    spec = conf.models[0]
    t0 = time.time()
    lm = load_model(spec.name, spec.path, conf.runtime)
    load_s = time.time() - t0
    work = run.dir / "math"
    ours, tasks = {}, []
    for ds in conf.math.datasets:
        prep = gsm.prepare(conf.math, ds)
        t = time.time()
        r = gsm.evaluate(lm, conf.math, ds, conf.runtime, prep)
        prompts = [gsm.render_prompt(lm.tokenizer, gsm.build_messages(p["question"], prep["exemplars"],
                                                                       conf.math.system_prompt))
                   for p in prep["problems"]]
        ours[ds.name] = {"records": r["records"], "prompts": prompts, "seconds": time.time() - t,
                         "path": ds.path, "scored": len(prep["problems"])}
        run.log.info("math %s: forgelab %d/%d exact match", ds.name, r["correct"], r["n"])
        tasks.append(write_math_task(ds.name, prep["problems"], conf.math.max_new_tokens, work / "tasks"))
    extra = ("--apply_chat_template",) + (("--system_instruction", conf.math.system_prompt)
                                          if conf.math.system_prompt else ())
    cmd = lm_eval_command(venv, lm.path, tasks, work / "tasks", 0, batch_size, work / "lm_eval_out",
                          lm.device, lm.dtype, extra)
    lm_cmd = f"OMP_NUM_THREADS={threads} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 " + shlex.join(cmd)
    run.log.info("lm-eval math: %s", lm_cmd)
    lm_s = run_lm_eval(cmd, work / "lm_eval.log", threads)
    datasets = []
    for ds, task in zip(conf.math.datasets, tasks):
        o = ours[ds.name]
        c = compare_math(o["records"], o["prompts"], read_math_samples(work / "lm_eval_out", task))
        c.update(name=ds.name, path=ds.path, ours_seconds=round(o["seconds"] + load_s, 1))
        datasets.append(c)
        run.log.info("math %s: forgelab %.4f, lm-eval %.4f (flexible-extract %.4f); different predictions "
                     "%d, texts %d, prompts %d", ds.name, c["ours"], c["lm_eval"], c["lm_eval_flexible_extract"],
                     c["prediction_mismatches"], c["text_mismatches"], c["prompt_mismatches"])
    hw = hardware()
    return {
        "date": now_iso(), "command": command, "lm_eval_command": lm_cmd, "model": spec.path,
        "device": lm.device, "dtype": lm.dtype, "lm_eval_seconds": round(lm_s, 1),
        "lm_eval_batch_size": batch_size, "threads": threads,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "protocol": {"shots": 0, "max_new_tokens": conf.math.max_new_tokens, "seed": conf.math.seed,
                     "limit": conf.math.limit, "system_prompt": conf.math.system_prompt,
                     "exclude_paths": conf.math.exclude_paths},
        "datasets": datasets, "aligned": MATH_ALIGNED,
        "versions": {"forgelab": {k: v for k, v in package_versions().items() if v},
                     "lm_eval": venv_versions(python_of(venv))},
        "hardware": {k: hw.get(k) for k in ("cpu_count", "ram_gib", "gpus", "machine")},
    }


def math_markdown(m: dict) -> list[str]:
    p = m["protocol"]
    L = ["## Math (generation)", "",
         f"Date: {m['date']}. Model: `{m['model']}` ({m['device']}, {m['dtype']}). 0-shot, the problem as the "
         f"one user turn through the chat template, greedy, at most {p['max_new_tokens']} new tokens.", "",
         "Produced by:", "", f"    {m['command']}", "", "which ran, for the reference side:", "",
         f"    {m['lm_eval_command']}", "",
         "| dataset | problems | forgelab | lm-eval, forgelab scoring | difference (points) | within 1 point | "
         "lm-eval, flexible-extract | different predictions | different generated texts | prompts not identical |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for d in m["datasets"]:
        L.append(f"| {d['name']} (`{d['path']}`) | {d['n']} | {100 * d['ours']:.2f}% | {100 * d['lm_eval']:.2f}% | "
                 f"{d['diff_points']:+.2f} | {'yes' if abs(d['diff_points']) <= 1 else 'NO'} | "
                 f"{100 * d['lm_eval_flexible_extract']:.2f}% | {d['prediction_mismatches']} | "
                 f"{d['text_mismatches']} | {d['prompt_mismatches']} |")
    L += ["", "forgelab scoring = `forgelab.eval.answers.extract_answer` + `is_correct` on each side's "
          "response; flexible-extract = lm-eval's standard GSM8K filter (last number-like string) and "
          "exact_match on lm-eval's responses. Rows scored: the run summary's "
          "`protocol.math.datasets.<name>.scored_rows` for the same config (also in the JSON twin)."]
    for d in m["datasets"]:
        for e in d["mismatch_examples"]:
            L += ["", f"Differing response, {d['name']} row {e['row']} (prompt identical: "
                      f"{'yes' if e['prompt_identical'] else 'no'}):", "",
                  f"    forgelab: {e['ours']!r}", f"    lm-eval:  {e['lm_eval']!r}"]
    L += ["", "### What was aligned", ""] + [f"- {a}" for a in m["aligned"]]
    L += ["", "### Versions and time", "",
          f"- lm-eval side: {json.dumps(m['versions']['lm_eval'])}; forgelab side: "
          f"{json.dumps({k: m['versions']['forgelab'].get(k) for k in ('torch', 'transformers')})}",
          f"- machine: {m['hardware']['cpu_count']} CPU cores, OMP_NUM_THREADS={m['threads']} for both sides; "
          f"1-minute load average {m['load_average_1min'][0]} at the start, {m['load_average_1min'][1]} at the end "
          f"(other work shared the machine: times are upper bounds)"]
    for d in m["datasets"]:
        L.append(f"- {d['name']}: forgelab {d['ours_seconds']:.0f} s (includes model load)")
    L += [f"- lm-eval, all datasets: {m['lm_eval_seconds']:.0f} s (batch size {m['lm_eval_batch_size']}; "
          f"includes model load)", ""]
    return L
