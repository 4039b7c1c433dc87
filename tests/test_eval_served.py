"""Served generation in the eval stage: the math task through a server the stage starts for each
model (vLLM from .venv-vllm, `transformers serve` with continuous batching) gives the same
prompts, answers and token counts as the in-process path, and the server is gone afterwards."""
from __future__ import annotations

import pytest

from forgelab import config as cfg
from forgelab.eval.config import EvalConfig
from forgelab.eval.runner import run_eval
from forgelab.runs import PROJECT_ROOT, Run, read_json
from forgelab.serve import server

pytestmark = pytest.mark.slow
FIELDS = ("row", "gold", "response", "pred", "correct", "prompt_tokens", "new_tokens", "stopped")


def math_run(raw_data, model_dir, root, name, *sets):
    conf = cfg.load(EvalConfig, [PROJECT_ROOT / "configs/eval/default.yaml"], [
        f"models=[{{name: tiny, path: {model_dir}}}]", "tasks=[math]",
        f"math.datasets=[{{name: asdiv, path: {raw_data['asdiv']}, format: asdiv}}]",
        "math.exclude_paths=[]", "math.limit=6", "math.max_new_tokens=12", "runtime.device=cpu",
        "runtime.batch_size=3", "generation.server_threads=2", *sets])
    with Run("eval", conf, name, runs_root=root, logs_root=root / "logs") as run:
        run_eval(conf, run, f"python scripts/09_eval.py --run-name {name}")
    s = read_json(run.summary_path)
    recs = [dict(r) for r in _read(run.dir / "predictions" / "tiny.math_asdiv.jsonl")]
    return s, [{k: r[k] for k in FIELDS} for r in recs]


def _read(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def inprocess(raw_data, tiny_model_dir, tmp_path_factory):
    return math_run(raw_data, tiny_model_dir, tmp_path_factory.mktemp("inproc"), "inproc")


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_served_math_gives_the_in_process_answers(backend, inprocess, raw_data, tiny_model_dir,
                                                 tmp_path_factory, request):
    if backend == "vllm":
        request.getfixturevalue("vllm_python")
    s_in, rec_in = inprocess
    s, rec = math_run(raw_data, tiny_model_dir, tmp_path_factory.mktemp(backend), backend,
                      f"generation.backend={backend}")
    assert s["outcome"] == "ok"
    gen = s["models"]["tiny"]["generation"]
    assert gen["backend"] == backend and gen["started_here"] and gen["url"].startswith("http://127.0.0.1:")
    assert s["models"]["tiny"]["results"]["math"]["asdiv"]["generation"] == backend
    # the same protocol: the runs merge in one report
    assert s["protocol"] == s_in["protocol"]
    assert rec == rec_in
    # a random tiny model rambles: some answers must hit the budget, or the test shows little
    assert any(not r["stopped"] and r["new_tokens"] == 12 for r in rec)
    # the server started for the run was stopped with it
    states = [server.load_state(d.name) for d in server.serve_root().iterdir() if d.name.startswith("eval-tiny-")]
    assert states and not any(server.is_alive(st) for st in states)
