"""The GGUF exporter (forgelab.export.gguf_write): what it writes loads back in transformers with
the source model's logits and tokens, and llama.cpp tokenizes and generates like the source
model (greedy on the real SmolLM2 proves the Q/K permutation); a damaged file is refused by
check_gguf, and a failed export leaves nothing behind.

Measured on the tiny random Llama (logits |max| ~1.3), transformers reload, max |logit diff|:
F32 0, F16 3e-4, Q8_0 8e-3, Q4_0 0.11, Q4_1 0.07; the bounds below are ~3x those. On SmolLM2
(logits |max| ~32): F32 0, F16 0.04, Q8_0 1.3."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from forgelab.config import RunError
from forgelab.export import gguf_write
from forgelab.export.gguf_write import QTYPES, check_gguf, export_gguf

# max |logit diff| vs the source model allowed per type (tiny model; measured values above)
LOGIT_BOUND = {"F32": 1e-5, "F16": 2e-3, "Q8_0": 0.03, "Q4_0": 0.35, "Q4_1": 0.25}
TEXTS = {"en": "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
         "zh": "我想在apple工作，今天天气很好。你好，世界！",
         }
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?  Say it in 中文."}]


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_model_dir, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("gguf-tiny")
    return {q: (out / f"tiny-{q}.gguf", export_gguf(tiny_model_dir, out / f"tiny-{q}.gguf", q))
            for q in QTYPES}


@pytest.fixture(scope="module")
def smol_ggufs(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf-smol")
    for q in ("F32", "F16"):
        export_gguf(smollm2_dir, out / f"smol-{q}.gguf", q)
    return {q: out / f"smol-{q}.gguf" for q in ("F32", "F16")}


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=True)["input_ids"]


# --- what is written -----------------------------------------------------------------------
@pytest.mark.parametrize("qtype", QTYPES)
def test_layout_and_metadata(tiny_ggufs, tiny_model_dir, qtype):
    import gguf
    path, stats = tiny_ggufs[qtype]
    meta = check_gguf(path)
    assert meta["arch"] == "llama" and meta["chat_template"] and meta["vocab_size"] == 49152
    assert meta["tensors"] == 2 + 2 * 9 == sum(stats["tensors"].values())  # embd + final norm + 9/layer
    assert stats["bytes"] == path.stat().st_size and stats["params"] == 3219776
    r = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in types  # tied: llama.cpp and transformers reuse token_embd
    assert all(types[n] == "F32" for n in types if n.endswith("_norm.weight"))
    embd = {"F32": "F32", "F16": "F16"}.get(qtype, "Q8_0")  # Q4_x: the output matrix is Q8_0
    assert types["token_embd.weight"] == embd
    assert types["blk.0.attn_q.weight"] == qtype
    f = lambda k: r.fields[k].contents()  # noqa: E731
    conf = json.loads((tiny_model_dir / "config.json").read_text())
    assert f("general.file_type") == {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[qtype]
    assert f("general.quantization_version") == 2
    assert (f("llama.block_count"), f("llama.embedding_length"), f("llama.feed_forward_length"),
            f("llama.attention.head_count"), f("llama.attention.head_count_kv"),
            f("llama.rope.dimension_count"), f("llama.vocab_size")) == (2, 64, 128, 2, 1, 32, 49152)
    assert f("llama.rope.freq_base") == conf["rope_parameters"]["rope_theta"]
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "smollm"
    assert (f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert f("tokenizer.ggml.add_bos_token") is False and f("tokenizer.ggml.add_eos_token") is False
    ttypes = r.fields["tokenizer.ggml.token_type"].contents()
    assert ttypes[:17] == [3] * 17 and set(ttypes[17:]) == {1}  # SmolLM2's 17 special tokens: control


# --- transformers reads it back --------------------------------------------------------------
@pytest.mark.parametrize("qtype", QTYPES)
def test_transformers_logits(tiny_ggufs, tiny_model_dir, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, _ = tiny_ggufs[qtype]
    ids = torch.tensor([_ids(AutoTokenizer.from_pretrained(tiny_model_dir), TEXTS["en"])])
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (got(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= LOGIT_BOUND[qtype], f"{qtype}: max |logit diff| {diff}"


def test_transformers_tokenizer(tiny_ggufs, tiny_model_dir):
    from transformers import AutoTokenizer
    path, _ = tiny_ggufs["F32"]
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back.chat_template == hf.chat_template
    chat = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in [*TEXTS.values(), chat]:
        assert _ids(back, text) == _ids(hf, text), text
    assert back.eos_token == hf.eos_token == "<|im_end|>"


# --- llama.cpp reads it ----------------------------------------------------------------------
def test_llamacpp_tokenize(tiny_ggufs, tiny_model_dir, tmp_path, llamacpp_bin_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for i, text in enumerate([*TEXTS.values(), chat]):
        (tmp_path / f"{i}.txt").write_text(text)
        out = subprocess.run([llamacpp_bin_dir / "llama-tokenize", "-m", tiny_ggufs["F32"][0], "-f",
                              tmp_path / f"{i}.txt", "--ids", "--log-disable"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert json.loads(out.strip().splitlines()[-1]) == _ids(hf, text), text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_greedy(bin_dir: Path, gguf_path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """llama-server's greedy continuation (n tokens, EOS ignored) of each prompt (token ids)."""
    port = _free_port()
    proc = subprocess.Popen([bin_dir / "llama-server", "-m", gguf_path, "--port", str(port),
                             "-c", "512", "-t", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            assert proc.poll() is None, f"llama-server exited with {proc.returncode} on {gguf_path}"
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.25)
        out = []
        for ids in prompts:
            body = {"prompt": ids, "n_predict": n, "temperature": 0, "cache_prompt": False,
                    "ignore_eos": True, "return_tokens": True}
            req = urllib.request.Request(url + "/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            out.append(json.loads(urllib.request.urlopen(req, timeout=300).read())["tokens"])
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_llamacpp_greedy_equals_transformers(smol_ggufs, smollm2_dir, qtype, llamacpp_bin_dir):
    """The real SmolLM2: llama.cpp's greedy continuation of the GGUF equals transformers' greedy
    on the source checkpoint, token for token (a wrong Q/K permutation breaks it at once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [_ids(tok, "The history of the Roman Empire"),
               _ids(tok, tok.apply_chat_template([{"role": "user", "content": "Name three colors."}],
                                                 tokenize=False, add_generation_prompt=True))]
    with torch.no_grad():
        want = [model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False)[0, len(ids):].tolist() for ids in prompts]
    del model
    assert _server_greedy(llamacpp_bin_dir, smol_ggufs[qtype], prompts, 16) == want


# --- damage and failure ----------------------------------------------------------------------
def test_check_gguf_refuses_damage(tiny_ggufs, tmp_path):
    good = tiny_ggufs["Q8_0"][0]
    data = good.read_bytes()
    cases = {"truncated.gguf": data[: len(data) // 2],
             "cut-last-tensor.gguf": data[:-4096],
             "bad-magic.gguf": bytes([data[0] ^ 0xFF]) + data[1:],
             "bad-tensor-count.gguf": data[:8] + bytes([data[8] ^ 0x40]) + data[9:]}  # 8: tensor_count
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(RunError, match=name):
            check_gguf(tmp_path / name)
    with pytest.raises(RunError, match="no such"):
        check_gguf(tmp_path / "absent.gguf")


def test_failed_export_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import gguf
    out = tmp_path / "m.gguf"

    def half_then_fail(self, *a, **k):  # a full disk in the middle of the tensor data
        self.fout[0].write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_fail)
    with pytest.raises(OSError):
        export_gguf(tiny_model_dir, out, "Q8_0")
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"previous good file")  # a failed re-export keeps what was there
    with pytest.raises(OSError):
        export_gguf(tiny_model_dir, out, "F16")
    assert out.read_bytes() == b"previous good file" and len(list(tmp_path.iterdir())) == 1


def test_refusals(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(RunError, match="Q6_K"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "Q6_K")
    monkeypatch.setattr(gguf_write, "PRE_TOKENIZERS", {})
    with pytest.raises(RunError, match="unknown pre-tokenizer .*hash 855059429035d75a"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "F16")
    assert list(tmp_path.iterdir()) == []
    stats = export_gguf(tiny_model_dir, tmp_path / "x.gguf", "F16", pre_tokenizer="smollm")
    assert stats["pre_tokenizer"] == "smollm"


# --- Qwen2 / Qwen3 -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_roundtrip(tiny_model_dir, tmp_path, arch):
    """Tiny random Qwen2 (qkv bias) and Qwen3 (q/k norms): F32 GGUF reloads with equal logits."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config
    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kw = {"head_dim": 128} if arch == "qwen3" else {}  # transformers reads qwen3's head_dim as 128
    conf = cls(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
               tie_word_embeddings=(arch == "qwen3"), bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(0)
    src = tmp_path / "src"
    model = AutoModelForCausalLM.from_config(conf).eval()
    with torch.no_grad():  # random biases/norms, so a dropped or misnamed tensor shows
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / f).exists():
            shutil.copy(tiny_model_dir / f, src / f)
    # AutoTokenizer gives Qwen2Tokenizer (Qwen's split regex) over SmolLM2's vocab: a pair no
    # llama.cpp hash knows, so the name is stated
    stats = export_gguf(src, tmp_path / "q.gguf", "F32", pre_tokenizer="qwen2")
    assert check_gguf(tmp_path / "q.gguf")["arch"] == arch == stats["arch"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 7042, 30]])
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max().item() < 1e-5
