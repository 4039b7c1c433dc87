"""The eval report: models side by side in one table (reports/eval.md + eval.json), built only
from run summaries, so it can be rebuilt at any time. Summaries of several runs are merged
only when their protocol (data, prompts, limits) is identical."""
from __future__ import annotations

import math
from pathlib import Path

from ..report.render import Report
from ..runs import display_path, now_iso
from .paired import compare_view, markdown_lines as paired_section


class ProtocolMismatch(ValueError):
    pass


def _diff(a, b, path: str = "") -> str | None:
    """The first key where two protocol dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def merge(summaries: list[tuple[str, dict]], allow_mismatch: bool = False) -> dict:
    """One view of several runs: models in order, each with the run and command that produced it.
    A task run by several of them must have the same protocol in each; a task missing from a
    run leaves that run's models blank in its rows."""
    base: dict = {}
    models: dict = {}
    for where, s in summaries:
        d = next((x for t in s["protocol"] if t in base for x in [_diff(base[t], s["protocol"][t], t)] if x), None)
        for t, v in s["protocol"].items():
            base.setdefault(t, v)
        if d and not allow_mismatch:
            raise ProtocolMismatch(f"{where} was evaluated under another protocol ({d}); "
                                   f"its numbers are not comparable (pass --allow-protocol-mismatch to merge anyway)")
        for name, m in s["models"].items():
            if name in models:
                raise ProtocolMismatch(f"model name {name!r} appears in two runs ({where})")
            models[name] = dict(m, run=where, command=s["command"], finished_at=s.get("finished_at"),
                                torch_threads=s.get("torch_threads"))
    return {"protocol": base, "models": models, "runs": [w for w, _ in summaries]}


def _pct(p: float | None, n: int | None = None) -> str:
    if p is None:
        return "-"
    if n:
        se = math.sqrt(p * (1 - p) / n)
        return f"{100 * p:.1f}% ± {100 * se:.1f}"
    return f"{100 * p:.1f}%"


def rows(view: dict) -> list[dict]:
    """The comparison table: one row per metric, one value per model (None where not run)."""
    prot, models = view["protocol"], view["models"]
    names = list(models)
    out = []

    def get(name, *keys):
        v = models[name]["results"]
        for k in keys:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return v

    if "perplexity" in prot:
        pp = prot["perplexity"]
        first = next((get(n, "perplexity") for n in names if get(n, "perplexity")), None)
        if first:
            out.append({"metric": f"perplexity ↓ ({pp['source']}: {first['tokens_scored']:,} tokens, "
                                  f"{first['windows']} windows of {pp['max_length']}, stride {pp['stride']})",
                        "key": "perplexity", "values": {n: get(n, "perplexity", "perplexity") for n in names},
                        "fmt": "ppl"})
            groups = first.get("by_group", {})
            if len(groups) > 1:
                for g, gv in groups.items():
                    out.append({"metric": f"  perplexity ↓, {g} ({gv['tokens_scored']:,} tokens)",
                                "key": f"perplexity.{g}", "fmt": "ppl",
                                "values": {n: get(n, "perplexity", "by_group", g, "perplexity") for n in names}})
    if "math" in prot:
        for ds, d in prot["math"]["datasets"].items():
            shots = prot["math"]["shots"]
            how = f"{shots}-shot CoT" if shots else "0-shot, as SFT asks"
            out.append({"metric": f"math {ds}, exact match ↑ ({d['scored']} problems, {how})",
                        "key": f"math.{ds}", "fmt": "acc", "n": d["scored"],
                        "values": {n: get(n, "math", ds, "exact_match") for n in names}})
            for what in ("metrics", "rewards"):  # plug-ins (docs/components.md): mean per model
                for cname in prot["math"].get(what, {}):
                    out.append({"metric": f"  math {ds}, {what[:-1]} {cname} (mean over {d['scored']} problems)",
                                "key": f"math.{ds}.{what}.{cname}", "fmt": "num",
                                "values": {n: get(n, "math", ds, what, cname, "mean") for n in names}})
    if "mmlu" in prot:
        m = prot["mmlu"]
        for shots in m["shots"]:
            out.append({"metric": f"MMLU {shots}-shot, macro accuracy ↑ ({len(m['subjects'])} subjects, "
                                  f"{m['questions']} questions)",
                        "key": f"mmlu.{shots}-shot", "fmt": "acc", "n": m["questions"],
                        "values": {n: get(n, "mmlu", f"{shots}-shot", "macro_accuracy") for n in names}})
    if "lm_eval" in prot:
        out.extend(_lm_eval_rows(prot["lm_eval"], {n: get(n, "lm_eval") or {} for n in names}))
    if "choice" in prot:
        c = prot["choice"]
        for ds, d in c["datasets"].items():
            k = "/".join(str(x) for x in d["choices"])
            for metric, label in (("acc", "accuracy"), ("acc_norm", "length-normalized accuracy")):
                out.append({"metric": f"{'' if metric == 'acc' else '  '}choice {ds}, {label} ↑ ({d['scored']} "
                                      f"questions, {k} choices, {c['shots']}-shot)",
                            "key": f"choice.{ds}.{metric}", "fmt": "acc", "n": d["scored"],
                            "values": {n: get(n, "choice", ds, metric) for n in names}})
    if "code" in prot:
        c = prot["code"]
        out.append({"metric": f"code {c['dataset']}, pass@1 ↑ ({c['scored']} problems, {c['shots']}-shot, greedy)",
                    "key": f"code.{c['dataset']}", "fmt": "acc", "n": c["scored"],
                    "values": {n: get(n, "code", c["dataset"], "pass_at_1") for n in names}})
    return out


def _lm_eval_rows(prot: dict, res: dict) -> list[dict]:
    """One row per lm-eval task and metric (stderr values go into the label, not rows of their own)."""
    first = next((r for r in res.values() if r.get("tasks")), None)
    if not first:
        return []
    shots = "task default shots" if prot["num_fewshot"] is None else f"{prot['num_fewshot']}-shot"
    out = []
    for task, metrics in first["tasks"].items():
        for metric in metrics:
            if metric == "n" or "_stderr" in metric:
                continue
            arrow = {True: " ↑", False: " ↓"}.get(first.get("higher_is_better", {}).get(task, {}).get(metric), "")
            out.append({"metric": f"lm-eval {task}, {metric}{arrow} ({metrics['n']} samples, {shots}, "
                                  f"lm-eval {prot['lm_eval_version']} --model {prot['model']})",
                        "key": f"lm_eval.{task}.{metric}", "fmt": "num",
                        "values": {n: r.get("tasks", {}).get(task, {}).get(metric) for n, r in res.items()}})
    return out


def _fmt(row: dict, v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if row["fmt"] in ("ppl", "num") else _pct(v, row.get("n"))




def markdown(view: dict, paired: dict | None = None) -> str:
    """The report's markdown; `paired` is compare_view(view), computed here when not given."""
    prot, models = view["protocol"], view["models"]
    names = list(models)
    commands = list(dict.fromkeys(m["command"] for m in models.values()))
    L = ["# Evaluation", "",
         "Models side by side on the same data, prompts and limits. Every number below comes "
         "from the run summaries listed under *Runs*, produced by:", ""]
    L += [f"    {c}" for c in commands] + [""]
    L += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows(view):
        L.append(f"| {r['metric']} | " + " | ".join(_fmt(r, r["values"][n]) for n in names) + " |")
    L += ["", "± is the binomial standard error over the scored questions, for each model alone; "
          "whether two models differ is tested on the same items under *Paired comparisons* below."]
    if len({m["tokenizer_fingerprint"] for m in models.values()}) > 1:
        L += ["", "**Tokenizers differ between these models: token-level perplexities are not comparable.**"]
    L += [""] + paired_section(paired if paired is not None else compare_view(view))

    if "mmlu" in prot:
        shots = prot["mmlu"]["shots"]
        cols = [(n, s) for n in names for s in shots]
        L += ["", "## MMLU per subject (accuracy, questions)", "",
              "| subject | n | " + " | ".join(f"{n} {s}-shot" for n, s in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
        for subj, n_q in prot["mmlu"]["subjects"].items():
            vals = []
            for n, s in cols:
                ps = models[n]["results"].get("mmlu", {}).get(f"{s}-shot", {}).get("per_subject", {})
                vals.append(_pct(ps[subj]["accuracy"]) if subj in ps else "-")
            L.append(f"| {subj.replace('_', ' ')} | {n_q} | " + " | ".join(vals) + " |")

    tasks = [t for t in ("perplexity", "math", "mmlu", "lm_eval", "choice", "code") if t in prot]
    L += ["", "## Models and time (seconds)", "",
          "| model | path | device, dtype | threads | load | " + " | ".join(tasks) + " | total |",
          "|---|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    for n, m in models.items():
        L.append(f"| {n} | `{m['path']}` | {m['device']}, {m['dtype']} | {m.get('torch_threads')} | "
                 f"{m['load_seconds']:.0f} | " + " | ".join(f"{m['seconds'].get(t, 0):.0f}" for t in tasks)
                 + f" | {m['total_seconds']:.0f} |")

    L += ["", "## Protocol", ""]
    if "perplexity" in prot:
        p = prot["perplexity"]
        fb = " (perplexity.path was missing: the fallback file)" if p["fell_back"] else ""
        grp = (f"one stream per `{p['group_key']}` value, each cut at an equal share of {p['max_tokens']} tokens"
               if p.get("group_key") else f"one token stream cut at {p['max_tokens']} tokens")
        L.append(f"- Perplexity: `{p['source']}`{fb}, {p['documents']} documents shuffled with seed "
                 f"{p['shuffle_seed']}, each followed by the separator `{p['doc_separator']}`, {grp} "
                 f"(0 = all); sliding windows of {p['max_length']} tokens moving "
                 f"by {p['stride']}: every token but the first is scored exactly once, with at least "
                 f"{p['max_length'] - p['stride']} tokens of context after the first window; "
                 f"perplexity = exp(mean token NLL), pooled over the streams for the overall figure.")
    if "math" in prot:
        mp = prot["math"]
        for ds, d in mp["datasets"].items():
            excl = ""
            if d.get("exclude_paths"):
                present = [x for x in d["exclude_paths"] if x not in d.get("exclude_paths_missing", [])]
                excl = (f"; {d['excluded_as_training_data']} more left out as training data "
                        f"({', '.join(f'`{x}`' for x in present) or 'no file present'})")
                if d.get("exclude_paths_missing"):
                    excl += (f"; **not checked against {', '.join(f'`{x}`' for x in d['exclude_paths_missing'])} "
                             f"(missing): models trained on it may have seen these problems**")
            L.append(f"- Math {ds}: `{d['path']}` ({d['format']} format); {d['scored']} problems drawn by a "
                     f"shuffle with seed {mp['seed']} from the {d['numeric_problems']} that remain "
                     f"({d['non_numeric_left_out']} left out for a non-numeric answer: names, times, ratios, "
                     f"several numbers{excl}). "
                     + (f"{mp['shots']} exemplars ({d['exemplar_source']}) as user/assistant turns, then the "
                        f"problem, through the model's chat template" if mp["shots"] else
                        "The problem alone as the user turn through the model's chat template, as stage 03's "
                        "SFT rows ask it")
                     + f"; greedy, at most {mp['max_new_tokens']} new tokens, stop at the "
                     f"end token; the final number of the answer is extracted and compared exactly.")
        plug = [f"metric {c} (`{v['path']}`, code {v['sha256']}): mean of metric(response, gold answer)"
                for c, v in mp.get("metrics", {}).items()]
        plug += [f"reward {c} (`{v['path']}`, code {v['sha256']}): mean of reward(prompts, completions, "
                 f"answer=, question=) over the completions it scores" for c, v in mp.get("rewards", {}).items()]
        if plug:
            L.append("- Math plug-ins (docs/components.md): " + "; ".join(plug) + ".")
    if "mmlu" in prot:
        mp = prot["mmlu"]
        L.append(f"- MMLU: `{mp['path']}`, {len(mp['subjects'])} subjects, "
                 f"{'all' if not mp['per_subject_limit'] else 'up to ' + str(mp['per_subject_limit'])} "
                 f"questions each; prompt 'The following are multiple choice questions (with answers) "
                 f"about <subject>.' + exemplars + 'question / A. .. D. .. / Answer:', scored by the "
                 f"log-probability of ' A', ' B', ' C', ' D' as the next token; macro accuracy = mean over "
                 f"subjects. Exemplars: {mp['exemplar_source']}"
                 + (" — this file ships only the test split, so the first questions of each subject "
                    "serve as the few-shot examples and are not scored." if not mp["dev_path"] else ".")
                 + (f" {mp['header_rows_dropped']} header-like rows (answer 'answer') dropped."
                    if mp["header_rows_dropped"] else ""))
    if "lm_eval" in prot:
        le = prot["lm_eval"]
        L.append(f"- lm-eval {le['lm_eval_version']} (its own venv, offline), --model {le['model']}: tasks "
                 f"{', '.join(le['tasks'])}" + (f" (custom tasks from `{le['include_path']}`)" if le["include_path"] else "")
                 + f"; {'task default' if le['num_fewshot'] is None else le['num_fewshot']} shots, "
                 f"{'all samples' if not le['limit'] else 'at most ' + str(le['limit']) + ' samples'} per task"
                 + (", chat template applied" if le["apply_chat_template"] else "")
                 + "; per-model command lines and lm-eval's per-sample logs are in the run summary and its "
                 "predictions/<model>.lm_eval/ folder.")
    if "choice" in prot:
        L.append(_choice_protocol(prot["choice"]))
    if "code" in prot:
        L.append(_code_protocol(prot["code"]))
    L += ["", "## Runs", ""]
    for n, m in models.items():
        L.append(f"- {n}: `{display_path(m['run'])}` (finished {m.get('finished_at')})")
    L.append("")
    return "\n".join(L)


def _choice_protocol(c: dict) -> str:
    sets = []
    for ds, d in c["datasets"].items():
        left = "; ".join(f"{v['count']} left out: {why}" for why, v in d["labels_dropped"].items())
        sets.append(f"{ds} `{d['path']}` ({d['format']}; {d['scored']} of {d['labelled']} labelled questions"
                    + (f", {left}" if left else "") + ")")
    return (f"- Multiple choice: {'; '.join(sets)}. Questions drawn by a shuffle with seed {c['seed']}; "
            f"{c['shots']} exemplars; context '[passage]\\nQuestion: <question>\\nAnswer:', each choice "
            f"scored by the summed log-probability of ' <choice text>' as its continuation "
            f"(lm-evaluation-harness style); accuracy = argmax of the sum, length-normalized accuracy = "
            f"argmax of the sum divided by the choice's length in bytes.")


def _code_protocol(c: dict) -> str:
    sb, lim = c["sandbox"]["isolation"], c["sandbox"]["limits"]
    subset = "all" if not c["limit"] else f"{c['scored']} drawn by a shuffle with seed {c['seed']}"
    def literal(text: str) -> str:  # fences shown as text, not as markdown code
        return text.replace("\n", "\\n").replace("`", "\\`")

    return (f"- Code ({c['dataset']}): `{c['path']}`, {subset} of {c['problems']} problems. One user turn through "
            f"the model's chat template, '{literal(c['prompt'])}'; greedy, at most {c['max_new_tokens']} new tokens. "
            f"Code: {literal(c['extraction'])}. Test program = code + the problem's tests + `check(<entry_point>)`, "
            f"run in a sandbox ({sb['mode']}, Python {sb['python_version']}, audit hook; {lim['timeout_s']:g} s wall clock "
            f"killing every process of the run, {lim['cpu_s']} s CPU, {lim['memory_mb']} MB address space, "
            f"{lim['file_mb']} MB per file, {c['sandbox']['workers']} at once); pass@1 = share of problems whose "
            f"program runs to its end (timeouts, refused operations and errors fail).")


def to_json(view: dict, paired: dict | None = None) -> dict:
    return {"generated_at": now_iso(),
            "commands": list(dict.fromkeys(m["command"] for m in view["models"].values())),
            "runs": [display_path(r) for r in view["runs"]], "protocol": view["protocol"],
            "table": [{"metric": r["metric"].strip(), "key": r["key"], "values": r["values"],
                       **({"n": r["n"]} if "n" in r else {})} for r in rows(view)],
            "models": {n: {k: v for k, v in m.items() if k != "results"} | {"results": _strip(m["results"])}
                       for n, m in view["models"].items()},
            "paired": paired if paired is not None else compare_view(view)}


def _strip(results: dict) -> dict:
    """Results without the bulky example prompts."""
    if isinstance(results, dict):
        return {k: _strip(v) for k, v in results.items() if k != "example_prompt"}
    return results


def write(view: dict, md_path: str | Path) -> tuple[Path, Path]:
    """md_path (.md) and its JSON twin beside it; returns both paths."""
    paired = compare_view(view)  # bootstraps and predictions files: once for both outputs
    rep = Report.at(md_path, data=to_json(view, paired))  # markdown() writes its own heading
    rep.add(markdown(view, paired))
    return rep.write()
