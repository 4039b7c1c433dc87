"""The eval stage end to end on the tiny model (two model entries), the side-by-side report
built from its summary, the refusal to merge runs of different protocols, and the
consistency of the committed lm-eval check report."""
import json
import re

import pytest

from forgelab import config as cfg
from forgelab.eval import report
from forgelab.eval.config import EvalConfig
from forgelab.eval.runner import run_eval
from forgelab.runs import PROJECT_ROOT, Run, read_json


def tiny_conf(raw_data, tiny_model_dir, *sets):
    return cfg.load(EvalConfig, [PROJECT_ROOT / "configs/eval/default.yaml"], [
        f"models=[{{name: first, path: {tiny_model_dir}}}, {{name: second, path: {tiny_model_dir}}}]",
        "perplexity.path=data/does-not-exist.jsonl", f"perplexity.fallback_path={raw_data['wikitext_sample']}",
        "perplexity.max_tokens=200", "perplexity.max_length=64", "perplexity.stride=48",
        f"math.datasets=[{{name: asdiv, path: {raw_data['asdiv']}, format: asdiv}}]",
        "math.limit=3", "math.shots=2", "math.fewshot_paths=[]", "math.max_new_tokens=6",
        f"mmlu.path={raw_data['mmlu']}", "mmlu.subjects=[anatomy, marketing]", "mmlu.per_subject_limit=3",
        "mmlu.shots=[0, 1]", "runtime.device=cpu", *sets])


@pytest.fixture(scope="module")
def tiny_run(raw_data, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalruns")
    conf = tiny_conf(raw_data, tiny_model_dir)
    with Run("eval", conf, "tiny", runs_root=root, logs_root=root / "logs") as run:
        run_eval(conf, run, "python scripts/09_eval.py --run-name tiny")
    return run.dir, read_json(run.summary_path)


def test_summary_and_predictions(tiny_run):
    d, s = tiny_run
    assert s["outcome"] == "ok" and list(s["models"]) == ["first", "second"]
    assert s["protocol"]["perplexity"]["fell_back"] is True
    assert s["protocol"]["mmlu"]["questions"] == 6 and s["protocol"]["mmlu"]["header_rows_dropped"] == 2
    asdiv = s["protocol"]["math"]["datasets"]["asdiv"]
    assert asdiv["scored"] == 3 and not set(asdiv["scored_rows"]) & set(asdiv["exemplar_rows"])
    for name, m in s["models"].items():
        r = m["results"]
        assert r["perplexity"]["tokens_scored"] == 199 and r["perplexity"]["windows"] == 4
        assert r["perplexity"]["perplexity"] > 1000  # a random model over a 49k vocabulary
        assert set(r["mmlu"]) == {"0-shot", "1-shot"} and r["mmlu"]["0-shot"]["n"] == 6
        assert r["math"]["asdiv"]["n"] == 3 and 0 <= r["math"]["asdiv"]["exact_match"] <= 1
        assert set(m["seconds"]) == {"perplexity", "math", "mmlu"}
        rows = [json.loads(x) for x in (d / "predictions" / f"{name}.math_asdiv.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and {"gold", "pred", "response", "correct"} <= set(rows[0])
        assert sum(r_["correct"] for r_ in rows) == r["math"]["asdiv"]["correct"]
        mm = [json.loads(x) for x in (d / "predictions" / f"{name}.mmlu_1shot.jsonl").read_text().splitlines()]
        assert len(mm) == 6 and sum(x["correct"] for x in mm) / 6 == r["mmlu"]["1-shot"]["micro_accuracy"]
        win = [json.loads(x) for x in (d / "predictions" / f"{name}.perplexity.jsonl").read_text().splitlines()]
        assert sum(w["targets"] for w in win) == 199 and {w["group"] for w in win} == {"all"}
    # the same model twice gives the same numbers
    a, b = (s["models"][n]["results"] for n in ("first", "second"))
    assert a["perplexity"]["perplexity"] == pytest.approx(b["perplexity"]["perplexity"], rel=1e-6)
    assert a["mmlu"]["1-shot"]["macro_accuracy"] == b["mmlu"]["1-shot"]["macro_accuracy"]
    assert s["fingerprint"]["data_fingerprint"] and s["fingerprint"]["tokenizer_fingerprint"] != "mixed"


def test_report_table(tiny_run, tmp_path):
    d, s = tiny_run
    view = report.merge([(str(d / "summary.json"), s)])
    md_path, json_path = report.write(view, tmp_path / "eval.md")
    md, js = md_path.read_text(), json.loads(json_path.read_text())
    assert "python scripts/09_eval.py --run-name tiny" in md and js["commands"] == ["python scripts/09_eval.py --run-name tiny"]
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert header == "| metric | first | second |"
    table = {r["key"]: r for r in js["table"]}
    assert set(table) == {"perplexity", "math.asdiv", "mmlu.0-shot", "mmlu.1-shot"}
    for name, m in s["models"].items():
        assert table["perplexity"]["values"][name] == m["results"]["perplexity"]["perplexity"]
        assert table["mmlu.1-shot"]["values"][name] == m["results"]["mmlu"]["1-shot"]["macro_accuracy"]
        assert table["math.asdiv"]["values"][name] == m["results"]["math"]["asdiv"]["exact_match"]
    ppl_line = next(line for line in md.splitlines() if line.startswith("| perplexity"))
    assert f"{s['models']['first']['results']['perplexity']['perplexity']:.3f}" in ppl_line
    acc = s["models"]["first"]["results"]["mmlu"]["0-shot"]["macro_accuracy"]
    mmlu_line = next(line for line in md.splitlines() if line.startswith("| MMLU 0-shot"))
    assert f"{100 * acc:.1f}% ± " in mmlu_line
    assert "first questions of each subject" in md  # the test-only MMLU file is said so
    assert "## MMLU per subject" in md and "| anatomy | 3 |" in md


def test_merge_refuses_other_protocols(tiny_run, raw_data, tiny_model_dir, tmp_path):
    d, s = tiny_run

    def mmlu_only(name, limit):
        conf = tiny_conf(raw_data, tiny_model_dir, "tasks=[mmlu]", f"mmlu.per_subject_limit={limit}",
                         f"models=[{{name: {name}, path: {tiny_model_dir}}}]")
        with Run("eval", conf, name, runs_root=tmp_path, logs_root=tmp_path / "logs") as run:
            run_eval(conf, run, f"python scripts/09_eval.py --run-name {name}")
        return read_json(run.summary_path)

    same = mmlu_only("third", 3)  # the same MMLU protocol, other tasks not run: merges
    view = report.merge([("a", s), ("b", same)])
    assert list(view["models"]) == ["first", "second", "third"]
    ppl_row = next(r for r in report.rows(view) if r["key"] == "perplexity")
    assert ppl_row["values"]["third"] is None and "| - |" in report.markdown(view)
    other = mmlu_only("fourth", 2)
    with pytest.raises(report.ProtocolMismatch, match=r"mmlu.per_subject_limit: 3 vs 2"):
        report.merge([("a", s), ("b", other)])
    assert list(report.merge([("a", s), ("b", other)], allow_mismatch=True)["models"])[-1] == "fourth"
    with pytest.raises(report.ProtocolMismatch, match="appears in two runs"):
        report.merge([("a", s), ("a2", s)])


def test_missing_model_fails_before_work(raw_data, tiny_model_dir, tmp_path):
    conf = tiny_conf(raw_data, tiny_model_dir, "models=[{name: ghost, path: runs/train/none/final}]")
    with pytest.raises(FileNotFoundError, match=r"models\[0\] 'ghost'.*models\[0\]\.path"):
        with Run("eval", conf, "ghost", runs_root=tmp_path, logs_root=tmp_path / "logs") as run:
            run_eval(conf, run, "x")


def test_lm_eval_check_report_is_consistent():
    """reports/lm_eval_check.{md,json} (written by scripts/compare_lm_eval.py) agree with
    each other and show agreement within 1 point."""
    js_path = PROJECT_ROOT / "reports" / "lm_eval_check.json"
    if not js_path.exists():
        pytest.skip("reports/lm_eval_check.json not generated yet (scripts/compare_lm_eval.py)")
    js = json.loads(js_path.read_text())
    md = (PROJECT_ROOT / "reports" / "lm_eval_check.md").read_text()
    assert js["checks"] and js["lm_eval_commands"] and js["versions"]["lm_eval"]["lm_eval"].startswith("0.4.")
    for c in js["checks"]:
        for kind in ("macro", "micro"):
            diff = 100 * (c[f"ours_{kind}"] - c[f"lm_eval_{kind}"])
            assert c[f"diff_{kind}_points"] == pytest.approx(diff, abs=1e-9)
            assert abs(diff) <= 1.0
            row = f"| {c['shots']}-shot, {kind} | {c['questions']} | {100 * c['ours_' + kind]:.2f}% | " \
                  f"{100 * c['lm_eval_' + kind]:.2f}% | {diff:+.2f} | yes |"
            assert row in md
        n = sum(v["n"] for v in c["subjects"].values())
        assert n == c["questions"]
        assert c["ours_macro"] == pytest.approx(sum(v["ours"] for v in c["subjects"].values()) / len(c["subjects"]))
        assert c["prompt_mismatches"] == 0
    assert re.search(r"Date: \d{4}-\d\d-\d\d", md) and js["command"] in md
