"""reports/export_gate.md (+ .json): one row per deliverable x server with its verdict, and the
deliverables' sizes, so a user sees at a glance what may be shipped and what diverged where."""
from __future__ import annotations

from pathlib import Path

from ..runs import atomic_write_text, display_path, write_json


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:+.2f}%"


def _num(x, fmt="{:.4g}") -> str:
    return "–" if x is None else fmt.format(x)


def _ppl_cell(r: dict) -> str:
    n = r.get("ppl_unscored") or 0
    return _num(r.get("ppl")) + (f" ({n} tokens unscored)" if n else "")


def _acc(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _mb(b) -> str:
    return "–" if not b else f"{b / 1e6:.1f} MB"


def _divergence(row: dict) -> str:
    div = row.get("first_divergence")
    if not div:
        return "–"
    bad = [(i, d) for i, d in enumerate(div) if d is not None]
    return "none" if not bad else ", ".join(f"p{i}@{d}" for i, d in bad[:3]) + (" …" if len(bad) > 3 else "")


def render(s: dict, command: str) -> str:
    tol = s["tolerances"]
    ref = s["reference_measure"]
    p = s["probe"]
    out = ["# Export gate", "",
           f"Model exported: `{s['model']}`; reference (the model as trained): {s['reference']}.",
           f"Probe: {p['prompts']} chat prompts, {p['perplexity_tokens']:,} held-out tokens "
           f"({p['perplexity'] or '–'}), {p['math_problems']} math problems ({p['math'] or '–'}).",
           f"Reference: perplexity {_num(ref['ppl'])}, math accuracy {_acc(ref['math_acc'])}.",
           f"Tolerances: exact class (merged, F16, F32): every greedy continuation identical; INT8 / Q8_0: "
           f"perplexity at most +{100 * tol['int8_ppl']:.1f}%; INT4 / Q4 and other 4-6 bit types: "
           f"+{100 * tol['int4_ppl']:.1f}%. Prompt ids must equal the reference's everywhere.", "",
           f"Command: `{command}`", "", "## Deliverables", "",
           "| deliverable | format | type | size | vs source | export s | verdict | published |",
           "|---|---|---|---|---|---|---|---|"]
    for e in s["deliverables"]:
        st = e["stats"]
        ratio = st.get("ratio_vs_source")
        smaller = "–" if not ratio else f"{ratio:.2f}x smaller" if ratio > 1.005 else "same"
        verdict = "pass" if e["passed"] else f"**refused**: {e['diverged_at'] or 'no server ran it'}"
        out.append(f"| {e['name']} | {e['format']} | {e['qtype'] or '–'} | {_mb(st.get('bytes'))} | "
                   f"{smaller} | "
                   f"{st.get('seconds', 0):.1f} | {verdict} | {e['published'] or '–'} |")
    out += ["", f"Source weights: {_mb(s['source_bytes'])} of safetensors.", "", "## Deliverable x server", "",
            "| deliverable | server | prompt ids | greedy identical | first divergence | log-prob abs diff max / mean "
            "| perplexity | ppl vs ref | math acc | math vs ref | answers agree | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in s["deliverables"]:
        for r in e["rows"]:
            if r["passed"] is None:
                out.append(f"| {e['name']} | {r['server']} | " + " | ".join(["–"] * 10) + f" | {r['why']} |")
                continue
            lp = r.get("logprob_diff") or {}
            lps = "–" if lp.get("max") is None else f"{lp['max']:.2e} / {lp['mean']:.2e}"
            acc = r.get("math_acc")
            delta = "–" if acc is None else f"{r['math_delta_points']:+.1f} pt"
            agree = "–" if acc is None else f"{100 * r['math_agree']:.0f}%"
            out.append(
                f"| {e['name']} | {r['server']} | {r['prompt_ids_equal']}/{r['prompts']} | "
                f"{r['greedy_identical']}/{r['prompts']} | {_divergence(r)} | {lps} | {_ppl_cell(r)} | "
                f"{_pct(r.get('ppl_rel'))} | {_acc(acc)} | {delta} | {agree} | "
                f"{'pass' if r['passed'] else '**FAIL**'}: {r['why']} |")
    if s.get("served_adapters"):
        out += ["", "## LoRA adapters served together on one base (vLLM, chosen per request by name) vs PEFT", "",
                "| name | adapter | greedy identical | first divergence | log-prob abs diff max / mean | "
                "distinct from the others | verdict |", "|---|---|---|---|---|---|---|"]
        for r in s["served_adapters"]:
            if r.get("passed") is None:
                out.append(f"| {r['model']} | – | – | – | – | – | {r['why']} |")
                continue
            mx, mean = r.get("max_abs_logprob_diff"), r.get("mean_abs_logprob_diff")
            lp = "–" if mx is None else f"{mx:.2e} / {mean:.2e}"
            out.append(f"| {r['model']} | {r['adapter']} | {r['agree']}/{r['prompts']} | {_divergence(r)} | {lp} | "
                       f"{'yes' if r.get('distinct') else 'no: ' + ', '.join(r.get('same_as') or [])} | "
                       f"{'pass' if r['passed'] else '**FAIL**'} |")
    out += ["", "First divergence: `pN@K` = prompt N's greedy tokens differ from the reference's from token K on. "
            "Log-prob differences are teacher-forced on the reference's greedy tokens where the server can "
            "score a sequence (in-process, vLLM, llama.cpp), else over the server's own tokens while they agree; "
            "`transformers serve` reports none, so its rows compare prompt ids and greedy tokens (from the lab's "
            "prompt log) only. llama-server withholds the probability of a token that ends inside a UTF-8 "
            "character; such tokens are left out of that row's perplexity and of the reference's it is "
            "compared with.", ""]
    return "\n".join(out)


def write_report(summary: dict, path: Path, run) -> None:
    from .. import cli
    cmd = cli.command_line()
    atomic_write_text(path, render(summary, cmd))
    write_json(path.with_suffix(".json"), {**summary, "command": cmd, "run": display_path(run.dir)})
