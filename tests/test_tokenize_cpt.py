"""Stage 04 (CPT tokenize + pack, benchmark slice) with the real SmolLM2 tokenizer on real
corpus documents: round trip, EOS placement, meta, worker modes, the Dataset, the slice, and
the three data scripts end to end."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from forgelab import config as cfg
from forgelab.data import clean
from forgelab.data.bench_slice import BenchSliceConfig, SliceError, build_slice
from forgelab.data.cpt_dataset import CPTBlockDataset, load_blocks
from forgelab.data.tokenize_cpt import (TokenizeCPTConfig, TokenizeError, load_tokenizer, run_tokenize)
from forgelab.model.tokenizer_info import tokenizer_fingerprint
from forgelab.runs import PROJECT_ROOT, fingerprint_paths

LOG = logging.getLogger("test")


@pytest.fixture(scope="module")
def corpus(raw_data, tmp_path_factory):
    """Real documents as stage 02 writes them: KJV chapters and People's Daily paragraphs."""
    d = tmp_path_factory.mktemp("corpus")
    rows = [json.loads(x) for x in raw_data["kjv"].read_text(encoding="utf-8").splitlines()[:3000]]
    chapters: dict = {}
    for r in rows:
        chapters.setdefault((r["book"], r["chapter"]), []).append(r["text"])
    docs = [{"id": f"kjv:{i}", "source": "kjv", "lang": "en", "text": f"{b} {c}\n" + " ".join(v)}
            for i, ((b, c), v) in enumerate(chapters.items())]
    pd = raw_data["peoples_daily"].read_text(encoding="utf-8").splitlines()[:400]
    docs += [{"id": f"pd:{i}", "source": "pd", "lang": "zh",
              "text": clean.normalize("\n".join(clean.strip_pos_tags(x) for x in pd[i:i + 8]))}
             for i in range(0, len(pd), 8)]
    # a document quoting the EOS string: it must stay text, not become a separator
    docs.append({"id": "x:0", "source": "kjv", "lang": "en", "text": "The chat ends with <|im_end|> here."})
    order = np.random.default_rng(0).permutation(len(docs))
    docs = [docs[i] for i in order]
    train = d / "train.jsonl"
    train.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in docs), encoding="utf-8")
    held = d / "heldout.jsonl"
    held.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in docs[:5]), encoding="utf-8")
    return {"train": train, "heldout": held, "docs": docs}


def tok_conf(smollm2_dir, corpus, out, **over):
    base = {"tokenizer": str(smollm2_dir), "inputs": {"train": str(corpus["train"]),
                                                       "heldout": str(corpus["heldout"])},
            "out_dir": str(out), "seq_len": 128, "batch_docs": 16, "num_workers": 2, "workers": "thread"}
    base.update(over)
    return cfg.build(TokenizeCPTConfig, base)


@pytest.fixture(scope="module")
def packed(smollm2_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    metas = run_tokenize(tok_conf(smollm2_dir, corpus, out), LOG)
    return out, metas


def test_blocks_decode_back_to_the_documents_with_eos_between(packed, corpus, smollm2_dir):
    out, metas = packed
    blocks, meta = load_blocks(out / "train")
    assert blocks.dtype == np.int32 and blocks.shape == (meta["n_blocks"], 128)
    flat = np.asarray(blocks).reshape(-1)
    eos = meta["eos_token_id"]
    tok = load_tokenizer(smollm2_dir)
    assert eos == tok.token_to_id("<|im_end|>") == 2
    docs = [d["text"] for d in corpus["docs"]]
    cuts = np.flatnonzero(flat == eos)
    assert len(cuts) == len(docs) - 1 or len(cuts) == len(docs)  # the last one may sit in the dropped tail
    start = 0
    for i, c in enumerate(cuts):
        assert tok.decode(flat[start:c].tolist(), skip_special_tokens=False) == docs[i]
        start = c + 1
    # the dropped tail is exactly the rest of the stream
    total = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in docs)
    assert meta["n_input_tokens"] == total == meta["n_tokens"] + meta["dropped_tail_tokens"]
    assert 0 <= meta["dropped_tail_tokens"] < 128


def test_meta_fields(packed, corpus, smollm2_dir):
    out, metas = packed
    for split in ("train", "heldout"):
        meta = json.loads((out / split / "meta.json").read_text())
        for key in ("seq_len", "n_blocks", "n_tokens", "dropped_tail_tokens", "n_documents", "eos_token_id",
                    "tokenizer_path", "tokenizer_fingerprint", "data_fingerprint", "source"):
            assert key in meta, key
        assert meta == metas[split]
        assert meta["seq_len"] == 128 and meta["n_tokens"] == meta["n_blocks"] * 128
        assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(smollm2_dir)
        assert meta["data_fingerprint"] == fingerprint_paths([corpus[split]])
        assert meta["source"] == str(corpus[split])
    train = metas["train"]
    assert train["n_documents"] == len(corpus["docs"])
    assert sum(train["tokens_by_source"].values()) == train["n_input_tokens"]
    assert set(train["tokens_by_source"]) == {"kjv", "pd"}
    assert metas["heldout"]["n_documents"] == 5


def test_worker_modes_give_identical_blocks(packed, corpus, smollm2_dir, tmp_path):
    out, _ = packed
    ref = np.load(out / "train" / "blocks.npy")
    for i, (n, kind) in enumerate([(0, "thread"), (2, "process")]):
        conf = tok_conf(smollm2_dir, corpus, tmp_path / str(i), num_workers=n, workers=kind,
                        inputs={"train": str(corpus["train"])})
        run_tokenize(conf, LOG)
        assert np.array_equal(np.load(tmp_path / str(i) / "train" / "blocks.npy"), ref), (n, kind)


def test_dataset_items_and_loader(packed):
    out, metas = packed
    ds = CPTBlockDataset(out / "train")
    assert len(ds) == metas["train"]["n_blocks"] and ds.meta == metas["train"]
    item = ds[3]
    assert set(item) == {"input_ids", "labels"}
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (128,)
    assert torch.equal(item["input_ids"], item["labels"])
    assert item["input_ids"].tolist() == np.load(out / "train" / "blocks.npy")[3].tolist()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["input_ids"].shape == (4, 128)


def test_dataset_refuses_a_meta_that_does_not_match(packed, tmp_path):
    out, _ = packed
    d = tmp_path / "broken"
    d.mkdir()
    (d / "blocks.npy").write_bytes((out / "train" / "blocks.npy").read_bytes())
    meta = json.loads((out / "train" / "meta.json").read_text())
    meta["seq_len"] = 256
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match meta.json"):
        CPTBlockDataset(d)
    with pytest.raises(FileNotFoundError, match="not a CPT block directory"):
        CPTBlockDataset(tmp_path)


def test_bad_input_line_is_named(smollm2_dir, corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = corpus["train"].read_text(encoding="utf-8").splitlines()[:3]
    bad.write_text("\n".join(lines + ['{"id": "y", "text": 5}']) + "\n", encoding="utf-8")
    conf = tok_conf(smollm2_dir, corpus, tmp_path / "o", inputs={"train": str(bad)})
    with pytest.raises(TokenizeError, match=rf"{bad}:4: no string field 'text'"):
        run_tokenize(conf, LOG)
    with pytest.raises(cfg.ConfigError, match="not in the tokenizer's vocabulary"):
        run_tokenize(tok_conf(smollm2_dir, corpus, tmp_path / "o", eos_token="<|nope|>"), LOG)


def test_bench_slice_is_deterministic(packed, tmp_path):
    out, metas = packed

    def slice_conf(name, seed, n=8):
        return cfg.build(BenchSliceConfig, {
            "source_dir": str(out / "train"), "out_dir": str(tmp_path / name / "bench"),
            "summary_path": str(tmp_path / name / "bench_summary.json"),
            "indices_path": str(tmp_path / name / "bench_indices.json"), "n_blocks": n, "seed": seed})

    s1, s2, s3 = (build_slice(slice_conf(n, seed), LOG) for n, seed in (("a", 5), ("b", 5), ("c", 6)))
    ia, ib, ic = (json.loads((tmp_path / n / "bench_indices.json").read_text())["indices"] for n in "abc")
    assert ia == ib != ic and ia == sorted(ia) and len(set(ia)) == 8
    a = np.load(tmp_path / "a" / "bench" / "blocks.npy")
    assert (tmp_path / "a" / "bench" / "blocks.npy").read_bytes() == (tmp_path / "b" / "bench" / "blocks.npy").read_bytes()
    assert np.array_equal(a, np.load(out / "train" / "blocks.npy")[ia])
    assert s1["blocks_fingerprint"] == s2["blocks_fingerprint"] != s3["blocks_fingerprint"]
    assert s1["data_fingerprint"] == metas["train"]["data_fingerprint"]
    assert s1["tokenizer_fingerprint"] == metas["train"]["tokenizer_fingerprint"]
    ds = CPTBlockDataset(tmp_path / "a" / "bench")  # same format, same reader
    assert len(ds) == 8 and ds.meta["slice_seed"] == 5 and ds.meta["n_tokens"] == 8 * 128
    with pytest.raises(SliceError, match=f"only {metas['train']['n_blocks']}"):
        build_slice(slice_conf("d", 5, n=10_000), LOG)


@pytest.mark.slow
def test_scripts_end_to_end_on_real_sources(tmp_path):
    """02 -> 04 -> 04 slice as the main job runs them, on the real sources, outputs in tmp."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    py = [sys.executable]

    def run(*args):
        r = subprocess.run(py + list(args), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    cl, tk = tmp_path / "cleaned", tmp_path / "tok"
    run("scripts/02_build_cpt_corpus.py", "--set", f"out_dir={cl}", "--set", "mix.target=400000", "--run-name", "t")
    run("scripts/04_tokenize_cpt.py", "--set", f"out_dir={tk}", "--set", f"inputs.train={cl}/train.jsonl",
        "--set", f"inputs.heldout={cl}/heldout.jsonl", "--run-name", "t")
    run("scripts/04_build_cpt_benchmark_slice.py", "--set", f"source_dir={tk}/train",
        "--set", f"out_dir={tk}/bench", "--set", f"summary_path={tk}/bench_summary.json",
        "--set", f"indices_path={tk}/bench_indices.json", "--set", "n_blocks=64", "--run-name", "t")
    runs = PROJECT_ROOT / os.environ["FORGELAB_RUNS_DIR"]
    s = json.loads((runs / "cpt_corpus" / "t" / "summary.json").read_text())
    assert s["outcome"] == "ok" and abs(s["mix"]["achieved_ratio"]["kjv"] - 0.7) < 0.03
    assert s["sources"]["kjv"]["documents"] == 1189
    train = CPTBlockDataset(tk / "train")
    assert train.meta["seq_len"] == 256 and len(train) > 1000
    assert train.meta["n_documents"] == s["outputs"]["train"]["docs"]
    bench = json.loads((tk / "bench_summary.json").read_text())
    assert bench["n_blocks"] == 64 and bench["data_fingerprint"] == train.meta["data_fingerprint"]
    t = json.loads((runs / "tokenize_cpt" / "t" / "summary.json").read_text())
    assert t["fingerprint"]["tokenizer_fingerprint"] == train.meta["tokenizer_fingerprint"]
    # a failing input: exit 1 with the reason, and the run recorded as failed
    r = subprocess.run(py + ["scripts/04_tokenize_cpt.py", "--set", f"inputs.train={tmp_path}/none.jsonl",
                             "--set", f"out_dir={tk}2", "--run-name", "bad"],
                       cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "input not found" in r.stderr
    assert json.loads((runs / "tokenize_cpt" / "bad" / "summary.json").read_text())["outcome"] == "failed"
