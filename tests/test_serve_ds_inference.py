"""The deepspeed backend: a real DeepSpeed Inference server (forgelab.serve.ds_inference) on
SmolLM2-135M-Instruct (a real answer, where the tiny random model only repeats newlines), started
and stopped through the lab's server manager. Its greedy answers, plain and
streamed, equal transformers' in-process greedy generation; usage counts, stop strings, the API
key and the config-time refusal of a public host without a key."""
from __future__ import annotations

import http.client
import json
import os
import secrets
from types import SimpleNamespace

import pytest

from forgelab import config as cfg
from forgelab.runs import PROJECT_ROOT
from forgelab.serve import server
from forgelab.serve.client import Endpoint, RequestError, chat_once, delta_text, get_json, stream_events
from forgelab.serve.config import ServeConfig

CONFIG = PROJECT_ROOT / "configs" / "serve" / "deepspeed.yaml"
QUESTION = [{"role": "user", "content": "Name a colour."}]


def load(*overrides: str) -> ServeConfig:
    return cfg.load(ServeConfig, [CONFIG], list(overrides))


@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv("FORGELAB_API_KEY", raising=False)


def test_public_host_without_key_is_refused_before_start(no_key_env):
    conf = load("host=0.0.0.0", f"port={server.free_port()}", "name=test-ds-public")
    with pytest.raises(cfg.ConfigError, match="no API key"):
        server.start(conf, progress=False)
    assert server.load_state("test-ds-public") is None  # refused before anything ran
    load("host=0.0.0.0", "api_key=s3cret").check_security()


def test_command_keeps_the_key_off_the_command_line(no_key_env):
    cmd, env = server.build_command(load("api_key=s3cret", "deepspeed.kernel_inject=true", "deepspeed.dtype=bf16"))
    assert cmd[1:3] == ["-m", "forgelab.serve.ds_inference"] and "s3cret" not in " ".join(cmd)
    assert env["FORGELAB_SERVE_API_KEY"] == "s3cret"
    assert "--kernel-inject" in cmd and cmd[cmd.index("--dtype") + 1] == "bf16"
    assert cmd[cmd.index("--served-model-name") + 1] == server.request_model_name(load())
    with pytest.raises(cfg.ConfigError, match="deepspeed.tensor_parallel_size"):
        load("deepspeed.tensor_parallel_size=2")


@pytest.fixture(scope="module")
def served(smollm2_dir):
    """The server with an API key from $FORGELAB_API_KEY, and the in-process reference model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    saved = os.environ.get("FORGELAB_API_KEY")
    os.environ["FORGELAB_API_KEY"] = f"test-{secrets.token_hex(8)}"
    conf = load(f"model={smollm2_dir}", f"port={server.free_port()}", "name=test-deepspeed", "threads=1")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    try:
        with server.running(conf) as state:
            yield SimpleNamespace(state=state, ep=server.endpoint_from_state(state), tok=tok, model=model)
    finally:
        os.environ.pop("FORGELAB_API_KEY") if saved is None else os.environ.update(FORGELAB_API_KEY=saved)


def reference(s, max_new_tokens: int) -> tuple[list[int], list[int], str]:
    """Prompt ids, generated ids and text of transformers' own greedy generation."""
    enc = s.tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = s.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=s.tok.pad_token_id)
    prompt = enc["input_ids"][0].tolist()
    new = out[0][len(prompt):].tolist()
    return prompt, new, s.tok.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_models_lists_the_name_requests_carry(served):
    assert served.state["backend"] == "deepspeed" and served.state["auth"]
    assert [m["id"] for m in get_json(served.ep, "models")["data"]] == [served.state["request_model"]]
    assert "inference engine ready" in (PROJECT_ROOT / served.state["log"]).read_text()


@pytest.mark.slow
def test_greedy_chat_equals_in_process_generation(served):
    prompt, new, text = reference(served, 6)
    r = chat_once(served.ep, QUESTION, max_tokens=6, temperature=0.0)
    assert r["choices"][0]["message"] == {"role": "assistant", "content": text} and text
    assert r["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(new),
                          "total_tokens": len(prompt) + len(new)}
    assert r["choices"][0]["finish_reason"] == ("stop" if new[-1] == served.tok.eos_token_id else "length")


@pytest.mark.slow
def test_streamed_greedy_chat_equals_in_process_generation(served):
    prompt, new, text = reference(served, 8)
    body = {"model": served.ep.model, "messages": QUESTION, "max_tokens": 8, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    events = [c for _, c in stream_events(served.ep, "chat/completions", body)]
    pieces = [delta_text(c) for c in events if delta_text(c)]
    assert "".join(pieces) == text and len(pieces) >= 2  # token by token, not one block
    assert events[-1]["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(new),
                                   "total_tokens": len(prompt) + len(new)}
    conn = http.client.HTTPConnection(served.state["host"], served.state["port"], timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), served.ep.headers())
    assert conn.getresponse().read().decode().endswith("data: [DONE]\n\n")


@pytest.mark.slow
def test_stop_string_and_ignore_eos(served):
    _, new, text = reference(served, 8)
    stop = text[len(served.tok.decode(new[:3], skip_special_tokens=True)):][:3]
    r = chat_once(served.ep, QUESTION, max_tokens=8, temperature=0.0, stop=[stop])
    assert r["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": text[:text.find(stop)]},
                               "finish_reason": "stop"}
    r = chat_once(served.ep, QUESTION, max_tokens=5, temperature=0.7, seed=1, ignore_eos=True)
    assert r["usage"]["completion_tokens"] == 5
    again = chat_once(served.ep, QUESTION, max_tokens=5, temperature=0.7, seed=1, ignore_eos=True)
    assert again["choices"][0]["message"] == r["choices"][0]["message"]  # seeded sampling repeats


@pytest.mark.slow
def test_api_key_is_required(served):
    for key in ("", "wrong-key"):
        with pytest.raises(RequestError) as e:
            chat_once(Endpoint(served.ep.base_url, served.ep.model, api_key=key), QUESTION, max_tokens=2)
        assert e.value.status == 401
    secret = os.environ["FORGELAB_API_KEY"]
    assert secret not in (PROJECT_ROOT / served.state["log"]).read_text()
    assert secret not in json.dumps(server.load_state(served.state["name"]))


@pytest.mark.slow
def test_stop_ends_the_server(served):  # last: the module's server is gone afterwards
    assert server.stop(served.state["name"]) == "stopped"
    assert not server.is_alive(served.state)
    with pytest.raises(RequestError) as e:
        get_json(served.ep, "/health", timeout=5)
    assert e.value.kind == "connection"
