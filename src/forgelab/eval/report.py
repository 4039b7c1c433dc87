"""The eval report: models side by side in one table (reports/eval.md + eval.json), built only
from run summaries, so it can be rebuilt at any time. Summaries of several runs are merged
only when their protocol (data, prompts, limits) is identical."""
from __future__ import annotations

import math
from pathlib import Path

from ..report.render import Report
from ..runs import PROJECT_ROOT, now_iso


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
            out.append({"metric": f"math {ds}, exact match ↑ ({d['scored']} problems, {prot['math']['shots']}-shot CoT)",
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
    return out


def _fmt(row: dict, v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if row["fmt"] in ("ppl", "num") else _pct(v, row.get("n"))


def _rel(p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def markdown(view: dict) -> str:
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
    L += ["", "± is the binomial standard error over the scored questions (small samples on CPU: "
          "differences inside it are noise)."]
    if len({m["tokenizer_fingerprint"] for m in models.values()}) > 1:
        L += ["", "**Tokenizers differ between these models: token-level perplexities are not comparable.**"]

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

    tasks = [t for t in ("perplexity", "math", "mmlu") if t in prot]
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
                     f"{mp['shots']} exemplars ({d['exemplar_source']}) as user/assistant turns through the "
                     f"model's chat template; greedy, at most {mp['max_new_tokens']} new tokens, stop at the "
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
    L += ["", "## Runs", ""]
    for n, m in models.items():
        L.append(f"- {n}: `{_rel(m['run'])}` (finished {m.get('finished_at')})")
    L.append("")
    return "\n".join(L)


def to_json(view: dict) -> dict:
    return {"generated_at": now_iso(),
            "commands": list(dict.fromkeys(m["command"] for m in view["models"].values())),
            "runs": [_rel(r) for r in view["runs"]], "protocol": view["protocol"],
            "table": [{"metric": r["metric"].strip(), "key": r["key"], "values": r["values"],
                       **({"n": r["n"]} if "n" in r else {})} for r in rows(view)],
            "models": {n: {k: v for k, v in m.items() if k != "results"} | {"results": _strip(m["results"])}
                       for n, m in view["models"].items()}}


def _strip(results: dict) -> dict:
    """Results without the bulky example prompts."""
    if isinstance(results, dict):
        return {k: _strip(v) for k, v in results.items() if k != "example_prompt"}
    return results


def write(view: dict, md_path: str | Path) -> tuple[Path, Path]:
    """md_path (.md) and its JSON twin beside it; returns both paths."""
    rep = Report.at(md_path, data=to_json(view))  # markdown() writes its own heading
    rep.add(markdown(view))
    return rep.write()
