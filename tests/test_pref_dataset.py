"""Stage 03b: preference formats -> TRL's conversational schemas, counted drops with
file:line, strict mode, the chat-template prefix check, the split."""
import json
import subprocess
import sys

import pytest

from forgelab import config as cfg
from forgelab.data.pref_dataset import PrefDataConfig, PrefDataError, build_pref_dataset
from forgelab.runs import PROJECT_ROOT, Run

Q1, A1, B1 = "A baker has 24 muffins in boxes of 6. How many boxes?", "4 boxes.", "6 boxes."
Q2, A2, B2 = "What is the capital of Australia?", "Canberra.", "Sydney."
SYSTEM = "Answer briefly."

# ChatML like SmolLM2's, but a user turn renders differently once an answer follows it.
BROKEN_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' and not loop.last %}"
    "<|im_start|>user (answered)\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The same fault, only for user turns that start with "Q:": breaks some records, not all.
PARTLY_BROKEN_TEMPLATE = BROKEN_TEMPLATE.replace("not loop.last", "not loop.last and m.content.startswith('Q:')")


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def build(tmp_path, sources: dict, *overrides, tokenizer=None, name="t"):
    """Run the stage on the given sources; returns (summary, {output name: rows})."""
    conf = cfg.load(PrefDataConfig, [], [f"out_dir={tmp_path / 'out'}", f"sources={json.dumps(sources)}",
                                         f"tokenizer={json.dumps(str(tokenizer) if tokenizer else None)}",
                                         *overrides])
    with Run("pref_data", conf, run_name=f"{name}-{tmp_path.name}") as run:
        summary = build_pref_dataset(conf, run)
    return summary, {k: read_jsonl(p) for k, p in summary["outputs"].items()}


def tokenizer_with_template(smollm2_dir, tmp_path, template):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = template
    out = tmp_path / "tok"
    tok.save_pretrained(out)
    return out


def test_pair_records_in_every_prompt_form_give_trl_conversational_pairs(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": Q1, "chosen": A1, "rejected": B1},
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q2}],
         "chosen": [{"role": "assistant", "content": A2}], "rejected": [{"role": "assistant", "content": B2}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": Q1}], "chosen": {"role": "assistant", "content": A1},
         "rejected": B1},
    ])
    s, out = build(tmp_path, {"p": {"path": str(src), "format": "pairs"}}, "val_fraction=0")
    assert set(out) == {"pairs_train", "pairs_val"} and out["pairs_val"] == []
    rows = out["pairs_train"]
    assert s["pairs_train"] == 3 and s["dropped"] == 0 and s["template_check"] is None
    for r in rows:  # the schema, exactly
        assert list(r) == ["id", "source", "prompt", "chosen", "rejected"] and r["source"] == "p"
        assert r["prompt"][-1]["role"] == "user"
    assert rows[0]["prompt"] == [{"role": "user", "content": Q1}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": A1}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": B1}]
    assert rows[1]["prompt"][0] == {"role": "system", "content": SYSTEM}
    assert [m["role"] for m in rows[2]["prompt"]] == ["user", "assistant", "user"]
    assert len({r["id"] for r in rows}) == 3


def test_llamafactory_ranking_alpaca_json_and_sharegpt_parquet_match_pair_records(tmp_path):
    """The same preference in the pairs format (jsonl), alpaca ranking (json array) and
    sharegpt ranking (parquet) converts to the same row and id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q2},
                    {"role": "assistant", "content": A2}, {"role": "user", "content": f"{Q1}\n\nBe exact."}],
         "chosen": A1, "rejected": B1}])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": Q1, "input": "Be exact.", "system": SYSTEM,
                                   "history": [[Q2, A2]], "chosen": A1, "rejected": B1}], indent=2))
    sharegpt = tmp_path / "sharegpt.parquet"
    pq.write_table(pa.Table.from_pylist([{
        "conversations": [{"from": "human", "value": Q2}, {"from": "gpt", "value": A2},
                          {"from": "human", "value": f"{Q1}\n\nBe exact."}],
        "chosen": {"from": "gpt", "value": A1}, "rejected": {"from": "gpt", "value": B1},
        "system": SYSTEM}]), sharegpt)
    s, out = build(tmp_path, {"a": {"path": str(pairs)},
                              "b": {"path": str(alpaca), "format": "alpaca_ranking"},
                              "c": {"path": str(sharegpt), "format": "sharegpt_ranking"}},
                   "val_fraction=0", "dedup=false")
    rows = out["pairs_train"]
    assert [r["source"] for r in rows] == ["a", "b", "c"]
    assert all({k: v for k, v in r.items() if k != "source"} ==
               {k: v for k, v in rows[0].items() if k != "source"} for r in rows)
    # With dedup on, the two later copies are duplicates of the first.
    s, out = build(tmp_path, {"a": {"path": str(pairs)},
                              "b": {"path": str(alpaca), "format": "alpaca_ranking"}}, "val_fraction=0", name="d")
    assert s["duplicates"] == 1 and s["sources"]["b"]["duplicates"] == 1 and len(out["pairs_train"]) == 1


def test_kto_records_label_kto_tag_and_last_assistant_turn(tmp_path):
    src = write_jsonl(tmp_path / "k.jsonl", [
        {"prompt": Q1, "completion": A1, "label": True},
        {"prompt": Q1, "completion": [{"role": "assistant", "content": B1}], "label": False},
        {"messages": [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}], "label": "true"},
        {"conversations": [{"from": "human", "value": Q2}, {"from": "gpt", "value": B2}], "kto_tag": False},
    ])
    s, out = build(tmp_path, {"k": {"path": str(src), "format": "kto", "system": SYSTEM}}, "val_fraction=0")
    assert set(out) == {"kto_train", "kto_val"} and s["pairs_train"] == 0
    rows = out["kto_train"]
    assert [r["label"] for r in rows] == [True, False, True, False]
    for r in rows:
        assert list(r) == ["id", "source", "prompt", "completion", "label"]
        assert r["prompt"][0] == {"role": "system", "content": SYSTEM} and r["prompt"][-1]["role"] == "user"
    assert rows[2]["prompt"][1:] == [{"role": "user", "content": Q2}]
    assert rows[2]["completion"] == [{"role": "assistant", "content": A2}]
    assert rows[3]["completion"] == [{"role": "assistant", "content": B2}]


MALFORMED = [
    {"prompt": Q1, "chosen": A1, "rejected": B1},                                     # 1 ok
    '{"prompt": "cut',                                                                 # 2 bad_json
    {"prompt": Q1, "chosen": A1},                                                      # 3 missing_field
    {"prompt": Q2, "chosen": "  ", "rejected": B2},                                    # 4 empty_content
    ["not", "an", "object"],                                                           # 5 not_an_object
    {"prompt": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}],
     "chosen": A1, "rejected": B1},                                                    # 6 role_order
    {"prompt": Q2, "chosen": A2, "rejected": A2},                                      # 7 identical_answers
    {"prompt": Q1, "chosen": [{"role": "user", "content": A1}], "rejected": B1},       # 8 bad_type
    {"prompt": Q2, "chosen": " Canberra. ", "rejected": "Canberra."},                  # 9 identical (stripped)
]


def test_malformed_records_and_identical_answers_are_counted_with_file_line(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", MALFORMED)
    s, out = build(tmp_path, {"bad": {"path": str(src)}}, "val_fraction=0")
    assert len(out["pairs_train"]) == 1
    where = f"{src}:"
    assert s["dropped_by_reason"] == {
        "bad_json": {"count": 1, "first": where + "2"}, "not_an_object": {"count": 1, "first": where + "5"},
        "missing_field": {"count": 1, "first": where + "3"}, "bad_type": {"count": 1, "first": where + "8"},
        "role_order": {"count": 1, "first": where + "6"}, "empty_content": {"count": 1, "first": where + "4"},
        "identical_answers": {"count": 2, "first": where + "7"}}
    assert s["dropped"] == 8 and s["sources"]["bad"]["records"] == 9
    bad = read_jsonl(s["bad_records_file"])
    assert [b["where"] for b in bad] == [where + str(n) for n in range(2, 10)]
    assert "'rejected'" in bad[1]["detail"]


def test_strict_fails_on_the_first_malformed_record_but_drops_identical_answers(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", MALFORMED)
    with pytest.raises(PrefDataError, match=rf"bad\.jsonl:2: bad record \(bad_json\).*\[strict mode\]"):
        build(tmp_path, {"bad": {"path": str(src)}}, "strict=true")
    ident = write_jsonl(tmp_path / "ident.jsonl", [MALFORMED[0], MALFORMED[6]])
    s, out = build(tmp_path, {"i": {"path": str(ident)}}, "strict=true", "val_fraction=0", name="i")
    assert s["dropped_by_reason"] == {"identical_answers": {"count": 1, "first": f"{ident}:2"}}


def test_missing_required_source_fails_and_optional_is_reported(tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", [MALFORMED[0]])
    with pytest.raises(PrefDataError, match="source 'gone': file not found"):
        build(tmp_path, {"gone": {"path": str(tmp_path / "nope.jsonl")}})
    s, _ = build(tmp_path, {"ok": {"path": str(ok)}, "gone": {"path": str(tmp_path / "nope.jsonl"),
                                                              "optional": True}}, name="o")
    assert s["sources"]["gone"]["status"] == "missing (optional, skipped)"


def test_chat_template_prefix_check_passes_with_smollm2(tmp_path, smollm2_dir):
    pairs = write_jsonl(tmp_path / "p.jsonl", [MALFORMED[0], {"prompt": Q2, "chosen": A1, "rejected": B1},
                                               {"prompt": [{"role": "system", "content": SYSTEM},
                                                           {"role": "user", "content": Q2}],
                                                "chosen": A2, "rejected": B2}])
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": Q1, "completion": A1, "label": True}])
    s, out = build(tmp_path, {"p": {"path": str(pairs)}, "k": {"path": str(kto), "format": "kto"}},
                   tokenizer=smollm2_dir)
    assert s["template_check"] == {"tokenizer": str(smollm2_dir), "checked_pairs": 3,
                                   "checked_kto": 1, "failed": 0}
    assert s["pairs_train"] + s["pairs_val"] == 3 and s["dropped"] == 0


def test_a_template_that_rewrites_the_prompt_fails_the_stage_naming_it(tmp_path, smollm2_dir):
    tok = tokenizer_with_template(smollm2_dir, tmp_path, BROKEN_TEMPLATE)
    src = write_jsonl(tmp_path / "p.jsonl", [MALFORMED[0], {"prompt": Q2, "chosen": A2, "rejected": B2}])
    with pytest.raises(PrefDataError, match=rf"chat template of {tok} \(sha256 [0-9a-f]{{12}}\) is not "
                                            rf"prefix-stable: for all 2 records.*p\.jsonl:1"):
        build(tmp_path, {"p": {"path": str(src)}}, tokenizer=tok)
    assert not (tmp_path / "out" / "pairs_train.jsonl").exists()  # nothing written


def test_a_pair_the_template_cannot_split_is_dropped_with_file_line(tmp_path, smollm2_dir):
    tok = tokenizer_with_template(smollm2_dir, tmp_path, PARTLY_BROKEN_TEMPLATE)
    src = write_jsonl(tmp_path / "p.jsonl", [MALFORMED[0], {"prompt": f"Q: {Q2}", "chosen": A2, "rejected": B2}])
    s, out = build(tmp_path, {"p": {"path": str(src)}}, "val_fraction=0", tokenizer=tok)
    assert s["template_check"]["failed"] == 1 and len(out["pairs_train"]) == 1
    assert s["dropped_by_reason"] == {"chat_template_prefix": {"count": 1, "first": f"{src}:2"}}
    with pytest.raises(PrefDataError, match=r"p\.jsonl:2: bad record \(chat_template_prefix\)"):
        build(tmp_path, {"p": {"path": str(src)}}, "strict=true", tokenizer=tok, name="s")


def test_split_is_deterministic_by_prompt_and_stable_when_data_is_added(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(200)]
    rows += [{"prompt": "What is 3 + 3?", "chosen": "6", "rejected": f"{k}"} for k in range(10, 20)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    more = write_jsonl(tmp_path / "more.jsonl", [{"prompt": f"Name {i}", "chosen": "x", "rejected": "y"}
                                                 for i in range(50)])
    s1, o1 = build(tmp_path, {"a": {"path": str(a)}}, "val_fraction=0.2", name="s1")
    s2, o2 = build(tmp_path, {"a": {"path": str(a)}}, "val_fraction=0.2", name="s2")
    assert o1 == o2 and 10 < s1["pairs_val"] < 80
    for split in ("pairs_train", "pairs_val"):  # all answers to one prompt share a split
        prompts = {json.dumps(r["prompt"]) for r in o1[split]}
        other = {json.dumps(r["prompt"]) for r in o1["pairs_val" if split == "pairs_train" else "pairs_train"]}
        assert not prompts & other
    _, o3 = build(tmp_path, {"a": {"path": str(a)}, "m": {"path": str(more)}}, "val_fraction=0.2", name="s3")
    assert [r for r in o3["pairs_val"] if r["source"] == "a"] == o1["pairs_val"]
    _, o4 = build(tmp_path, {"a": {"path": str(a)}}, "val_fraction=0.2", "use=[a#30]", name="s4")
    _, o5 = build(tmp_path, {"a": {"path": str(a)}}, "val_fraction=0.2", "use=[a#30]", name="s5")
    assert o4 == o5 and len(o4["pairs_train"]) + len(o4["pairs_val"]) == 30


def test_a_kind_that_is_absent_leaves_no_stale_file(tmp_path):
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": Q1, "completion": A1, "label": True}])
    pairs = write_jsonl(tmp_path / "p.jsonl", [MALFORMED[0]])
    build(tmp_path, {"k": {"path": str(kto), "format": "kto"}}, name="k")
    assert (tmp_path / "out" / "kto_train.jsonl").exists()
    s, out = build(tmp_path, {"p": {"path": str(pairs)}}, name="p")
    assert set(out) == {"pairs_train", "pairs_val"} and not (tmp_path / "out" / "kto_train.jsonl").exists()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"columns\.output.*format 'pairs'"):
        cfg.load(PrefDataConfig, [], ['sources={"a": {"path": "x", "columns": {"output": "y"}}}'])
    with pytest.raises(cfg.ConfigError, match="'use'.*no source named 'b'"):
        cfg.load(PrefDataConfig, [], ['sources={"a": {"path": "x"}}', "use=[b]"])


def test_the_script_builds_the_default_config(tmp_path, smollm2_dir):
    r = subprocess.run([sys.executable, "scripts/03b_build_pref_dataset.py", "--set", f"out_dir={tmp_path}",
                        "--run-name", f"default-{tmp_path.name}"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pairs = read_jsonl(tmp_path / "pairs_train.jsonl") + read_jsonl(tmp_path / "pairs_val.jsonl")
    kto = read_jsonl(tmp_path / "kto_train.jsonl") + read_jsonl(tmp_path / "kto_val.jsonl")
    assert len(pairs) == 6 and len(kto) == 4
    assert "optional source onpolicy" in r.stderr
