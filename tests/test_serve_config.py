"""Serving config, security default, command lines and the request guard (no server needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgelab import config as cfg
from forgelab.runs import PROJECT_ROOT
from forgelab.serve.batch import BatchError, done_ids, read_inputs
from forgelab.serve.config import ServeConfig, is_loopback
from forgelab.serve.server import build_command, server_dir
from forgelab.serve.transformers_guard import check_body

CONFIGS = PROJECT_ROOT / "configs" / "serve"


def load(*overrides: str, files=("transformers.yaml",)) -> ServeConfig:
    return cfg.load(ServeConfig, [CONFIGS / f for f in files], list(overrides))


@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv("FORGELAB_API_KEY", raising=False)


def test_shipped_configs_load():
    for f in sorted(CONFIGS.glob("*.yaml")):
        conf = load(files=(f.name,))
        assert conf.host == "127.0.0.1", f"{f.name} must bind loopback by default"
        conf.check_security()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_key(host, no_key_env):
    assert is_loopback(host)
    load(f"host='{host}'").check_security()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_non_loopback_without_key_is_refused(host, no_key_env, monkeypatch):
    conf = load(f"host='{host}'")
    with pytest.raises(cfg.ConfigError, match="no API key"):
        conf.check_security()
    load(f"host='{host}'", "force_insecure=true").check_security()
    load(f"host='{host}'", "api_key=s3cret").check_security()
    monkeypatch.setenv("FORGELAB_API_KEY", "from-env")
    load(f"host='{host}'").check_security()


def test_script_refuses_public_host_without_key(no_key_env, tmp_path):
    env = dict(os.environ, FORGELAB_RUNS_DIR=str(tmp_path / "runs"), FORGELAB_LOGS_DIR=str(tmp_path / "logs"))
    r = subprocess.run(["bash", "scripts/10_serve.sh", "transformers", "--set", "host=0.0.0.0",
                        "--set", "port=18999"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no API key is set" in r.stderr and "force_insecure" in r.stderr
    assert not (tmp_path / "runs" / "serve" / "transformers" / "server.json").exists()


def test_vllm_command_line(no_key_env, tmp_path):
    adapter = tmp_path / "adapter-math"
    adapter.mkdir()
    conf = load("vllm.served_model_name=lab", f"vllm.lora_modules={{math: {adapter}}}",
                "vllm.max_lora_rank=16", "vllm.reasoning_parser=qwen3", "api_key=k1",
                "vllm.extra_args=[--seed, '7']", files=("vllm.yaml",))
    cmd, env = build_command(conf)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in ("--kv-cache-memory-bytes 134217728", "--dtype float32", "--enforce-eager",
                 "--served-model-name lab", "--host 127.0.0.1", "--max-num-seqs 32",
                 f"--enable-lora --lora-modules math={adapter}", "--max-lora-rank 16",
                 "--reasoning-parser qwen3", "--seed 7"):
        assert part in joined, part
    assert "k1" not in joined and env["VLLM_API_KEY"] == "k1"  # the key stays off the command line


def test_transformers_command_line(no_key_env):
    cmd, env = build_command(load("transformers.continuous_batching=true", "threads=1", "api_key=k2"))
    assert cmd[:3] == [sys.executable, "-m", "forgelab.serve.transformers_guard"]
    assert cmd[cmd.index("--cb-num-blocks") + 1] == "32" and "--cb-max-batch-tokens" not in cmd and cmd[cmd.index("--device") + 1] == "cpu"
    assert env["OMP_NUM_THREADS"] == "1" and env["FORGELAB_SERVE_API_KEY"] == "k2"
    plain, _ = build_command(load("transformers.guard=false"))
    assert plain[1] == "serve" and Path(plain[0]).name == "transformers"
    with pytest.raises(cfg.ConfigError, match="no API key of its own"):
        build_command(load("transformers.guard=false", "api_key=k3"))


def test_unknown_key_names_the_closest():
    with pytest.raises(cfg.ConfigError, match="did you mean 'vllm.max_model_len'"):
        load("vllm.max_model_length=4096", files=("vllm.yaml",))


@pytest.mark.parametrize("body,problem", [
    (b"{bad json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"max_tokens": 5}', "'messages' must be a non-empty list"),
    (b'{"messages": "hello"}', "'messages' must be a non-empty list"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "content must be a string"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "role must be one of"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}', "positive integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "positive integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "must be a number"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "true or false"),
])
def test_guard_rejects_malformed_bodies(body, problem):
    assert problem in check_body("/v1/chat/completions", body)


def test_guard_passes_wellformed_bodies():
    ok = {"messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                       {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
          "max_tokens": 8, "temperature": 0.5, "stream": True, "seed": 3}
    assert check_body("/v1/chat/completions", json.dumps(ok).encode()) is None
    assert check_body("/v1/completions", b'{"prompt": "x", "max_tokens": 2}') is None


def test_batch_inputs_and_torn_output(tmp_path, caplog):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}], '
                   '"max_tokens": 3}\n\n{"id": "c", "prompt": "x"}\n')
    items = read_inputs(inp)
    assert [i.id for i in items] == ["a", "line-2", "c"] and items[1].params == {"max_tokens": 3}
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n')
    with pytest.raises(BatchError, match=r"dup.jsonl:2: duplicate id '1'"):
        read_inputs(dup)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "output": "x"}\n{"id": "line-2", "outp')  # killed mid-line
    assert done_ids(out) == {"a"}
    assert out.read_text() == '{"id": "a", "output": "x"}\n'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(BatchError, match="bad.jsonl:1"):
        done_ids(bad)


def test_server_records_follow_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGELAB_RUNS_DIR", str(tmp_path / "r"))
    assert server_dir("x") == tmp_path / "r" / "serve" / "x"



def test_prompt_log_needs_the_guard(no_key_env):
    cmd, env = build_command(load("transformers.prompt_log=true", "name=logged"))
    assert cmd[2] == "forgelab.serve.transformers_guard"
    assert env["FORGELAB_SERVE_PROMPT_LOG"] == str(server_dir("logged") / "prompt_ids.jsonl")
    with pytest.raises(cfg.ConfigError, match="prompt_log needs transformers.guard: true"):
        build_command(load("transformers.prompt_log=true", "transformers.guard=false"))
