"""The chain end to end, on real stage outputs: each numbered script runs as a subprocess the
way a user runs it, and each stage reads the files the previous one wrote (never a helper-built
dataset):

  02 CPT corpus -> 04 tokenize CPT --------> CPT (scripts/train/sanity.sh, tiny model)
  03 SFT dataset -> 05 tokenize SFT -------> SFT LoRA (sanity.sh, from the CPT model)
                                          -> 08 merge -> 09 eval (CPT vs merged) -> 12 report

The real data comes from stage 01's sources (the raw_data fixture), the model is the tiny random
Llama with SmolLM2's tokenizer (tiny_model_dir). Every output, run records included, goes to a
tmp dir of this module. The tests assert on what crosses each stage boundary (file formats,
fingerprints, sequence lengths, counts), so a format change in any one stage breaks them.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from forgelab.model.tokenizer_info import tokenizer_fingerprint
from forgelab.runs import PROJECT_ROOT, display_path, fingerprint_paths, sha256_file

pytestmark = pytest.mark.slow

PY = sys.executable
CPT_SEQ, SFT_SEQ = 64, 256          # asked of stages 04 and 05; training must take them from the data
CPT_BATCH, SFT_BATCH = 4, 2         # micro-batch sizes (grad_accum 1): sanity.sh runs 4 steps
STEPS = 4
SFT_RECORDS, MATH_ITEMS, MMLU_ITEMS = 200, 3, 3
IGNORE = -100


def _stage(env: dict, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """One stage as a user runs it: a script (or a bash launcher) from the project root."""
    cmd = ["bash", *args] if args[0].endswith(".sh") else [PY, *args]
    r = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == expect, f"{' '.join(cmd)} -> {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def _sets(**kv) -> list[str]:
    return [a for k, v in kv.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def chain(raw_data, tiny_model_dir, tmp_path_factory):
    """Run 02 -> 03 -> 04 -> 05 -> CPT -> SFT LoRA -> 08 -> 09 -> 12 once; the tests read the files."""
    d = tmp_path_factory.mktemp("chain")
    runs = d / "runs"
    # run records of this chain in its own dir, so the report reads exactly these runs
    env = dict(os.environ, FORGELAB_RUNS_DIR=str(runs), FORGELAB_LOGS_DIR=str(d / "logs"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHON=PY)
    c = SimpleNamespace(dir=d, runs=runs, tiny=tiny_model_dir, cpt_clean=d / "cleaned_cpt",
                        sft_clean=d / "cleaned_sft", cpt_tok=d / "tok_cpt", sft_tok=d / "tok_sft",
                        merged=d / "merged", eval_md=d / "reports" / "eval.md", reports=d / "reports")
    c.cpt_run, c.sft_run = runs / "train" / "chain-cpt", runs / "train" / "chain-sft"

    # 02 and 03 on their default configs (the real sources under data/raw), outputs redirected
    _stage(env, "scripts/02_build_cpt_corpus.py", *_sets(out_dir=c.cpt_clean, mix__target=200000),
           "--run-name", "chain")
    _stage(env, "scripts/03_build_sft_dataset.py", *_sets(out_dir=c.sft_clean),
           "--set", f"use=[asdiv#{SFT_RECORDS}]", "--run-name", "chain")
    # 04 and 05 read 02's and 03's files, with the tiny model's tokenizer
    _stage(env, "scripts/04_tokenize_cpt.py", *_sets(
        tokenizer=c.tiny, inputs__train=c.cpt_clean / "train.jsonl", inputs__heldout=c.cpt_clean / "heldout.jsonl",
        out_dir=c.cpt_tok, seq_len=CPT_SEQ, num_workers=0), "--run-name", "chain")
    _stage(env, "scripts/05_tokenize_sft.py", *_sets(
        tokenizer=c.tiny, data_dir=c.sft_clean, out_dir=c.sft_tok, seq_len=SFT_SEQ), "--run-name", "chain")
    # CPT of the tiny model on 04's blocks (held-out loss on 04's heldout split), then SFT LoRA of
    # the CPT model on 05's train store
    _stage(env, "scripts/train/sanity.sh", "single", "--task", "cpt", *_sets(
        model__path=c.tiny, data__train=c.cpt_tok / "train", data__eval=c.cpt_tok / "heldout",
        eval__every_steps=2, eval__max_items=8, steps__micro_batch_size=CPT_BATCH, steps__grad_accum=1),
        "--run-name", "chain-cpt")
    _stage(env, "scripts/train/sanity.sh", "single", "--task", "sft_lora", *_sets(
        model__path=c.cpt_run / "final", data__train=c.sft_tok / "train", steps__micro_batch_size=SFT_BATCH,
        steps__grad_accum=1, lora__r=4, lora__alpha=8, optim__lr=1e-2), "--run-name", "chain-sft")
    # 08: the adapter's base is found through its adapter_config.json (the CPT model)
    _stage(env, "scripts/08_merge_lora.py", *_sets(adapter=c.sft_run / "final", output=c.merged),
           "--run-name", "chain")
    # 09: the CPT model against the merged SFT model; perplexity on 02's held-out documents, math
    # problems of 03's train split left out
    _stage(env, "scripts/09_eval.py", "--run-name", "chain-eval", "--report", str(c.eval_md),
           "--set", f"models=[{{name: cpt, path: {c.cpt_run / 'final'}}}, {{name: sft, path: {c.merged}}}]",
           *_sets(perplexity__path=c.cpt_clean / "heldout.jsonl", perplexity__fallback_path="null",
                  perplexity__max_tokens=256, perplexity__max_length=64, perplexity__stride=48,
                  math__limit=MATH_ITEMS, math__max_new_tokens=8, mmlu__per_subject_limit=MMLU_ITEMS,
                  runtime__device="cpu"),
           "--set", f"math.exclude_paths=[{c.sft_clean / 'train.jsonl'}]",
           "--set", "mmlu.subjects=[world_religions]", "--set", "mmlu.shots=[0]")
    # 12: the two training runs named together are refused (their protocols differ), then compared
    # with the difference stated
    report = ["scripts/12_report.py", "benchmark", "--runs-root", str(runs / "train"),
              "--runs", "chain-cpt", "chain-sft", "--out", str(c.reports), "--prefix", "chain"]
    c.refused = _stage(env, *report, expect=2)
    _stage(env, *report, "--allow-mixed-protocols")

    c.s02 = _json(runs / "cpt_corpus" / "chain" / "summary.json")
    c.s03 = _json(runs / "sft_data" / "chain" / "summary.json")
    c.s04 = _json(runs / "tokenize_cpt" / "chain" / "summary.json")
    c.s05 = _json(runs / "tokenize_sft" / "chain" / "summary.json")
    c.cpt_meta = _json(c.cpt_tok / "train" / "meta.json")
    c.sft_meta = _json(c.sft_tok / "train" / "meta.json")
    c.cpt = _json(c.cpt_run / "train_summary.json")
    c.sft = _json(c.sft_run / "train_summary.json")
    c.merge = _json(runs / "merge" / "chain" / "summary.json")
    c.eval = _json(runs / "eval" / "chain-eval" / "summary.json")
    c.tok_fp = tokenizer_fingerprint(tiny_model_dir)
    return c


def test_every_stage_recorded_ok(chain):
    for s in (chain.s02, chain.s03, chain.s04, chain.s05, chain.cpt, chain.sft, chain.merge, chain.eval):
        assert s["outcome"] == "ok", s.get("stage")


def test_02_corpus_into_04_blocks(chain):
    train_jsonl = chain.cpt_clean / "train.jsonl"
    docs = _jsonl(train_jsonl)
    assert len(docs) == chain.s02["outputs"]["train"]["docs"] > 0
    for split, jsonl in (("train", train_jsonl), ("heldout", chain.cpt_clean / "heldout.jsonl")):
        meta = _json(chain.cpt_tok / split / "meta.json")
        assert meta["format"] == "forgelab-cpt-blocks" and meta["source"] == str(jsonl)
        # 04 fingerprints the very file 02 wrote, and counts its documents and sources
        assert meta["data_fingerprint"] == fingerprint_paths([jsonl])
        assert meta["n_documents"] == chain.s02["outputs"][split]["docs"]
        assert set(meta["tokens_by_source"]) == {r["source"] for r in _jsonl(jsonl)}
        assert meta["seq_len"] == CPT_SEQ and meta["tokenizer_fingerprint"] == chain.tok_fp
        blocks = np.load(chain.cpt_tok / split / "blocks.npy")
        assert blocks.dtype == np.int32 and blocks.shape == (meta["n_blocks"], CPT_SEQ)
        assert (blocks == meta["eos_token_id"]).any()  # EOS between documents
    assert chain.s04["fingerprint"]["tokenizer_fingerprint"] == chain.tok_fp


def test_03_conversations_into_05_store(chain):
    """05's arrays: position ids restart at 0 at each sample, labels only on the assistant turn
    (its text + end token, exactly 03's assistant messages), whole samples within seq_len rows."""
    from transformers import AutoTokenizer

    train_jsonl = chain.sft_clean / "train.jsonl"
    convs = _jsonl(train_jsonl)
    assert len(convs) == chain.s03["train"] and chain.s03["train"] + chain.s03["val"] == SFT_RECORDS
    meta = chain.sft_meta
    assert meta["data_fingerprint"] == fingerprint_paths([train_jsonl]) and meta["source_file"] == display_path(train_jsonl)
    assert meta["tokenizer_fingerprint"] == chain.tok_fp and meta["seq_len"] == SFT_SEQ and meta["packed"]
    assert meta["n_samples"] + meta["truncation"]["dropped"] == len(convs) == meta["conversations_read"]

    st = chain.sft_tok / "train"
    ids, labels, pos = (np.load(st / f"{n}.npy") for n in ("input_ids", "labels", "position_ids"))
    offsets = np.load(st / "row_offsets.npy")
    assert ids.dtype == labels.dtype == pos.dtype == np.int32 and offsets.dtype == np.int64
    assert len(ids) == len(labels) == len(pos) == offsets[-1] == meta["n_tokens"]
    assert len(offsets) == meta["n_rows"] + 1 and (np.diff(offsets) <= SFT_SEQ).all()
    labelled = labels != IGNORE
    assert int(labelled.sum()) == meta["n_label_tokens"]
    assert (labels[labelled] == ids[labelled]).all()  # a label is the token itself (the model shifts)

    # samples: a row starts a sample, a sample starts at position 0 and counts up by one
    starts = np.flatnonzero(pos == 0)
    assert len(starts) == meta["n_samples"] and set(offsets[:-1].tolist()) <= set(starts.tolist())
    inside = np.ones(len(pos), dtype=bool)
    inside[starts] = False
    assert (pos[inside] == pos[np.flatnonzero(inside) - 1] + 1).all()
    assert meta["n_samples"] > meta["n_rows"]  # packing put several samples in a row

    tok = AutoTokenizer.from_pretrained(chain.tiny)
    bounds = list(starts) + [len(ids)]
    spans, headers = Counter(), set()
    for a, b in zip(bounds, bounds[1:]):
        m = labelled[a:b]
        j = np.flatnonzero(m)
        assert len(j) and j[0] > 0 and j[-1] - j[0] + 1 == len(j)  # one contiguous span, not the first token
        assert ids[a + j[-1]] == meta["end_token_id"]
        spans[tok.decode(ids[a:b][m])] += 1
        headers.add(tok.decode(ids[a:a + j[0]])[-len("<|im_start|>assistant\n"):])
    assert headers == {"<|im_start|>assistant\n"}
    want = Counter(m["content"] + "<|im_end|>" for r in convs for m in r["messages"] if m["role"] == "assistant")
    assert spans == want


def test_04_and_05_into_training(chain):
    """Both runs trained on the stage outputs as written: same fingerprints, the data's seq_len,
    the steps asked, finite losses."""
    for run, meta, tok_dir, seq, batch in ((chain.cpt, chain.cpt_meta, chain.cpt_tok / "train", CPT_SEQ, CPT_BATCH),
                                           (chain.sft, chain.sft_meta, chain.sft_tok / "train", SFT_SEQ, SFT_BATCH)):
        assert run["data"]["train"] == str(tok_dir)
        assert run["data"]["data_fingerprint"] == run["fingerprint"]["data_fingerprint"] == meta["data_fingerprint"]
        assert run["data"]["tokenizer_fingerprint"] == run["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]
        assert run["seq_len"] == run["data"]["seq_len"] == meta["seq_len"] == seq
        assert run["tokens_per_step_capacity"] == batch * seq
        assert run["steps"] == run["max_steps"] == STEPS and not run["stopped_early"]
        assert math.isfinite(run["final_loss"])
    cpt_steps = _jsonl(chain.cpt_run / "metrics.jsonl")
    assert [r["step"] for r in cpt_steps] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["step_tokens"] == CPT_BATCH * CPT_SEQ for r in cpt_steps)
    assert chain.cpt["data"]["items"] == chain.cpt_meta["n_blocks"]
    assert chain.cpt["data"]["eval"] == str(chain.cpt_tok / "heldout")
    evals = _jsonl(chain.cpt_run / "eval_metrics.jsonl")
    assert [r["step"] for r in evals] == [2, 4] and all(math.isfinite(r["eval_loss"]) for r in evals)

    sft_steps = _jsonl(chain.sft_run / "metrics.jsonl")
    assert len(sft_steps) == STEPS and all(math.isfinite(r["loss"]) for r in sft_steps)
    # packed rows: the real tokens of the rows trained on, never more than the capacity
    assert chain.sft["tokens"] == sum(r["step_tokens"] for r in sft_steps) <= STEPS * SFT_BATCH * SFT_SEQ
    assert chain.sft["data"]["items"] == chain.sft_meta["n_rows"]
    assert chain.sft["sft_mode"] == "lora" and chain.sft["model"]["lora_params"] > 0
    # SFT started from the CPT run's final model, whose tokenizer is still the data's
    assert chain.sft["model"]["source"] == str(chain.cpt_run / "final") == chain.cpt["final_model"]
    assert tokenizer_fingerprint(chain.cpt_run / "final") == chain.sft_meta["tokenizer_fingerprint"]
    assert (chain.sft_run / "final" / "adapter_model.safetensors").is_file()


def test_merge_of_the_sft_adapter(chain):
    check = _json(chain.merged / "merge_check.json")
    adapter = chain.sft_run / "final"
    assert check["passed"] and check["max_abs_diff"] <= check["threshold"] == 1e-4
    assert check["adapter"] == str(adapter) and check["base_model"] == str(chain.cpt_run / "final")
    assert check["adapter_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert chain.merge["passed"] and chain.merge["output"] == str(chain.merged)
    assert chain.merge["max_abs_diff"] == check["max_abs_diff"]
    # the adapter folded into the base: the SFT run's parameters less its LoRA ones
    assert chain.merge["params"] == chain.sft["model"]["params"] - chain.sft["model"]["lora_params"]
    assert (chain.merged / "model.safetensors").is_file()
    assert tokenizer_fingerprint(chain.merged) == chain.sft_meta["tokenizer_fingerprint"]


def test_eval_of_cpt_and_merged_models(chain):
    s = chain.eval
    models = s["models"]
    assert list(models) == ["cpt", "sft"]
    assert models["sft"]["path"] == str(chain.merged) and models["cpt"]["path"] == str(chain.cpt_run / "final")
    assert models["sft"]["params"] == chain.merge["params"]
    for m in models.values():
        assert m["tokenizer_fingerprint"] == chain.cpt_meta["tokenizer_fingerprint"]
        r = m["results"]
        assert r["math"]["asdiv"]["n"] == MATH_ITEMS and 0 <= r["math"]["asdiv"]["correct"] <= MATH_ITEMS
        assert r["mmlu"]["0-shot"]["n"] == MMLU_ITEMS
        assert set(r["mmlu"]["0-shot"]["per_subject"]) == {"world_religions"}
        assert math.isfinite(r["perplexity"]["perplexity"]) and r["perplexity"]["tokens_scored"] > 0
    # perplexity on 02's held-out documents (no fallback), one stream per source
    heldout = chain.cpt_clean / "heldout.jsonl"
    p = s["protocol"]["perplexity"]
    assert p["source"] == str(heldout) and p["fell_back"] is False
    assert p["documents"] == chain.s02["outputs"]["heldout"]["docs"]
    assert p["data_fingerprint"] == fingerprint_paths([heldout])
    assert set(models["sft"]["results"]["perplexity"]["by_group"]) == {r["source"] for r in _jsonl(heldout)}
    # 03's training problems are left out of the math score
    mp = s["protocol"]["math"]["datasets"]["asdiv"]
    assert mp["exclude_paths"] == [str(chain.sft_clean / "train.jsonl")] and not mp["exclude_paths_missing"]
    assert mp["excluded_as_training_data"] > 0 and mp["scored"] == MATH_ITEMS
    # compared as the eval matches them: NFKC, case and whitespace folded
    fold = lambda t: " ".join(unicodedata.normalize("NFKC", t).casefold().split())  # noqa: E731
    trained = {fold(m["content"]) for r in _jsonl(chain.sft_clean / "train.jsonl") for m in r["messages"]
               if m["role"] == "user"}
    preds = _jsonl(chain.runs / "eval" / "chain-eval" / "predictions" / "sft.math_asdiv.jsonl")
    assert len(preds) == MATH_ITEMS and not {fold(q["question"]) for q in preds} & trained
    md = chain.eval_md.read_text(encoding="utf-8")
    assert "| metric | cpt | sft |" in md and "--run-name chain-eval" in md
    assert f"`{chain.runs / 'eval' / 'chain-eval' / 'summary.json'}`" in md


def test_report_of_the_training_runs(chain):
    fp_cpt, fp_sft = chain.cpt_meta["data_fingerprint"], chain.sft_meta["data_fingerprint"]
    # named together without --allow-mixed-protocols: refused, naming the stage 04/05 differences
    err = chain.refused.stderr
    assert "report refused" in err and fp_cpt in err and fp_sft in err
    assert f"seq_len differs: chain-cpt has {CPT_SEQ}, chain-sft has {SFT_SEQ}" in err
    md = (chain.reports / "chain_benchmark.md").read_text(encoding="utf-8")
    js = _json(chain.reports / "chain_benchmark.json")
    assert js["runs"] == [str(chain.cpt_run), str(chain.sft_run)]
    assert f"data_fingerprint differs: chain-cpt has '{fp_cpt}', chain-sft has '{fp_sft}'" in md
    for name, run in (("chain-cpt", chain.cpt), ("chain-sft", chain.sft)):
        assert f"| {name} | single | 1 | sanity |" in md  # the Runs table
        assert run["command"] in md and run["command"].endswith(f"--run-name {name}")
    assert all((chain.reports / "img" / f"chain_benchmark_native_g0_{k}.png").is_file()
               for k in ("loss", "memory", "throughput"))
