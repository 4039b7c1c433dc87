"""Byte-level BPE training on real English (KJV) and Chinese (People's Daily) text: loads with
AutoTokenizer, round-trips any text exactly, special tokens are one id, ChatML renders."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from forgelab import config as cfg
from forgelab.model.tokenizer_info import tokenizer_fingerprint
from forgelab.model.tokenizer_train import TokenizerTrainConfig, train_tokenizer
from forgelab.runs import PROJECT_ROOT, read_json

LOG = logging.getLogger("test_tokenizer")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _conf(raw_data, out, **kw) -> TokenizerTrainConfig:
    return cfg.build(TokenizerTrainConfig, {
        "sources": [{"path": str(raw_data["kjv"]), "format": "jsonl"},
                    {"path": str(raw_data["peoples_daily"]), "format": "pos_tagged"}],
        "vocab_size": 3000, "max_chars_per_source": 200_000, "output": str(out), **kw})


@pytest.fixture(scope="module")
def trained(raw_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    summary = train_tokenizer(_conf(raw_data, out), LOG)
    return out, summary


def test_trains_and_loads(trained):
    from transformers import AutoTokenizer
    out, s = trained
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == s["vocab_size"] == 3000
    assert s["texts"] > 1000 and s["chars"] >= 400_000 and not s["used_fallback"]
    assert s["tokenizer_fingerprint"] == tokenizer_fingerprint(out)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_round_trip_is_exact_for_any_text(trained):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(trained[0])
    texts = ["In the beginning God created the heaven and the earth.",
             "迈向充满希望的新世纪——一九九八年新年讲话",
             "  leading spaces,\ttabs\nand\r\nCRLF  ", "naïve café — 3.14159 × 2 = 6.28318",
             "emoji 🧪🚀 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "<|im_start|> inside text", ""]
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert tok.decode(ids) == t
    # BPE learned from the corpus: common words are single tokens, Chinese beats one token a byte
    assert len(tok.encode(" the", add_special_tokens=False)) == 1
    zh = "中共中央总书记、国家主席发表新年讲话"
    assert len(tok.encode(zh, add_special_tokens=False)) < len(zh.encode("utf-8")) / 2


def test_special_tokens_and_chat_template(trained):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(trained[0])
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL]
    assert ids == [0, 1, 2, 3]
    for t, i in zip(SPECIAL, ids):
        assert tok.encode(t, add_special_tokens=False) == [i]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n" \
                   "<|im_start|>assistant\n4<|im_end|>\n"
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(1) == 3 and ids.count(2) == 3  # one id per <|im_start|> / <|im_end|>


def test_fallback_when_corpus_missing(raw_data, tmp_path, caplog):
    conf = _conf(raw_data, tmp_path / "t", vocab_size=600, max_chars_per_source=50_000,
                 sources=[{"path": str(tmp_path / "missing.jsonl")}],
                 fallback_sources=[{"path": str(raw_data["kjv"]), "format": "jsonl"}])
    with caplog.at_level(logging.WARNING):
        s = train_tokenizer(conf, LOG)
    assert s["used_fallback"] and "missing.jsonl" in caplog.text
    conf = _conf(raw_data, tmp_path / "t2", sources=[{"path": str(tmp_path / "missing.jsonl")}],
                 fallback_sources=[])
    with pytest.raises(cfg.ConfigError, match="missing.jsonl"):
        train_tokenizer(conf, LOG)


def test_config_errors(raw_data, tmp_path):
    with pytest.raises(cfg.ConfigError, match="eos_token"):
        _conf(raw_data, tmp_path, eos_token="</s>")
    with pytest.raises(cfg.ConfigError, match="vocab_size"):
        _conf(raw_data, tmp_path, vocab_size=100)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text key"}\n')
    with pytest.raises(cfg.ConfigError, match="bad.jsonl:2"):
        train_tokenizer(_conf(raw_data, tmp_path / "o", sources=[{"path": str(bad)}]), LOG)


@pytest.mark.slow
def test_script_records_the_fingerprint(raw_data, tmp_path):
    out = tmp_path / "tok"
    p = subprocess.run([sys.executable, "scripts/train_tokenizer.py", "--run-name", "t1",
                        "--set", f"sources=[{{path: {raw_data['kjv']}}}]", "--set", "vocab_size=700",
                        "--set", "max_chars_per_source=60000", "--set", f"output={out}"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    s = read_json(os.path.join(os.environ["FORGELAB_RUNS_DIR"], "tokenizer", "t1", "summary.json"))
    assert s["outcome"] == "ok" and s["fingerprint"]["tokenizer_fingerprint"] == tokenizer_fingerprint(out)
    assert s["check"]["round_trip_exact"] and s["fingerprint"]["data_fingerprint"]
