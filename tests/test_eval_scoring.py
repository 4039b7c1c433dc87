"""Scoring mechanics on the tiny random Llama (SmolLM2's tokenizer): MMLU letter log-probs,
sliding-window perplexity, shared-prefix generation, and batch sizing."""
import math

import pytest
import torch

from forgelab import config as cfg
from forgelab.eval import gsm, mmlu
from forgelab.eval import perplexity as ppl
from forgelab.eval.config import EvalConfig, RuntimeConfig
from forgelab.eval.data import load_texts
from forgelab.eval.prefix import build_prefix, common_prefix_len
from forgelab.eval.runtime import Batcher, auto_batch_size, bytes_per_sequence, is_oom, load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.set_num_threads(1)
    return load_model("tiny", str(tiny_model_dir), RuntimeConfig(device="cpu", batch_size=3))


def seq_logprob(lm, ids: list[int], last: int = 0) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 (only the last `last` ones if given), from one plain
    forward pass over the whole sequence."""
    keep = last + 1 if last else 0
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids]), logits_to_keep=keep).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    off = len(ids) - lp.shape[0]  # row j of lp is position off + j
    first = len(ids) - last if last else 1
    return [lp[t - 1 - off, ids[t]].item() for t in range(first, len(ids))]


def test_mmlu_letter_scores_equal_direct_log_probs(tiny, raw_data):
    c = cfg.load(EvalConfig, [], [f"mmlu.path={raw_data['mmlu']}", "mmlu.subjects=[anatomy, virology]",
                                  "mmlu.per_subject_limit=4", "runtime.batch_size=3"])
    sel = mmlu.select(c.mmlu, 2)
    res = mmlu.evaluate(tiny, c.mmlu, c.runtime, 2, sel)
    assert res["n"] == 8 and set(res["per_subject"]) == {"anatomy", "virology"}
    tok = tiny.tokenizer
    by_row = {(r["subject"], r["row"]): r for r in res["records"]}
    for s, qs in sel["scored"].items():
        for q in qs:
            prompt = tok(mmlu.build_prompt(q, sel["pools"][s][:2]), add_special_tokens=False)["input_ids"]
            rec = by_row[(s, q["row"])]
            for k, letter in enumerate("ABCD"):
                # log p(" X" | prompt) from the full sequence prompt + " X", in one unpadded pass
                full = tok(mmlu.build_prompt(q, sel["pools"][s][:2]) + f" {letter}",
                           add_special_tokens=False)["input_ids"]
                assert full[:-1] == prompt
                direct = seq_logprob(tiny, full, last=1)[0]
                assert rec["logprobs"][k] == pytest.approx(direct, abs=1e-4)
            assert rec["pred"] == max(range(4), key=lambda k: rec["logprobs"][k])
            assert rec["correct"] == (rec["pred"] == q["answer"])
    for s, v in res["per_subject"].items():
        assert v["accuracy"] == sum(r["correct"] for r in res["records"] if r["subject"] == s) / 4
    assert res["macro_accuracy"] == pytest.approx(sum(v["accuracy"] for v in res["per_subject"].values()) / 2)


@pytest.mark.parametrize("n, length, stride", [(2, 8, 3), (10, 16, 1), (100, 16, 5), (100, 16, 15),
                                               (257, 64, 32), (1000, 128, 100)])
def test_windows_score_every_token_once(n, length, stride):
    wins = ppl.windows(n, length, stride)
    scored = []
    for w in wins:
        assert 0 <= w.begin < w.end <= n and w.end - w.begin <= length
        scored.extend(range(w.end - w.n_targets, w.end))
        if w.begin:  # every scored token after the first window has >= length - stride context
            assert (w.end - w.n_targets) - w.begin >= length - stride
    assert scored == list(range(1, n))


def test_perplexity_single_window_equals_full_forward(tiny, raw_data):
    texts, _ = load_texts(raw_data["wikitext_sample"], "text")
    tokens = ppl.token_stream(tiny, texts, "eos", 120)
    assert len(tokens) == 120
    full = seq_logprob(tiny, tokens)
    for stride in (1, 50, 199):  # a window of 200 covers the text: the stride does not matter
        r = ppl.perplexity(tiny, tokens, 200, stride, tiny_runtime())
        assert r["windows"] == 1 and r["tokens_scored"] == 119
        assert r["nll_per_token"] == pytest.approx(-sum(full) / 119, abs=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(-sum(full) / 119), rel=1e-5)


def test_sliding_perplexity_matches_direct_computation(tiny, raw_data):
    texts, _ = load_texts(raw_data["wikitext_sample"], "text")
    tokens = ppl.token_stream(tiny, texts, "eos", 90)
    L, stride = 32, 12
    r = ppl.perplexity(tiny, tokens, L, stride, tiny_runtime())
    # direct: each target scored by a forward pass over exactly the context its window gives it
    direct = []
    for w in ppl.windows(len(tokens), L, stride):
        lp = seq_logprob(tiny, tokens[w.begin:w.end])
        direct.extend(-x for x in lp[len(lp) - w.n_targets:])
    assert len(direct) == r["tokens_scored"] == 89
    assert r["nlls"] == pytest.approx(direct, abs=1e-4)
    assert r["nll_per_token"] == pytest.approx(sum(direct) / 89, abs=1e-5)
    # one end token after every document
    first = tiny.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert tokens[:len(first) + 1] == first + [tiny.tokenizer.eos_token_id]


def test_grouped_perplexity_pools_per_group_streams(tiny, raw_data):
    texts, _ = load_texts(raw_data["wikitext_sample"], "text")
    texts = texts[:40]
    groups = ["odd" if i % 2 else "even" for i in range(len(texts))]
    c = cfg.load(EvalConfig, [], ["perplexity.max_tokens=120", "perplexity.max_length=32", "perplexity.stride=16"]).perplexity
    r, records = ppl.evaluate(tiny, texts, groups, c, tiny_runtime())
    assert set(r["by_group"]) == {"even", "odd"} and r["tokens_per_group"] == 60
    total, n = 0.0, 0
    for g in ("even", "odd"):
        tokens = ppl.token_stream(tiny, [t for t, gg in zip(texts, groups) if gg == g], "eos", 60)
        alone = ppl.perplexity(tiny, tokens, 32, 16, tiny_runtime())
        assert r["by_group"][g]["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
        assert sum(x["targets"] for x in records if x["group"] == g) == alone["tokens_scored"] == 59
        assert sum(x["nll_sum"] for x in records if x["group"] == g) == pytest.approx(sum(alone["nlls"]), abs=1e-4)
        total, n = total + sum(alone["nlls"]), n + 59
    assert r["tokens_scored"] == n and r["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-6)


def tiny_runtime(batch_size=4):
    return RuntimeConfig(device="cpu", batch_size=batch_size)


def test_shared_prefix_generation_equals_plain_generate(tiny, raw_data):
    from transformers import GenerationConfig

    c = cfg.load(EvalConfig, [], [f"math.datasets=[{{name: asdiv, path: {raw_data['asdiv']}, format: asdiv}}]",
                                  "math.shots=2", "math.limit=5", "math.fewshot_paths=[]", "math.max_new_tokens=12"])
    prep = gsm.prepare(c.math, c.math.datasets[0])
    res = gsm.evaluate(tiny, c.math, c.math.datasets[0], tiny_runtime(3), prep)
    assert res["n"] == 5 and res["batch_size"] == 3
    tok = tiny.tokenizer
    gen = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=tiny.eos_ids, pad_token_id=tiny.pad_id)
    for rec, p in zip(res["records"], prep["problems"]):
        enc = tok(gsm.render_prompt(tok, gsm.build_messages(p["question"], prep["exemplars"], None)),
                  add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = tiny.model.generate(**enc, generation_config=gen)[0, enc["input_ids"].shape[1]:].tolist()
        stop = next((i for i, t in enumerate(out) if t in tiny.eos_ids), len(out))
        assert rec["response"] == tok.decode(out[:stop], skip_special_tokens=True)
        assert rec["prompt_tokens"] == enc["input_ids"].shape[1]


def test_common_prefix_and_cache(tiny):
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[7, 8, 9], [7, 8, 9]]) == 2  # one token always left to run
    pre = build_prefix(tiny, [1, 2, 3])
    assert pre.cache.get_seq_length() == 3
    assert pre.expanded(4).get_seq_length() == 3 and pre.cache.get_seq_length() == 3
    assert build_prefix(tiny, []).expanded(2) is None


def test_batcher_halves_on_out_of_memory(tiny):
    """A batch function that does real model work but fails like an allocator above 2 rows:
    the batcher halves, retries the same items and keeps the size that worked."""
    texts = ["The cat sat on the mat.", "A long road.", "Numbers: 1 2 3 4 5", "Hello", "Why?", "Fine."]
    calls = []

    def score(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [sum(seq_logprob(tiny, tiny.tokenizer(t)["input_ids"] + [tiny.pad_id])) for t in batch]

    b = Batcher(8)
    got = b.run(texts, score)
    assert calls[:3] == [6, 4, 2] and b.batch_size == 2 and b.halvings == 2
    assert got == pytest.approx([score([t])[0] for t in texts])
    b.resize(16)
    assert b.batch_size == 2  # never above a size that ran out of memory
    with pytest.raises(ValueError):  # other errors are not swallowed
        Batcher(4).run(texts, lambda batch: (_ for _ in ()).throw(ValueError("bad input")))
    with pytest.raises(torch.OutOfMemoryError):  # at batch 1 there is nothing left to halve
        Batcher(1).run(texts, lambda batch: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes. "
                               "out of memory")) and not is_oom(RuntimeError("shape mismatch"))


def test_auto_batch_size_from_memory(tiny):
    rt = RuntimeConfig(device="cpu", batch_size=0, max_batch_size=64, memory_fraction=0.5)
    need = bytes_per_sequence(tiny.model, 512, 512, 4)
    assert need > 512 * tiny.model.config.vocab_size * 4  # the logits alone
    bs = auto_batch_size(tiny, rt, 512, 512)
    assert 1 <= bs <= 64 and bs & (bs - 1) == 0
    # longer inputs never get a larger batch
    assert auto_batch_size(tiny, rt, 8192, 8192) <= bs
    assert auto_batch_size(tiny, RuntimeConfig(batch_size=5), 512, 1) == 5
