"""Paired comparisons of evaluated models: McNemar's exact test against independently computed
binomial p-values, the paired bootstrap (coverage, determinism, agreement with plain index
resampling), perplexity pairing (refusal of misaligned windows), the verdict wording, and the
report section built end to end from a run directory in the format runner.py writes."""
import json
import math
from fractions import Fraction
from itertools import product

import numpy as np
import pytest

from forgelab.eval import paired as P
from forgelab.eval import report
from forgelab.eval.perplexity import windows


# --- McNemar ----------------------------------------------------------------------------------

def outcomes(b01: int, b10: int, both: int = 5, neither: int = 7) -> tuple[list[bool], list[bool]]:
    """A and B outcomes with the given discordant counts (b01: A wrong, B right)."""
    a = [False] * b01 + [True] * b10 + [True] * both + [False] * neither
    b = [True] * b01 + [False] * b10 + [True] * both + [False] * neither
    return a, b


def brute_force_p(k: int, n: int) -> float:
    """Two-sided p by enumerating every sequence of n fair flips: the share at least as far
    from n/2 as k."""
    far = sum(1 for s in product((0, 1), repeat=n) if abs(sum(s) - n / 2) >= abs(k - n / 2))
    return far / 2 ** n


def test_mcnemar_small_cases_by_hand():
    r = P.mcnemar(*outcomes(0, 6))
    assert (r["b01"], r["b10"], r["discordant"], r["n"]) == (0, 6, 6, 18)
    assert r["p_value"] == 2 / 2 ** 6 == 0.03125
    assert P.mcnemar(*outcomes(6, 0))["p_value"] == 0.03125
    assert P.mcnemar(*outcomes(4, 4))["p_value"] == 1.0   # symmetric
    assert P.mcnemar(*outcomes(0, 0))["p_value"] == 1.0   # no discordant pair
    # b01=2, b10=10: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert P.mcnemar(*outcomes(2, 10))["p_value"] == pytest.approx(158 / 4096, rel=1e-15)
    with pytest.raises(ValueError, match="3 outcomes for A, 2 for B"):
        P.mcnemar([True] * 3, [True] * 2)


def test_binomial_matches_enumeration_and_log_space():
    for n in range(1, 11):
        for k in range(n + 1):
            assert P.binomial_two_sided(k, n) == pytest.approx(brute_force_p(k, n), rel=1e-12), (k, n)
    n, k = 3000, 1420  # large n: against a log-space sum
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) - n * math.log(2) for j in range(k + 1)]
    top = max(logs)
    expected = 2 * math.exp(top) * sum(math.exp(x - top) for x in logs)
    assert P.binomial_two_sided(k, n) == pytest.approx(expected, rel=1e-9)
    assert float(Fraction(2, 2 ** 60)) == P.mcnemar(*outcomes(60, 0))["p_value"]


# --- the paired bootstrap ---------------------------------------------------------------------

def draw_pairs(rng, n: int, pa: float = 0.5, gain: float = 0.15, loss: float = 0.05):
    """Correlated outcomes with a true difference of gain - loss: B flips a wrong A answer to
    right with probability gain / (1 - pa) and a right one to wrong with loss / pa."""
    a = rng.random(n) < pa
    u = rng.random(n)
    b = np.where(a, u >= loss / pa, u < gain / (1 - pa))
    return a.tolist(), b.tolist()


def test_bootstrap_covers_the_true_difference():
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(200):
        a, b = draw_pairs(rng, 300)
        r = P.paired_bootstrap(a, b, n_boot=2000, seed=i)
        hits += r["ci_low"] <= 0.10 <= r["ci_high"]
    assert 0.90 <= hits / 200 <= 0.99  # nominal 95%


def test_bootstrap_is_deterministic_and_equals_index_resampling():
    a, b = draw_pairs(np.random.default_rng(3), 600)
    r = P.paired_bootstrap(a, b, n_boot=10000, seed=5)
    assert r == P.paired_bootstrap(a, b, n_boot=10000, seed=5)
    assert r["diff"] == pytest.approx(np.mean(b) - np.mean(a)) and r["n"] == 600
    assert r["ci_low"] < r["diff"] < r["ci_high"]
    # the multinomial shortcut against resampling item indices directly
    d = np.array(b, dtype=float) - np.array(a, dtype=float)
    idx = np.random.default_rng(11).integers(0, 600, size=(10000, 600))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert r["ci_low"] == pytest.approx(lo, abs=0.006) and r["ci_high"] == pytest.approx(hi, abs=0.006)
    with pytest.raises(ValueError, match="no items"):
        P.paired_bootstrap([], [])


# --- verdicts ---------------------------------------------------------------------------------

def acc_pred(outcomes_: list[bool]) -> dict:
    return {"kind": "accuracy", "key": ("row",), "field": "correct",
            "items": {(i,): x for i, x in enumerate(outcomes_)}}


def test_clear_effect_is_beyond_noise_and_null_is_not():
    a = [i % 10 < 3 for i in range(200)]
    clear = [i % 10 < 6 for i in range(200)]
    [c] = P.compare_records("math_asdiv", "base", acc_pred(a), "sft-merged", acc_pred(clear))
    assert (c["b01"], c["b10"]) == (60, 0) and c["p_value"] == 2 / 2 ** 60
    assert c["call"] == "beyond noise" and P.classify(c) == "beyond noise"
    assert c["verdict"].startswith("sft-merged beats base on math asdiv by +30.0 points (95% CI +")
    assert c["verdict"].endswith("; McNemar p < 0.0001): beyond noise.")
    worse = P.compare_records("math_asdiv", "base", acc_pred(clear), "x", acc_pred(a))[0]["verdict"]
    assert worse.startswith("x loses to base on math asdiv by \u221230.0 points")
    # null: 2 items gained, 2 lost
    null = list(a)
    null[3], null[13], null[0], null[10] = True, True, False, False
    [c] = P.compare_records("mmlu_5shot", "base", acc_pred(a), "cpt", acc_pred(null))
    assert c["diff"] == 0 and c["p_value"] == 1.0 and c["call"] == "within noise"
    assert c["verdict"].startswith("cpt differs from base on MMLU 5-shot by +0.0 points (95% CI \u2212")
    assert c["verdict"].endswith("; McNemar p = 1): within noise, no difference shown.")
    assert "equal" not in c["verdict"]


def test_borderline_and_p_rounding():
    comp = {"kind": "accuracy", "a": "base", "b": "cpt", "label": "math asdiv", "diff": 0.05,
            "ci_low": 0.004, "ci_high": 0.09, "conf": 0.95, "p_value": 0.0501}
    assert P.classify(comp) == "borderline"
    assert P.verdict(comp) == ("cpt differs from base on math asdiv by +5.0 points (95% CI +0.4 to +9.0; "
                               "McNemar p = 0.0501): borderline, no difference shown "
                               "(the CI excludes 0 but p \u2265 0.05).")
    comp.update(ci_low=-0.001, p_value=0.0499)
    assert P.verdict(comp).endswith("McNemar p = 0.0499): borderline, no difference shown "
                                    "(p < 0.05 but the CI includes 0).")
    assert P.p_text(0.41) == "= 0.41" and P.p_text(0.00023) == "= 0.00023" and P.p_text(3e-7) == "< 0.0001"


# --- perplexity -------------------------------------------------------------------------------

def window_records(n_tokens: int, groups=("kjv", "peoples_daily"), nll=2.5, noise=0.05, seed=0):
    """Windows as perplexity.evaluate writes them (spans from perplexity.windows)."""
    rng = np.random.default_rng(seed)
    out = []
    for g in groups:
        for w in windows(n_tokens, 64, 48):
            per_token = nll + noise * rng.standard_normal()
            out.append({"group": g, "begin": w.begin, "end": w.end, "targets": w.n_targets,
                        "nll_sum": round(per_token * w.n_targets, 6)})
    return out


def test_perplexity_pairing():
    a = window_records(600, seed=1)
    b = [dict(w, nll_sum=round(w["nll_sum"] - 0.2 * w["targets"], 6)) for w in a]
    r = P.paired_perplexity(a, b, n_boot=2000)
    tok = sum(w["targets"] for w in a)
    assert r["tokens"] == tok and r["n"] == len(a)
    assert r["diff"] == pytest.approx(-0.2, abs=1e-6) and r["ci_low"] == pytest.approx(-0.2, abs=1e-6)
    assert r["ratio"] == pytest.approx(r["ppl_b"] / r["ppl_a"]) == pytest.approx(math.exp(-0.2), rel=1e-5)
    assert r["share_b_lower"] == 1.0 and r["p_value"] < 1e-3
    [all_, kjv, pd] = P.compare_records("perplexity", "base", {"kind": "perplexity", "windows": a},
                                        "cpt", {"kind": "perplexity", "windows": b}, n_boot=2000)
    assert [c["label"] for c in (all_, kjv, pd)] == ["held-out text", "held-out text, kjv",
                                                     "held-out text, peoples_daily"]
    assert all_["verdict"].startswith("cpt has lower perplexity than base on held-out text by \u22120.200 nats/token "
                                      "(ratio 0.819; 95% CI \u22120.200 to \u22120.200; cpt lower on 100% of 26 windows")
    assert all_["verdict"].endswith("): beyond noise.")
    # noise only: no difference shown
    c = P.compare_records("perplexity", "base", {"kind": "perplexity", "windows": a}, "sft",
                          {"kind": "perplexity", "windows": window_records(600, seed=2)}, n_boot=2000)[0]
    assert c["call"] != "beyond noise" and "no difference shown" in c["verdict"]


def test_perplexity_refuses_misaligned_windows():
    a = window_records(600)
    other_tokenizer = window_records(610)  # another token count: the last windows move
    with pytest.raises(ValueError, match=r"do not line up: 2 of 26 differ, first window 12: "
                                         r"A has group='kjv', begin=536, end=600, targets=8, "
                                         r"B has group='kjv', begin=546, end=610, targets=18"):
        P.paired_perplexity(a, other_tokenizer)
    with pytest.raises(P.PairingError, match="26 windows for A, 34 for B"):
        P.paired_perplexity(a, window_records(800))


def test_sign_flip_p_exact_and_sampled():
    assert P.sign_flip_p(np.ones(6)) == 2 / 2 ** 6
    assert P.sign_flip_p(np.array([1.0, -1.0, 2.0, -2.0])) == 1.0
    p = P.sign_flip_p(np.ones(30), n_perm=999, seed=0)
    assert p == 1 / 1000  # never 0: the observed assignment counts


# --- predictions files ------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_predictions_files_and_item_matching(tmp_path):
    f = tmp_path / "m.mmlu_0shot.jsonl"
    write_jsonl(f, [{"subject": "anatomy", "row": 3, "correct": True},
                    {"subject": "marketing", "row": 3, "correct": False}])
    p = P.load_predictions(f)
    assert p["key"] == ("subject", "row") and p["items"] == {("anatomy", 3): True, ("marketing", 3): False}
    write_jsonl(f, [{"task_id": "HumanEval/0", "passed": True}, {"task_id": "HumanEval/1", "passed": False}])
    assert P.load_predictions(f)["field"] == "passed"
    write_jsonl(f, [{"row": 1, "correct": True}, {"row": 1, "correct": False}])
    with pytest.raises(P.PairingError, match=r"m.mmlu_0shot.jsonl:2: item row=1 appears twice"):
        P.load_predictions(f)
    write_jsonl(f, [{"row": 1, "response": "4"}])
    with pytest.raises(P.PairingError, match=r"no item id .* and correctness field \(correct / passed\)"):
        P.load_predictions(f)
    write_jsonl(f, [{"row": 1, "correct": True}, {"row": 2, "correct": "yes"}])
    with pytest.raises(P.PairingError, match=r":2: correct must be true/false, got 'yes'"):
        P.load_predictions(f)
    a = acc_pred([True, False, True])
    b = {**a, "items": {(1,): True, (2,): False, (5,): True, (6,): True}}
    with pytest.raises(P.PairingError, match=r"item sets differ: 3 unmatched items \(1 of A's 3 not in B, "
                                             r"2 of B's 4 not in A; e.g. row=0\)"):
        P.match_items(a, b)


def test_pairs():
    assert P.pairs(["base", "cpt", "sft-merged"]) == [("base", "cpt"), ("base", "sft-merged"), ("cpt", "sft-merged")]
    assert P.pairs(["a", "b"]) == [("a", "b")] and P.pairs(["a"]) == []


# --- end to end: a run directory as runner.py writes it --------------------------------------

MODELS = ["base", "cpt", "sft-merged"]
ROWS = list(range(100, 300))  # 200 scored math problems


def math_records(correct) -> list[dict]:
    return [{"row": r, "question": f"q{r}", "gold": "3", "response": "The answer is 3." if c else "4",
             "pred": "3" if c else "4", "correct": c, "prompt_tokens": 400, "new_tokens": 12, "stopped": True}
            for r, c in zip(ROWS, correct)]


def mmlu_records(correct) -> list[dict]:
    subjects = ["anatomy"] * 30 + ["marketing"] * 30
    return [{"subject": s, "row": 1000 + i, "answer": 1, "logprobs": [-1.5, -1.0, -2.0, -2.5],
             "pred": 1 if c else 0, "correct": c, "prompt_tokens": 90} for i, (s, c) in enumerate(zip(subjects, correct))]


def make_run(root, tokenizers=("tok", "tok", "tok")):
    """summary.json + predictions/: cpt has lower perplexity, sft-merged a clear math gain, MMLU
    a null difference; cpt's 5-shot file is gone; code_humaneval exists only as files."""
    run = root / "runs" / "eval" / "pipeline"
    pred = run / "predictions"
    base_math = [i % 10 < 3 for i in range(200)]
    cpt_math = list(base_math)
    cpt_math[3], cpt_math[13], cpt_math[0], cpt_math[10] = True, True, False, False
    sft_math = [i % 10 < 6 for i in range(200)]
    mm = [i % 3 == 0 for i in range(60)]
    mm_other = list(mm)
    mm_other[1], mm_other[0] = True, False
    ppl_base = window_records(600, seed=1)
    per_model = {
        "base": (base_math, mm, ppl_base, [True, False, False, True]),
        "cpt": (cpt_math, mm_other, [dict(w, nll_sum=round(w["nll_sum"] - 0.2 * w["targets"], 6)) for w in ppl_base],
                [True, False, False, True]),
        "sft-merged": (sft_math, mm_other, [dict(w, nll_sum=round(w["nll_sum"] + 0.001 * (-1) ** i * w["targets"], 6))
                                            for i, w in enumerate(ppl_base)], [True, True, False, True]),
    }
    models = {}
    for (name, (m_ok, mm_ok, wins, code)), fp in zip(per_model.items(), tokenizers):
        write_jsonl(pred / f"{name}.math_asdiv.jsonl", math_records(m_ok))
        write_jsonl(pred / f"{name}.mmlu_0shot.jsonl", mmlu_records(mm_ok))
        write_jsonl(pred / f"{name}.mmlu_5shot.jsonl", mmlu_records(mm_ok))
        write_jsonl(pred / f"{name}.perplexity.jsonl", wins)
        write_jsonl(pred / f"{name}.code_humaneval.jsonl",
                    [{"task_id": f"HumanEval/{i}", "completion": "pass", "passed": p} for i, p in enumerate(code)])
        tok = sum(w["targets"] for w in wins)
        nll = sum(w["nll_sum"] for w in wins) / tok
        mm_acc = sum(mm_ok) / 60
        mm_res = {"n": 60, "macro_accuracy": mm_acc, "micro_accuracy": mm_acc, "batch_size": 8,
                  "per_subject": {s: {"n": 30, "correct": sum(mm_ok[o:o + 30]), "accuracy": sum(mm_ok[o:o + 30]) / 30}
                                  for s, o in (("anatomy", 0), ("marketing", 30))}}
        models[name] = {
            "path": f"model/{name}", "device": "cpu", "dtype": "float32", "params": 134515008,
            "tokenizer_fingerprint": fp, "load_seconds": 2.0, "seconds": {"perplexity": 3.0, "math": 9.0, "mmlu": 4.0},
            "total_seconds": 18.0,
            "results": {"perplexity": {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens_scored": tok,
                                       "windows": len(wins), "max_length": 64, "stride": 48, "by_group": {}},
                        "math": {"asdiv": {"n": 200, "correct": sum(m_ok), "exact_match": sum(m_ok) / 200}},
                        "mmlu": {"0-shot": dict(mm_res, shots=0), "5-shot": dict(mm_res, shots=5)}}}
    (pred / "cpt.mmlu_5shot.jsonl").unlink()
    protocol = {
        "perplexity": {"source": "data/cleaned/cpt/heldout.jsonl", "fell_back": False, "documents": 32,
                       "group_key": "source", "max_length": 64, "stride": 48, "max_tokens": 1200,
                       "doc_separator": "eos", "shuffle_seed": 0, "data_fingerprint": "p"},
        "math": {"shots": 8, "max_new_tokens": 192, "seed": 1234, "system_prompt": None, "datasets": {"asdiv": {
            "path": "data/raw/asdiv/test.jsonl", "format": "asdiv", "scored": 200, "numeric_problems": 300,
            "non_numeric_left_out": 212, "excluded_as_training_data": 0, "exclude_paths": [],
            "exclude_paths_missing": [], "exemplar_source": "GSM8K train", "exemplar_rows": [1, 2],
            "scored_rows": ROWS, "data_fingerprint": "m"}}},
        "mmlu": {"path": "data/raw/mmlu/mmlu.jsonl", "dev_path": None, "shots": [0, 5],
                 "subjects": {"anatomy": 30, "marketing": 30}, "questions": 60, "per_subject_limit": 30,
                 "exemplar_source": "first questions of each subject (excluded from scoring)",
                 "data_fingerprint": "u", "header_rows_dropped": 2}}
    summary = {"outcome": "ok", "command": "python scripts/09_eval.py --run-name pipeline",
               "finished_at": "2026-12-02T00:49:45+00:00", "torch_threads": 1, "protocol": protocol, "models": models}
    (run / "summary.json").write_text(json.dumps(summary))
    return run / "summary.json", summary


def by(paired: dict, task: str, a: str, b: str) -> dict:
    return next(c for c in paired["comparisons"] if (c["task"], c["a"], c["b"]) == (task, a, b))


def test_report_section_end_to_end(tmp_path):
    where, summary = make_run(tmp_path)
    view = report.merge([(str(where), summary)])
    md_path, js_path = report.write(view, tmp_path / "eval.md")
    md, js = md_path.read_text(), json.loads(js_path.read_text())
    p = js["paired"]
    assert p["pairs"] == [["base", "cpt"], ["base", "sft-merged"], ["cpt", "sft-merged"]]
    assert (p["alpha"], p["conf"], p["n_boot"], p["seed"]) == (0.05, 0.95, 10000, 0)

    gain = by(p, "math_asdiv", "base", "sft-merged")
    assert (gain["n"], gain["b01"], gain["b10"], gain["item_key"]) == (200, 60, 0, "row")
    assert gain["p_value"] == 2 / 2 ** 60 and (gain["acc_a"], gain["acc_b"]) == (0.3, 0.6)
    assert gain["call"] == "beyond noise"
    same = by(p, "math_asdiv", "base", "cpt")
    assert (same["b01"], same["b10"], same["p_value"], same["call"]) == (2, 2, 1.0, "within noise")
    assert by(p, "math_asdiv", "cpt", "sft-merged")["call"] == "beyond noise"
    mm = by(p, "mmlu_0shot", "base", "cpt")
    assert (mm["item_key"], mm["n"], mm["b01"], mm["b10"], mm["call"]) == ("subject+row", 60, 1, 1, "within noise")
    code = by(p, "code_humaneval", "base", "sft-merged")  # found by listing predictions/, not in the summary
    assert (code["item_key"], code["field"], code["b01"], code["b10"]) == ("task_id", "passed", 1, 0)
    ppl = by(p, "perplexity", "base", "cpt")
    assert ppl["kind"] == "perplexity" and ppl["diff"] == pytest.approx(-0.2, abs=1e-6) and ppl["call"] == "beyond noise"
    assert {c["task"] for c in p["comparisons"] if c["kind"] == "perplexity"} == {
        "perplexity", "perplexity.kjv", "perplexity.peoples_daily"}
    assert by(p, "perplexity", "base", "sft-merged")["call"] == "within noise"
    # cpt's 5-shot file is gone: its two pairs are skipped with the reason, base vs sft-merged still compared
    skipped = [(s["task"], s["a"], s["b"]) for s in p["skipped"]]
    assert skipped == [("mmlu_5shot", "base", "cpt"), ("mmlu_5shot", "cpt", "sft-merged")]
    assert p["skipped"][0]["reason"].endswith("predictions/cpt.mmlu_5shot.jsonl is missing")
    assert by(p, "mmlu_5shot", "base", "sft-merged")["n"] == 60

    section = md[md.index("## Paired comparisons"):md.index("## MMLU per subject")]
    assert "under *Paired comparisons* below" in md and "± is the binomial standard error" in md
    assert ("| task | A | B | n items | A acc | B acc | difference (95% CI) | McNemar p / perplexity ratio | verdict |"
            in section)
    lo, hi = (f"{100 * gain[k]:+.1f}" for k in ("ci_low", "ci_high"))
    assert (f"| math asdiv | base | sft-merged | 200 | 30.0% | 60.0% | +30.0 ({lo} to {hi}) | p < 0.0001 "
            f"| beyond noise |") in section
    assert "| math asdiv | base | cpt | 200 | 30.0% | 30.0% | +0.0 (" in section
    assert (f"| held-out text | base | cpt | 26 windows | ppl {ppl['ppl_a']:.3f} | ppl {ppl['ppl_b']:.3f} "
            f"| \u22120.200 nats/token") in section
    assert "McNemar's exact test on the discordant items" in section and "paired bootstrap over items" in section
    assert (f"- sft-merged beats base on math asdiv by +30.0 points (95% CI {lo} to {hi}; "
            f"McNemar p < 0.0001): beyond noise.") in section
    assert "- cpt differs from base on math asdiv by +0.0 points" in section
    assert "McNemar p = 1): within noise, no difference shown." in section
    assert "- cpt has lower perplexity than base on held-out text by \u22120.200 nats/token" in section
    assert "Not compared:" in section and "- MMLU 5-shot, base vs cpt: " in section
    verdicts = section[:section.index("Not compared:")]
    assert [c["verdict"] for c in p["comparisons"]] == [x[2:] for x in verdicts.splitlines() if x.startswith("- ")]


def test_other_tokenizer_and_missing_predictions_are_skipped(tmp_path):
    where, summary = make_run(tmp_path, tokenizers=("tok", "other", "tok"))
    p = P.compare_view(report.merge([(str(where), summary)]), n_boot=500)
    reasons = {(s["task"], s["a"], s["b"]): s["reason"] for s in p["skipped"]}
    assert reasons[("perplexity", "base", "cpt")] == ("tokenizers differ (tok vs other): "
                                                      "token-level NLLs are not comparable")
    assert ("perplexity", "base", "sft-merged") not in reasons
    # a run whose predictions are elsewhere: every comparison skipped, none made, no crash
    gone = P.compare_view(report.merge([(str(tmp_path / "moved" / "summary.json"), summary)]), n_boot=500)
    assert gone["comparisons"] == [] and len(gone["skipped"]) == 4 * 3  # code_humaneval is known by its files only
    assert all(s["reason"].endswith(" is missing") for s in gone["skipped"])
    md = report.markdown(report.merge([(str(tmp_path / "moved" / "summary.json"), summary)]), gone)
    assert "No comparison could be made (see below)." in md
