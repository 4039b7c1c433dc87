"""HumanEval (the `code` task): the model completes a Python function, the problem's own tests
run against it in a sandbox (sandbox.py), pass@1 = the share of problems that pass with one
greedy sample.

Prompt (0-shot, one user turn through the model's chat template; PROMPT below, exactly):

    Complete the following Python function. Reply with the whole function, including the
    imports it needs, in a single ```python code block.

    ```python
    <the problem's prompt: imports, signature, docstring>
    ```

Code extraction from the reply: the first ```python (or ```py, ```python3) block; else the
first fenced block without a language; else the whole reply. A block cut off by the token
budget runs to the end of the reply. If the extracted code has no `def <entry point>(`, the
problem's prompt is put before it (the reply was a function body, or helpers only).

Test program: the extracted code, the problem's `test` (which defines check(candidate)) and
`check(<entry point>)`, run as one program. A problem passes when that program runs to its end.
"""
from __future__ import annotations

import gzip
import re
import time
from collections import Counter
from pathlib import Path

from ..jsonl import BadJson, loads_line
from ..runs import project_path
from . import sandbox
from .config import CodeConfig
from .data import EvalDataError, seeded_order
from .generation import InProcessGenerator, encode
from .runtime import LoadedModel

PROMPT = ("Complete the following Python function. Reply with the whole function, including the imports "
          "it needs, in a single ```python code block.\n\n```python\n{prompt}\n```")
EXTRACTION = ("first ```python/```py/```python3 block, else the first fenced block without a language, else "
              "the whole reply (a block cut off runs to the end); the problem's prompt is put before the code "
              "when it has no `def <entry_point>(`")
FIELDS = ("task_id", "prompt", "entry_point", "test")
PYTHON_TAGS = ("python", "py", "python3")
# an opening fence with an optional language tag, its code, then a closing fence on a line of
# its own or the end of the reply
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)


# ----------------------------------------------------------------------------- data

def _lines(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from enumerate(f, 1)
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise EvalDataError(f"{path}: cannot read ({e})") from None


def load_humaneval(path: str | Path) -> list[dict]:
    """Problems {task_id, prompt, entry_point, test, canonical_solution, row} in file order;
    .jsonl or .jsonl.gz; a bad line is an error naming file:line."""
    p = project_path(path)
    if not p.is_file():
        raise EvalDataError(f"code.path: no HumanEval file at {p} (stage 01 fetches it: "
                            f"python scripts/01_download_data.py --set 'only=[humaneval]')")
    problems, seen = [], set()
    for n, raw in _lines(p):
        if not raw.strip():
            continue
        try:
            r = loads_line(raw)
        except BadJson as e:
            raise EvalDataError(f"{p}:{n}: {e.reason}") from None
        if not isinstance(r, dict):
            raise EvalDataError(f"{p}:{n}: expected a JSON object")
        missing = [k for k in FIELDS if not isinstance(r.get(k), str) or not r[k]]
        if missing:
            raise EvalDataError(f"{p}:{n}: missing or empty field(s) {', '.join(missing)} (HumanEval rows need "
                                f"{', '.join(FIELDS)})")
        if r["task_id"] in seen:
            raise EvalDataError(f"{p}:{n}: task_id {r['task_id']!r} appears twice")
        seen.add(r["task_id"])
        problems.append({k: r[k] for k in FIELDS} | {"canonical_solution": r.get("canonical_solution"), "row": n})
    if not problems:
        raise EvalDataError(f"{p}: no problems")
    return problems


def limits(conf: CodeConfig) -> sandbox.Limits:
    return sandbox.Limits(timeout_s=conf.timeout_s, memory_mb=conf.memory_mb)


def prepare(conf: CodeConfig) -> dict:
    """The scored problems (all, or a seeded subset in file order) and the task's protocol;
    the sandbox's isolation is detected here, before any model loads."""
    problems = load_humaneval(conf.path)
    chosen = sorted(seeded_order(len(problems), conf.seed)[:conf.limit]) if conf.limit else range(len(problems))
    scored = [problems[i] for i in chosen]
    protocol = {"dataset": "humaneval", "path": conf.path, "problems": len(problems), "scored": len(scored),
                "limit": conf.limit, "seed": conf.seed, "task_ids": [q["task_id"] for q in scored],
                "scored_rows": [q["row"] for q in scored], "shots": 0, "max_new_tokens": conf.max_new_tokens,
                "prompt": PROMPT, "extraction": EXTRACTION, "metric": "pass@1, greedy, one sample",
                "sandbox": sandbox.describe(limits(conf)) | {"workers": conf.workers}}
    return {"problems": scored, "protocol": protocol}


# ----------------------------------------------------------------------------- prompt and code

def build_messages(problem: dict) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(prompt=problem["prompt"].rstrip())}]


def extract_code(text: str, problem: dict) -> tuple[str, dict]:
    """The code of a reply (module docstring) and how it was found."""
    blocks = _FENCE.findall(text)
    tagged = [code for tag, code in blocks if tag.lower() in PYTHON_TAGS]
    untagged = [code for tag, code in blocks if not tag]
    if tagged:
        code, source = tagged[0], "python block"
    elif untagged:
        code, source = untagged[0], "fenced block"
    else:
        code, source = text, "whole reply"
    has_def = re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(problem['entry_point'])}[ \t]*\(", code, re.M)
    if not has_def:
        code = problem["prompt"] + code
    return code, {"extracted_from": source, "prepended_prompt": not has_def}


def test_program(problem: dict, code: str) -> str:
    """The program whose clean end means the problem passed."""
    return f"{code.rstrip()}\n\n\n{problem['test'].strip()}\n\n\ncheck({problem['entry_point']})\n"


# ----------------------------------------------------------------------------- the task

def evaluate(lm: LoadedModel, conf: CodeConfig, runtime, prep: dict, generator=None) -> dict:
    """pass@1 over the prepared problems, plus one record per problem."""
    gen = generator or InProcessGenerator(lm, runtime)
    problems = prep["problems"]
    prompts = [encode(lm.tokenizer, build_messages(q)) for q in problems]
    t = time.time()
    outs = gen.generate(prompts, conf.max_new_tokens, desc="code humaneval")
    gen_seconds = time.time() - t
    records, programs = [], []
    for q, o in zip(problems, outs):
        code, how = extract_code(o["text"], q)
        programs.append(test_program(q, code))
        records.append({"task_id": q["task_id"], "row": q["row"], "response": o["text"], "code": code, **how,
                        "prompt_tokens": o["prompt_tokens"], "new_tokens": o["new_tokens"], "stopped": o["stopped"]})
    t = time.time()
    results = sandbox.run_many(programs, limits(conf), conf.workers, desc="code humaneval tests")
    test_seconds = time.time() - t
    for rec, r in zip(records, results):
        rec.update(passed=r["status"] == "passed", status=r["status"], detail=r["detail"], seconds=r["seconds"])
    n = len(records)
    passed = sum(r["passed"] for r in records)
    return {"n": n, "passed": passed, "pass_at_1": passed / n,
            "statuses": dict(Counter(r["status"] for r in records)),
            "extracted_from": dict(Counter(r["extracted_from"] for r in records)),
            "prepended_prompt": sum(r["prepended_prompt"] for r in records),
            "hit_max_new_tokens": sum(not r["stopped"] for r in records),
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in records) / n,
            "mean_new_tokens": sum(r["new_tokens"] for r in records) / n,
            "generation_seconds": round(gen_seconds, 2), "test_seconds": round(test_seconds, 2),
            "generation": gen.backend, "batch_size": gen.batch_size, "example_prompt": prompts[0].text,
            "records": records}
