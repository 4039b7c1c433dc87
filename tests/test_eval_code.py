"""The code task (HumanEval): the data file, code extraction from replies, the test program run
in the sandbox (a real problem's canonical solution passes, broken ones fail), the config, and
the eval stage end to end with the tiny model."""
import gzip
import json

import pytest

from helpers import run_eval_script

from forgelab import config as cfg
from forgelab.eval import code, paired, sandbox
from forgelab.eval.config import EvalConfig
from forgelab.eval.data import EvalDataError
from forgelab.runs import PROJECT_ROOT

PROBLEM = {"task_id": "Toy/0", "entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
           "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n'}


@pytest.fixture(scope="module")
def humaneval(raw_data):
    return code.load_humaneval(raw_data["humaneval"])


# ----------------------------------------------------------------------------- data

def test_humaneval_file(humaneval, raw_data):
    assert raw_data["humaneval"].name == "HumanEval.jsonl.gz"
    assert [q["task_id"] for q in humaneval] == [f"HumanEval/{i}" for i in range(164)]
    assert all(q["prompt"] and q["test"] and q["canonical_solution"] and "def check(" in q["test"] for q in humaneval)
    assert humaneval[0]["entry_point"] == "has_close_elements" and humaneval[0]["row"] == 1


def test_bad_lines_name_file_and_line(tmp_path):
    good = json.dumps(PROBLEM)
    gz = tmp_path / "bad.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(good + "\n{not json\n")
    with pytest.raises(EvalDataError, match=r"bad\.jsonl\.gz:2: invalid JSON"):
        code.load_humaneval(gz)
    plain = tmp_path / "missing.jsonl"
    plain.write_text(good + "\n" + json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(EvalDataError, match=r"missing\.jsonl:2: missing or empty field\(s\) entry_point, test"):
        code.load_humaneval(plain)
    twice = tmp_path / "twice.jsonl"
    twice.write_text(good + "\n" + good + "\n")
    with pytest.raises(EvalDataError, match="twice.jsonl:2: task_id 'Toy/0' appears twice"):
        code.load_humaneval(twice)
    with pytest.raises(EvalDataError, match="code.path: no HumanEval file"):
        code.load_humaneval(tmp_path / "absent.jsonl.gz")


# ----------------------------------------------------------------------------- extraction

FULL = "def add(a: int, b: int) -> int:\n    return a + b\n"


@pytest.mark.parametrize("reply, expected, source, prepended", [
    (f"Here it is:\n```python\n{FULL}```\nIt adds.", FULL, "python block", False),
    (f"```py\n{FULL}```", FULL, "python block", False),
    (f"```Python3\n{FULL}```", FULL, "python block", False),
    (f"```\n{FULL}```", FULL, "fenced block", False),
    (f"```text\nnotes\n```\n```\n{FULL}```", FULL, "fenced block", False),
    (f"```\nprint(1)\n```\n```python\n{FULL}```", FULL, "python block", False),  # a python block wins
    (f"```python\n{FULL}```\n```python\nprint(add(1, 2))\n```", FULL, "python block", False),  # the first
    (f"```python\n{FULL}    # cut off by the token bud", FULL + "    # cut off by the token bud",
     "python block", False),
    (FULL, FULL, "whole reply", False),
    ("```python\n    return a + b\n```", PROBLEM["prompt"] + "    return a + b\n", "python block", True),
    ("```python\ndef helper(x):\n    return x\n```", PROBLEM["prompt"] + "def helper(x):\n    return x\n",
     "python block", True),
    ("```python\ndef adder(a, b):\n    return a + b\n```", PROBLEM["prompt"] + "def adder(a, b):\n    return a + b\n",
     "python block", True),  # another name is not the entry point
])
def test_extract_code(reply, expected, source, prepended):
    got, how = code.extract_code(reply, PROBLEM)
    assert got == expected and how == {"extracted_from": source, "prepended_prompt": prepended}


def test_prompt_wording():
    msgs = code.build_messages(PROBLEM)
    assert msgs == [{"role": "user", "content":
                     "Complete the following Python function. Reply with the whole function, including the "
                     "imports it needs, in a single ```python code block.\n\n```python\n"
                     'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n```'}]


# ----------------------------------------------------------------------------- test programs

def test_canonical_solution_passes_and_broken_ones_fail(humaneval):
    lim = code.limits(cfg.load(EvalConfig, []).code)
    q = next(p for p in humaneval if p["task_id"] == "HumanEval/2")  # truncate_number
    good = code.test_program(q, q["prompt"] + q["canonical_solution"])
    assert good.endswith("\n\ncheck(truncate_number)\n")
    wrong = code.test_program(q, q["prompt"] + "    return number\n")
    crash = code.test_program(q, q["prompt"] + "    return number.nothing\n")
    hang = code.test_program(q, q["prompt"] + "    while True:\n        pass\n")
    res = sandbox.run_many([good, wrong, crash, hang], sandbox.Limits(timeout_s=2, memory_mb=lim.memory_mb), workers=2)
    assert [r["status"] for r in res] == ["passed", "failed", "failed", "timeout"]
    assert res[1]["detail"].startswith("AssertionError") and "AttributeError" in res[2]["detail"]
    # a reply that is only the body: the prompt goes first and the result runs
    body, how = code.extract_code("```python\n" + q["canonical_solution"] + "```", q)
    assert how["prepended_prompt"] and sandbox.run(code.test_program(q, body), lim)["status"] == "passed"


def test_config_keys():
    base = cfg.load(EvalConfig, [PROJECT_ROOT / "configs/eval/default.yaml"])
    assert "code" not in base.tasks  # the main job's time is budgeted without it
    c = cfg.load(EvalConfig, [PROJECT_ROOT / "configs/eval/default.yaml", PROJECT_ROOT / "configs/eval/code.yaml"])
    assert c.tasks == ["code"] and c.code.limit == 0 and c.code.max_new_tokens == 384
    assert (c.code.timeout_s, c.code.memory_mb, c.code.workers) == (10, 1024, 2)
    assert c.code.path == "data/raw/humaneval/HumanEval.jsonl.gz"
    with pytest.raises(cfg.ConfigError, match="code.timeout_s must be > 0"):
        cfg.load(EvalConfig, [], ["code.timeout_s=0"])
    with pytest.raises(cfg.ConfigError, match="code.limit must be >= 0"):
        cfg.load(EvalConfig, [], ["code.limit=-1"])


def test_prepare_draws_a_seeded_subset(raw_data):
    conf = cfg.load(EvalConfig, [], [f"code.path={raw_data['humaneval']}", "code.limit=5"]).code
    p = code.prepare(conf)
    ids = p["protocol"]["task_ids"]
    assert len(ids) == 5 and ids == [q["task_id"] for q in p["problems"]]
    assert code.prepare(conf)["protocol"]["task_ids"] == ids  # seeded
    rows = p["protocol"]["scored_rows"]
    assert rows == sorted(rows) and p["protocol"]["problems"] == 164
    assert p["protocol"]["sandbox"]["isolation"] == sandbox.isolation() and p["protocol"]["sandbox"]["workers"] == 2


# ----------------------------------------------------------------------------- the stage

def test_eval_stage_runs_code(tiny_model_dir, raw_data, tmp_path):
    report_md = tmp_path / "eval_code.md"
    run_dir, s = run_eval_script(
        "code-tiny", report_md, f"models=[{{name: tiny, path: {tiny_model_dir}}}]",
        f"code.path={raw_data['humaneval']}", "code.limit=3", "code.max_new_tokens=24", "runtime.device=cpu",
        configs=("configs/eval/default.yaml", "configs/eval/code.yaml"))
    prot = s["protocol"]["code"]
    assert list(s["protocol"]) == ["code"] and prot["scored"] == 3 and prot["problems"] == 164
    assert len(prot["task_ids"]) == 3 and prot["data_fingerprint"] and prot["prompt"] == code.PROMPT
    assert prot["sandbox"]["isolation"]["mode"] == sandbox.isolation()["mode"]
    assert prot["sandbox"]["limits"]["timeout_s"] == 10 and prot["sandbox"]["limits"]["memory_mb"] == 1024
    r = s["models"]["tiny"]["results"]["code"]["humaneval"]
    recs = [json.loads(x) for x in (run_dir / "predictions" / "tiny.code_humaneval.jsonl").read_text().splitlines()]
    assert [x["task_id"] for x in recs] == prot["task_ids"]
    assert all(isinstance(x["passed"], bool) and x["passed"] == (x["status"] == "passed") for x in recs)
    assert r["n"] == 3 and r["passed"] == sum(x["passed"] for x in recs) and r["pass_at_1"] == r["passed"] / 3
    assert sum(r["statuses"].values()) == 3 and sum(r["extracted_from"].values()) == 3
    assert r["mean_new_tokens"] <= 24 and s["models"]["tiny"]["generation"]["backend"] == "inprocess"
    # the paired comparison finds the predictions file by the summary
    _, tasks, expected = paired.model_tasks("tiny", {"run": str(run_dir / "summary.json"),
                                                     "results": s["models"]["tiny"]["results"]})
    assert "code_humaneval" in expected and paired.load_predictions(
        run_dir / "predictions" / "tiny.code_humaneval.jsonl")["key"] == ("task_id",)
    md = report_md.read_text()
    line = next(x for x in md.splitlines() if x.startswith("| code humaneval, pass@1"))
    assert "(3 problems, 0-shot, greedy)" in line and f"{100 * r['pass_at_1']:.1f}%" in line
    assert "- Code (humaneval): " in md and sandbox.isolation()["mode"] in md
    assert "| code |" in next(x for x in md.splitlines() if x.startswith("| model | path"))
