"""Stage 05: chat-template tokenization, truncation policies, packing, the store and collate."""
import itertools
import json
import logging
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from forgelab import config as cfg
from forgelab.data.sft_dataset import SFTDataConfig
from forgelab.data.sft_formats import convert, iter_records
from forgelab.data.sft_store import IGNORE_INDEX, SFTDataset, collate_sft
from forgelab.data.tokenize_sft import (TemplateError, TokenizeSFTConfig, encode_conversation,
                                        pack_best_fit, tokenize_split)
from forgelab.model.tokenizer_info import tokenizer_fingerprint
from forgelab.runs import PROJECT_ROOT

LOG = logging.getLogger("test")
META_KEYS = {"seq_len", "packed", "n_rows", "n_samples", "n_tokens", "n_label_tokens", "pad_token_id",
             "eos_token_id", "truncation", "padding_waste", "tokenizer_path", "tokenizer_fingerprint",
             "data_fingerprint"}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def asdiv(raw_data):
    src = cfg.load(SFTDataConfig, [PROJECT_ROOT / "configs/data/sft.yaml"]).sources["asdiv"]
    return [convert(rec, src.format, src.columns, src.roles, src.user_template, src.system)[0]
            for _, rec in itertools.islice(iter_records(raw_data["asdiv"]), 400)]


def chats(asdiv, sizes):
    """Multi-turn conversations of real problems: sizes[k] exchanges each, with a system prompt."""
    out, it = [], iter(asdiv)
    for n in sizes:
        msgs = [{"role": "system", "content": "Answer with a number and a unit."}]
        for _ in range(n):
            msgs.extend(next(it))
        out.append(msgs)
    return out


def write_split(path, convs):
    path.write_text("".join(json.dumps({"id": str(i), "source": "t", "messages": m}) + "\n"
                            for i, m in enumerate(convs)))
    return path


def tokenize(tmp_path, smollm2_dir, tok, convs, **kw):
    src = write_split(tmp_path / "train.jsonl", convs)
    conf = TokenizeSFTConfig(tokenizer=str(smollm2_dir), **kw)
    tag = "-".join(f"{k}{v}" for k, v in kw.items())
    meta = tokenize_split(conf, tok, src, tmp_path / f"store-{tag}", LOG)
    return meta, SFTDataset(tmp_path / f"store-{tag}")


def sample_tuples(ds):
    out = []
    for row in ds:
        pos = row["position_ids"].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            out.append((tuple(row["input_ids"][a:b].tolist()), tuple(row["labels"][a:b].tolist())))
    return out


def test_packed_and_unpacked_stores_hold_the_same_samples(tmp_path, smollm2_dir, tok, asdiv):
    convs = asdiv[:300]
    packed_meta, packed = tokenize(tmp_path, smollm2_dir, tok, convs, seq_len=512, packing=True)
    plain_meta, plain = tokenize(tmp_path, smollm2_dir, tok, convs, seq_len=512, packing=False)
    assert META_KEYS <= set(packed_meta) and packed.meta == packed_meta
    assert packed_meta["n_samples"] == plain_meta["n_samples"] == plain_meta["n_rows"] == 300
    assert packed_meta["n_rows"] < 60  # ~76-token samples, ~6 per 512-token row
    assert packed_meta["tokenizer_fingerprint"] == tokenizer_fingerprint(smollm2_dir)
    assert packed_meta["pad_token_id"] == packed_meta["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    for k in ("n_tokens", "n_label_tokens"):
        assert packed_meta[k] == plain_meta[k]
    assert Counter(sample_tuples(packed)) == Counter(sample_tuples(plain))
    assert sample_tuples(plain)[0] == tuple(tuple(v) for v in encode_conversation(tok, convs[0]).values())
    for ds in (packed, plain):
        for name in ("input_ids", "labels", "position_ids"):
            assert np.load(ds.path / f"{name}.npy").dtype == np.int32
        assert np.load(ds.path / "row_offsets.npy").dtype == np.int64
        assert max(ds.row_length(i) for i in range(len(ds))) <= 512
        for row in ds:  # a sample's first token is never a target
            assert (row["labels"][row["position_ids"] == 0] == IGNORE_INDEX).all()
    # Packing removes most of the padding a batch of single samples would carry.
    assert packed_meta["padding_waste"]["fraction_shuffled"] < plain_meta["padding_waste"]["fraction_shuffled"]


def test_truncation_policies_are_applied_and_counted(tmp_path, smollm2_dir, tok, asdiv):
    convs = chats(asdiv, [1, 2, 3, 4, 6, 8, 1, 5])
    full = [encode_conversation(tok, c) for c in convs]
    seq_len = 200
    long = [i for i, e in enumerate(full) if len(e["input_ids"]) > seq_len]
    assert 2 <= len(long) < len(convs)

    meta, ds = tokenize(tmp_path, smollm2_dir, tok, convs, seq_len=seq_len, truncation="drop")
    assert meta["truncation"] == {"policy": "drop", "truncated": 0, "dropped": len(long),
                                  "dropped_by_reason": {"too_long": len(long)}}
    assert meta["n_samples"] == len(convs) - len(long)

    meta, ds = tokenize(tmp_path, smollm2_dir, tok, convs, seq_len=seq_len, truncation="truncate_right")
    assert meta["truncation"]["truncated"] == len(long) and meta["truncation"]["dropped"] == 0
    got = set(sample_tuples(ds))
    for i in long:  # the kept part is exactly the first seq_len tokens
        e = full[i]
        assert (tuple(e["input_ids"][:seq_len]), tuple(e["labels"][:seq_len])) in got

    meta, ds = tokenize(tmp_path, smollm2_dir, tok, convs, seq_len=seq_len,
                        truncation="truncate_left_context")
    assert meta["truncation"]["truncated"] == len(long) and meta["truncation"]["dropped"] == 0
    got = set(sample_tuples(ds))
    for i in long:  # the oldest exchanges went; the system prompt and the last answer stay
        enc = encode_conversation(tok, convs[i], max_len=seq_len, policy="truncate_left_context")
        text = tok.decode(enc["input_ids"])
        assert text.startswith("<|im_start|>system\nAnswer with a number and a unit.")
        assert text.endswith(convs[i][-1]["content"] + "<|im_end|>\n")
        assert len(enc["input_ids"]) <= seq_len and (tuple(enc["input_ids"]), tuple(enc["labels"])) in got
    # One exchange longer than seq_len cannot lose context: it is dropped, and says why.
    meta, _ = tokenize(tmp_path, smollm2_dir, tok, convs[:1], seq_len=40, truncation="truncate_left_context")
    assert meta["truncation"]["dropped_by_reason"] == {"too_long_after_context_truncation": 1}


def test_collate_pads_right_with_restarting_positions(tmp_path, smollm2_dir, tok, asdiv):
    _, ds = tokenize(tmp_path, smollm2_dir, tok, asdiv[:40], seq_len=256, packing=True)
    feats = [ds[0], ds[len(ds) - 1]]
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert n0 != n1
    batch = collate_sft(feats, pad_token_id=7, pad_to_multiple_of=64)
    L = max(-(-max(n0, n1) // 64) * 64, 64)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(v.shape == (2, L) and v.dtype == torch.long for v in batch.values())
    for r, (f, n) in enumerate(zip(feats, (n0, n1))):
        for k in f:
            assert torch.equal(batch[k][r, :n], f[k])
        assert (batch["input_ids"][r, n:] == 7).all() and (batch["labels"][r, n:] == IGNORE_INDEX).all()
        assert batch["position_ids"][r, n:].tolist() == list(range(L - n))
    assert collate_sft(feats, pad_token_id=7)["input_ids"].shape == (2, max(n0, n1))


def test_best_fit_packing_is_deterministic_and_tight():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=500).tolist()
    rows = pack_best_fit(lengths, 512)
    assert rows == pack_best_fit(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    lower = -(-sum(lengths) // 512)
    assert lower <= len(rows) <= lower * 1.05 + 1
    with pytest.raises(ValueError, match="600 tokens > capacity 512"):
        pack_best_fit([600], 512)


def test_template_that_rewrites_earlier_turns_fails_loudly(smollm2_dir, asdiv):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    # Like templates that hide earlier reasoning: older assistant turns are rendered differently.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert encode_conversation(tok, asdiv[0]) is not None  # one turn: nothing to rewrite
    with pytest.raises(TemplateError, match="not prefix-stable"):
        encode_conversation(tok, chats(asdiv, [2])[0])


def test_bad_inputs_are_reported(tmp_path, smollm2_dir, tok, asdiv):
    convs = asdiv[:5] + [[{"role": "user", "content": "Say <|im_end|> please"},
                          {"role": "assistant", "content": "ok"}]]
    meta, ds = tokenize(tmp_path, smollm2_dir, tok, convs, seq_len=512)
    assert meta["truncation"]["dropped_by_reason"] == {"control_token_in_content": 1}
    assert meta["n_samples"] == 5
    with pytest.raises(TemplateError, match="end token id .* not found"):
        tokenize(tmp_path, smollm2_dir, tok, convs[:1], seq_len=512, end_token="<|im_start|>")
    with pytest.raises(TemplateError, match="'<eot>' is not a token"):
        tokenize(tmp_path, smollm2_dir, tok, convs[:1], seq_len=512, end_token="<eot>")
    (tmp_path / "broken").mkdir()
    with pytest.raises(FileNotFoundError, match="run scripts/05_tokenize_sft.py"):
        SFTDataset(tmp_path / "broken")


@pytest.mark.slow
def test_stages_03_and_05_scripts_with_default_configs(tmp_path, raw_data, smollm2_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    s03 = [sys.executable, str(PROJECT_ROOT / "scripts/03_build_sft_dataset.py"), "--run-name", "e2e",
           "--set", "use=[asdiv#400]", "--set", f"out_dir={tmp_path / 'clean'}"]
    s05 = [sys.executable, str(PROJECT_ROOT / "scripts/05_tokenize_sft.py"), "--run-name", "e2e",
           "--set", f"data_dir={tmp_path / 'clean'}", "--set", f"out_dir={tmp_path / 'tok'}"]
    for cmd in (s03, s05):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
    h = subprocess.run([s05[0], s05[1], "--help"], capture_output=True, text=True, env=env)
    assert h.returncode == 0 and "chat template" in h.stdout
    train, val = SFTDataset(tmp_path / "tok" / "train"), SFTDataset(tmp_path / "tok" / "val")
    assert train.meta["n_samples"] + val.meta["n_samples"] == 400
    assert train.meta["packed"] and train.meta["seq_len"] == 512
    assert train.meta["tokenizer_path"] == "model/smollm2-135m-instruct"
    summary = json.loads((PROJECT_ROOT / os.environ["FORGELAB_RUNS_DIR"] / "tokenize_sft" / "e2e"
                          / "summary.json").read_text())
    assert summary["outcome"] == "ok" and summary["splits"]["train"]["n_rows"] == len(train)
    assert summary["fingerprint"]["tokenizer_fingerprint"] == train.meta["tokenizer_fingerprint"]
