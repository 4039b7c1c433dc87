"""Stage 03: formats -> one messages schema, bad-record reports, name#N sampling, split."""
import json
import os
import re
import subprocess
import sys

import pytest

from forgelab import config as cfg
from forgelab.data.sft_dataset import SFTDataConfig, SFTDataError, build_sft_dataset, is_val
from forgelab.data.sft_formats import REASONS
from forgelab.runs import PROJECT_ROOT, Run

DATA = PROJECT_ROOT / "tests" / "data"
DEFAULT = PROJECT_ROOT / "configs" / "data" / "sft.yaml"
VAL_FRACTION = cfg.load(SFTDataConfig, [DEFAULT]).val_fraction  # the default config's share


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def build(tmp_path, *overrides, config=DEFAULT, run_name="t"):
    conf = cfg.load(SFTDataConfig, [config], [f"out_dir={tmp_path / 'out'}", *overrides])
    with Run("sft_data", conf, run_name=f"{run_name}-{tmp_path.name}") as run:
        summary = build_sft_dataset(conf, run)
    out = tmp_path / "out"
    return summary, read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl"), run


def source_yaml(tmp_path, body):
    p = tmp_path / "sources.yaml"
    p.write_text(body)
    return p


def test_default_asdiv_alpaca_with_columns(tmp_path, raw_data):
    # GSM8K (optional) pointed at a file that is not there, whether or not the user added it
    s, train, val, _ = build(tmp_path, f"sources.gsm8k.path={tmp_path / 'no-gsm8k' / 'train.jsonl'}")
    raw = read_jsonl(raw_data["asdiv"])
    assert s["sources"]["asdiv"]["records"] == len(raw) == 2305
    assert s["duplicates"] == 1 and s["bad_records"] == 0  # ASDiv holds one exact duplicate
    assert len(train) + len(val) == 2304
    assert abs(len(val) / 2304 - VAL_FRACTION) < 0.02  # a hash split: near the configured share
    assert s["sources"]["gsm8k"]["status"] == "missing (optional, skipped)"
    by_content = {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in train + val}
    for rec in raw[:50]:  # user = passage then question (user_template), assistant = answer
        user = f"{rec['passage'].strip()} {rec['question'].strip()}"
        assert (user, rec["answer"].strip()) in by_content
    for r in train + val:
        assert set(r) == {"id", "source", "messages"} and r["source"] == "asdiv"
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    assert len({r["id"] for r in train + val}) == 2304


def test_same_conversations_from_alpaca_sharegpt_messages_json_and_parquet(tmp_path, raw_data):
    """Real ASDiv records written in the three formats (jsonl, json array, parquet) convert
    to identical conversations and ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = read_jsonl(raw_data["asdiv"])[:60]
    user = [f"{r['passage'].strip()} {r['question'].strip()}" for r in raw]
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": u, "output": r["answer"], "system": "Solve it."}) + "\n"
                              for u, r in zip(user, raw)))
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "system", "value": "Solve it."},
                                                       {"from": "human", "value": u},
                                                       {"from": "gpt", "value": r["answer"]}]}
                                    for u, r in zip(user, raw)], indent=2))
    msgs = tmp_path / "messages.parquet"
    pq.write_table(pa.Table.from_pylist([{"chat": [{"role": "system", "content": "Solve it."},
                                                   {"role": "user", "content": u},
                                                   {"role": "assistant", "content": r["answer"]}]}
                                         for u, r in zip(user, raw)]), msgs)
    cfg_path = source_yaml(tmp_path, f"""
dedup: false
sources:
  a: {{path: {alpaca}, format: alpaca}}
  s: {{path: {sharegpt}, format: sharegpt}}
  m: {{path: {msgs}, format: messages, columns: {{messages: chat}}}}
""")
    s, train, val, _ = build(tmp_path, config=cfg_path)
    rows = train + val
    assert s["bad_records"] == 0 and len(rows) == 180
    by_source = {k: sorted((r["id"], json.dumps(r["messages"])) for r in rows if r["source"] == k)
                 for k in "asm"}
    assert by_source["a"] == by_source["s"] == by_source["m"]
    first = next(r for r in rows if r["source"] == "a" and r["messages"][1]["content"] == user[0])
    assert first["messages"] == [{"role": "system", "content": "Solve it."},
                                 {"role": "user", "content": user[0]},
                                 {"role": "assistant", "content": raw[0]["answer"].strip()}]


def test_sharegpt_tool_roles_and_messages_tool_calls(tmp_path):
    cfg_path = source_yaml(tmp_path, f"""
val_fraction: 0.0
sources:
  sg: {{path: {DATA / 'sft_sharegpt_tools.json'}, format: sharegpt}}
  oa: {{path: {DATA / 'sft_messages.jsonl'}, format: messages}}
""")
    s, train, _, _ = build(tmp_path, config=cfg_path)
    assert s["bad_records"] == 0 and len(train) == 5
    weather = next(r for r in train if r["source"] == "sg" and "tools" in r)
    assert [m["role"] for m in weather["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(weather["messages"][2]["content"])["name"] == "get_weather"  # function -> assistant
    assert weather["tools"][0]["name"] == "get_weather"  # the JSON string became a list
    calls = next(r for r in train if r["source"] == "oa" and "tools" in r)
    assert [m["role"] for m in calls["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["arguments"] for c in json.loads(calls["messages"][1]["content"])] == \
        ['{"city": "Oslo"}', '{"city": "Rome"}']
    parts = next(r for r in train if r["messages"][-1]["content"] == "tac")
    assert parts["messages"][0]["content"] == "Spell 'cat' backwards."


def test_bad_records_reported_with_file_line_and_counted(tmp_path):
    rel = "tests/data/sft_bad_records.jsonl"
    cfg_path = source_yaml(tmp_path, f"sources:\n  bad: {{path: {rel}, format: sharegpt}}\nval_fraction: 0.0\n")
    s, train, _, run = build(tmp_path, config=cfg_path)
    expected = {2: "bad_json", 3: "missing_field", 4: "empty_conversation", 5: "role_order",
                6: "empty_content", 7: "unknown_role", 8: "bad_type", 9: "not_an_object"}
    assert s["bad_by_reason"] == {r: 1 for r in REASONS if r != "not_utf8"}  # not_utf8: test_faults_bad_bytes
    assert s["sources"]["bad"]["records"] == 10 and s["sources"]["bad"]["converted"] == 2
    assert len(train) == 2
    report = read_jsonl(run.dir / "bad_records.jsonl")
    assert {b["line"]: b["reason"] for b in report} == expected
    for b in report:
        assert b["where"] == f"{rel}:{b['line']}" and b["detail"]
    assert "'bot'" in next(b["detail"] for b in report if b["reason"] == "unknown_role")
    log = (run.dir / "run.log").read_text()
    assert f"bad record {rel}:5: role_order" in log

    with pytest.raises(SFTDataError, match=re.escape(f"{rel}:2: bad record (bad_json)")):
        build(tmp_path, "strict=true", config=cfg_path, run_name="strict")


def test_script_help_and_strict_exit_code(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(PROJECT_ROOT / "scripts" / "03_build_sft_dataset.py")
    h = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env)
    assert h.returncode == 0 and "--set" in h.stdout
    cfg_path = source_yaml(tmp_path, "sources:\n  bad: {path: tests/data/sft_bad_records.jsonl, format: sharegpt}\n")
    r = subprocess.run([sys.executable, script, "--config", str(cfg_path), "--set", "strict=true",
                        "--set", f"out_dir={tmp_path / 'out'}", "--run-name", "strict"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert "tests/data/sft_bad_records.jsonl:2: bad record (bad_json)" in r.stderr
    assert not (tmp_path / "out" / "train.jsonl").exists()
    r = subprocess.run([sys.executable, script, "--set", "use=[asdiv#x]"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "'asdiv#x' is not 'name' or 'name#N'" in r.stderr


def test_name_hash_n_sampling_is_deterministic(tmp_path, raw_data):
    a = build(tmp_path / "a", "use=[asdiv#100]")
    b = build(tmp_path / "b", "use=[asdiv#100]")
    c = build(tmp_path / "c", "use=[asdiv#100]", "seed=7")
    ids = [{r["id"] for r in x[1] + x[2]} for x in (a, b, c)]
    assert len(ids[0]) == 100 and ids[0] == ids[1] and ids[0] != ids[2]
    assert a[0]["sources"]["asdiv#100"]["taken"] == 100
    big = build(tmp_path / "d", "use=[asdiv#5000]")[0]["sources"]["asdiv#5000"]
    assert big["requested"] == 5000 and big["taken"] == 2304


def test_split_is_stable_when_data_is_added(tmp_path, raw_data):
    small = build(tmp_path / "a", "use=[asdiv#300]")
    cfg_path = source_yaml(tmp_path, f"extends: {DEFAULT}\nsources:\n"
                                     f"  extra: {{path: {DATA / 'sft_messages.jsonl'}, format: messages}}\n")
    bigger = build(tmp_path / "b", "use=[extra, asdiv#300]", config=cfg_path)
    for split in (1, 2):
        assert {r["id"] for r in small[split]} <= {r["id"] for r in bigger[split]}
    for r in small[1]:
        assert not is_val(r["id"], 42, VAL_FRACTION)
    for r in small[2]:
        assert is_val(r["id"], 42, VAL_FRACTION)


def test_gsm8k_from_the_shared_file(tmp_path, gsm8k_train):
    """configs/data/sft_gsm8k.yaml on the shared GSM8K train file (7473 records), or on the
    40-line sample of tests/data where that is absent."""
    s, train, val, _ = build(tmp_path, f"sources.gsm8k.path={gsm8k_train}",
                             config=PROJECT_ROOT / "configs/data/sft_gsm8k.yaml")
    src = s["sources"]["gsm8k"]
    n = len(gsm8k_train.read_text().splitlines())
    if gsm8k_train == PROJECT_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl":
        assert n == 7473
    assert src["records"] == n and src["bad"] == {}
    assert len(train) + len(val) == n - src["duplicates"] and len(train) > 0 and len(val) > 0
    for r in train[:500]:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert re.search(r"#### -?[\d,.]+$", r["messages"][1]["content"])


def test_missing_required_source_and_config_errors(tmp_path):
    with pytest.raises(SFTDataError, match="no/such.jsonl"):
        build(tmp_path, "sources.asdiv.path=no/such.jsonl")
    with pytest.raises(cfg.ConfigError, match="columns.question.*not a field of format 'alpaca'"):
        cfg.load(SFTDataConfig, [DEFAULT], ["sources.asdiv.columns.question=instruction"])
    with pytest.raises(cfg.ConfigError, match="no source named 'asdvi'"):
        cfg.load(SFTDataConfig, [DEFAULT], ["use=[asdvi]"])
    with pytest.raises(cfg.ConfigError, match="roles.bing"):
        cfg.load(SFTDataConfig, [DEFAULT], ["sources.asdiv.format=sharegpt", "sources.asdiv.columns={}",
                                            "sources.asdiv.roles.bing=robot"])


def test_json_array_records_keep_their_line_numbers(tmp_path):
    arr = tmp_path / "conv.json"
    arr.write_text('[\n  {"conversations": [{"from": "human", "value": "Hi"},\n'
                   '                     {"from": "gpt", "value": "Hello"}]},\n'
                   '  {"conversations": [{"from": "gpt", "value": "first"}]},\n'
                   '\n  {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}]}\n]\n')
    cfg_path = source_yaml(tmp_path, f"sources:\n  j: {{path: {arr}, format: sharegpt}}\n")
    s, _, _, run = build(tmp_path, config=cfg_path)
    report = read_jsonl(run.dir / "bad_records.jsonl")
    assert [(b["line"], b["reason"]) for b in report] == [(4, "role_order"), (6, "empty_content")]
    arr.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]\n')
    with pytest.raises(SFTDataError, match=re.escape(f"{arr}:3: invalid JSON array")):
        build(tmp_path, config=cfg_path, run_name="broken")
