"""On-policy preference pairs: seeded in-process sampling, the pairing rule on hand-written
samples, the builder end to end on the tiny model, and resume after a kill mid-write."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from forgelab.align.pairs import (KTO, PAIRS, PROMPTS, SAMPLES, PairsConfig, PairsError, build_pairs, build_records,
                                  pair_order, problem_id)
from forgelab.config import build
from forgelab.eval.config import RuntimeConfig
from forgelab.eval.generation import InProcessGenerator, Sampling, encode
from forgelab.eval.runtime import load_model

log = logging.getLogger("test_align_pairs")

# (passage, question, answer): the first four are SFT training problems, the last is held out
PROBLEMS = [
    ("Tom has 3 apples.", "He gets 2 more. How many apples does he have?", "5 apples"),
    ("A box holds 4 pens.", "How many pens are in 2 boxes?", "8 pens"),
    ("Ann read 10 pages.", "Then she read 5. How many pages did she read?", "15 pages"),
    ("There are 7 birds.", "3 fly away. How many birds are left?", "4 birds"),
    ("Sam has 9 cards.", "He gives away 4. How many cards are left?", "5 cards"),
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model("tiny", str(tiny_model_dir), RuntimeConfig(device="cpu", dtype="float32", batch_size=4))


def test_sampling_is_seeded(lm):
    gen = InProcessGenerator(lm, RuntimeConfig(device="cpu", batch_size=4))
    prompts = [encode(lm.tokenizer, [{"role": "user", "content": f"{p} {q}"}]) for p, q, _ in PROBLEMS[:3]]
    texts = lambda s: [[o["text"] for o in outs] for outs in gen.generate(prompts, 8, sampling=s)]  # noqa: E731
    a = texts(Sampling(n=3, seed=1))
    assert len(a) == 3 and all(len(x) == 3 for x in a)
    assert a == texts(Sampling(n=3, seed=1))
    assert a != texts(Sampling(n=3, seed=2))
    assert len({t for x in a for t in x}) > 3  # a random model's samples differ from each other


def test_pair_order_covers_every_combination_once():
    for g, b in [(1, 1), (1, 3), (3, 1), (2, 3), (3, 2), (4, 4)]:
        order = pair_order(g, b)
        assert sorted(order) == [(i, j) for i in range(g) for j in range(b)]
        m = min(g, b)  # the first min(g, b) pairs use distinct texts on both sides
        assert len({x for x, _ in order[:m]}) == m and len({y for _, y in order[:m]}) == m


def _row(samples):
    return {"id": "p1", "question": "Q?", "samples": [{"text": t, "correct": c} for t, c in samples]}


def test_build_records_pairs_distinct_texts():
    row = _row([("5 apples", True), ("6 apples", False), (" 5 apples ", True), ("7", False), ("", False),
                ("The answer is 5", True)])
    pairs, kto = build_records(row, max_pairs=3)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("5 apples", "6 apples"), ("The answer is 5", "7"), ("5 apples", "7")]
    assert all(p["prompt"] == [{"role": "user", "content": "Q?"}] and p["source"] == "onpolicy" for p in pairs)
    # distinct non-empty texts, first label kept
    assert [(k["completion"][0]["content"], k["label"]) for k in kto] == [
        ("5 apples", True), ("6 apples", False), ("7", False), ("The answer is 5", True)]
    assert len({p["id"] for p in pairs} | {k["id"] for k in kto}) == len(pairs) + len(kto)


def test_build_records_gold_only_when_asked_and_needed():
    wrong = _row([("6", False), ("7", False)])
    assert build_records(wrong, 4) [0] == []
    pairs, kto = build_records(wrong, 4, gold_as_chosen="5 apples")
    assert [p["chosen"][0]["content"] for p in pairs] == ["5 apples", "5 apples"]
    assert {p["source"] for p in pairs} == {"onpolicy+gold"} and not any(k["label"] for k in kto)
    mixed = _row([("5", True), ("6", False)])
    assert [p["chosen"][0]["content"] for p in build_records(mixed, 4, gold_as_chosen="5 apples")[0]] == ["5"]
    assert build_records(_row([("5", True)]), 4)[0] == []  # all correct: nothing to prefer


def _inputs(tmp_path):
    problems = tmp_path / "asdiv.jsonl"
    problems.write_text("".join(json.dumps({"passage": p, "question": q, "answer": a}) + "\n"
                                for p, q, a in PROBLEMS))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{p} {q}"},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for p, q, a in PROBLEMS[:4]))
    return problems, train


def _conf(tiny_model_dir, tmp_path, out, **kw):
    problems, train = _inputs(tmp_path)
    return build(PairsConfig, {"model": str(tiny_model_dir), "problems": str(problems), "train_path": str(train),
                               "limit": 0, "k": 3, "max_new_tokens": 6, "chunk_size": 2, "seed": 3,
                               "out_dir": str(out), "gold_as_chosen": True,
                               "runtime": {"device": "cpu", "dtype": "float32", "batch_size": 4}, **kw})


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_builder_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    s = build_pairs(_conf(tiny_model_dir, tmp_path, out), log)
    rows = _read(out / SAMPLES)
    held_out = problem_id(f"{PROBLEMS[4][0]} {PROBLEMS[4][1]}")
    assert len(rows) == s["problems"] == 4 and held_out not in {r["id"] for r in rows}
    assert s["samples"] == 12 and all(len(r["samples"]) == 3 for r in rows)
    assert s["correct"] == sum(x["correct"] for r in rows for x in r["samples"])
    assert s["problems_any_correct"] + s["problems_none_correct"] == 4
    assert all(set(x) >= {"text", "answer", "correct"} for r in rows for x in r["samples"])
    pairs, kto = _read(out / PAIRS), _read(out / KTO)
    assert len(pairs) == s["pairs"] and len(kto) == s["kto_good"] + s["kto_bad"]
    for p in pairs:
        assert set(p) == {"id", "source", "prompt", "chosen", "rejected"}
        assert p["prompt"][0]["role"] == "user" and p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
    assert all(set(k) == {"id", "source", "prompt", "completion", "label"} for k in kto)
    prompts = _read(out / PROMPTS)  # GRPO's prompts: every selected problem with its gold number
    assert [p["id"] for p in prompts] == [r["id"] for r in rows] and s["prompts"] == 4
    assert [p["answer"] for p in prompts] == [r["gold"] for r in rows]
    assert all(p["prompt"] == [{"role": "user", "content": r["question"]}] for p, r in zip(prompts, rows))
    # the random model is rarely right: gold answers stand in as chosen (gold_as_chosen)
    assert s["pairs_with_gold"] == sum(p["source"] == "onpolicy+gold" for p in pairs)
    with pytest.raises(PairsError, match="k=3"):
        build_pairs(_conf(tiny_model_dir, tmp_path, out, k=2), log)


def test_resume_after_kill_mid_write(tiny_model_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    build_pairs(_conf(tiny_model_dir, tmp_path, full), log)
    build_pairs(_conf(tiny_model_dir, tmp_path, cut), log)
    # what a kill during chunk 2's write leaves: chunk 1, one line of chunk 2, half of the next line
    lines = (cut / SAMPLES).read_bytes().splitlines(keepends=True)
    (cut / SAMPLES).write_bytes(b"".join(lines[:3]) + lines[3][:40])
    (cut / PAIRS).unlink()
    s = build_pairs(_conf(tiny_model_dir, tmp_path, cut), log)
    assert s["chunks_sampled_now"] == 1
    ids = [r["id"] for r in _read(cut / SAMPLES)]
    assert len(ids) == len(set(ids)) == 4
    by_id = lambda p: sorted(_read(p), key=lambda r: r["id"])  # noqa: E731
    assert by_id(cut / SAMPLES) == by_id(full / SAMPLES)
    assert (cut / PAIRS).read_text() == (full / PAIRS).read_text()
    assert (cut / KTO).read_text() == (full / KTO).read_text()


@pytest.mark.slow
def test_builder_on_the_embedded_default_with_real_asdiv(smollm2_dir, raw_data, tmp_path):
    """SmolLM2-135M-Instruct samples real ASDiv problems (those of a stand-in SFT train file):
    its answers are scored by the eval's checker, and a model this small is right on few, so
    most pairs take the gold answer as chosen."""
    rows = [json.loads(x) for x in Path(raw_data["asdiv"]).read_text().splitlines()[:12]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{r['passage']} {r['question']}"},
                                                      {"role": "assistant", "content": r["answer"]}]}) + "\n"
                             for r in rows))
    out = tmp_path / "out"
    conf = build(PairsConfig, {"model": str(smollm2_dir), "problems": str(raw_data["asdiv"]), "format": "asdiv",
                               "train_path": str(train), "limit": 8, "k": 4, "max_new_tokens": 16, "chunk_size": 4,
                               "temperature": 1.0, "seed": 0, "out_dir": str(out), "gold_as_chosen": True,
                               "runtime": {"device": "cpu", "dtype": "float32", "batch_size": 16}})
    s = build_pairs(conf, log)
    assert s["problems"] == 8 and s["samples"] == 32
    samples = _read(out / SAMPLES)
    from forgelab.eval.answers import extract_answer, is_correct
    for r in samples:  # every label is the eval's own verdict on the sample's text
        assert all(x["correct"] == is_correct(extract_answer(x["text"]), r["gold"]) for x in r["samples"])
    assert s["correct"] == sum(x["correct"] for r in samples for x in r["samples"])
    pairs = _read(out / PAIRS)
    assert len(pairs) == s["pairs"] > 0
    assert (s["pairs_with_gold"] > 0) == (s["problems_none_correct"] > 0)  # gold stands in only where none was right
    assert {p["id"].split("-")[0] for p in pairs} <= {r["id"] for r in samples}
    assert len(_read(out / PROMPTS)) == 8
