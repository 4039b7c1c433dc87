"""Stage 09 for real: scripts/09_eval.py on SmolLM2-135M-Instruct with a handful of MMLU
questions, 2 ASDiv problems and a short perplexity stream."""
import json

import pytest

from helpers import run_eval_script

from forgelab.eval.perplexity import windows
from forgelab.runs import project_path


@pytest.mark.slow
def test_eval_script_on_smollm2(smollm2_dir, raw_data, tmp_path):
    report_md = tmp_path / "eval.md"
    run_dir, s = run_eval_script(
        "smollm2-small", report_md, f"models=[{{name: base, path: {smollm2_dir}}}]",
        "perplexity.max_tokens=256", "perplexity.max_length=128", "perplexity.stride=96",
        "math.limit=2", "math.shots=2", "math.fewshot_paths=[]", "math.max_new_tokens=40",
        "mmlu.subjects=[world_religions, high_school_geography]", "mmlu.per_subject_limit=3",
        "mmlu.shots=[0, 2]", "runtime.device=cpu")
    assert s["outcome"] == "ok" and s["command"].startswith("OMP_NUM_THREADS=1 python scripts/09_eval.py")
    m = s["models"]["base"]
    assert m["params"] == 134_515_008 and m["device"] == "cpu" and m["dtype"] == "float32"
    p = m["results"]["perplexity"]
    held = project_path("data/cleaned/cpt/heldout.jsonl").exists()
    assert s["protocol"]["perplexity"]["fell_back"] is (not held)
    # one stream per source of the held-out file (one in all for the fallback), 256 tokens shared
    n_groups = len(p["by_group"])
    assert n_groups == (2 if held else 1) and p["tokens_per_group"] == 256 // n_groups
    assert p["tokens_scored"] == 256 - n_groups
    assert p["windows"] == n_groups * len(windows(256 // n_groups, 128, 96))
    assert p["min_context_after_first_window"] == 32
    assert 2 < p["perplexity"] < 500  # a real language model, not a random one (~49k)
    math_ = m["results"]["math"]["asdiv"]
    assert math_["n"] == 2 and math_["correct"] in (0, 1, 2)
    assert s["protocol"]["math"]["datasets"]["asdiv"]["exemplar_source"] == "asdiv problems outside the scored subset"
    recs = [json.loads(x) for x in (run_dir / "predictions" / "base.math_asdiv.jsonl").read_text().splitlines()]
    assert all(r["response"].strip() and r["new_tokens"] <= 40 for r in recs)
    assert [r["correct"] for r in recs].count(True) == math_["correct"]
    for shots in ("0-shot", "2-shot"):
        mm = m["results"]["mmlu"][shots]
        assert mm["n"] == 6 and set(mm["per_subject"]) == {"world_religions", "high_school_geography"}
        assert 0 <= mm["macro_accuracy"] <= 1
    assert "Answer: " in m["results"]["mmlu"]["2-shot"]["example_prompt"]
    md = report_md.read_text()
    assert "| metric | base |" in md and "MMLU 2-shot" in md and "python scripts/09_eval.py" in md
    assert json.loads(report_md.with_suffix(".json").read_text())["table"]
