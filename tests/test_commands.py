"""`forgelab <verb>`: every stage verb through the real console script on tiny inputs, checked
on the records and outputs the stage writes; the verbs that need a server or a long job through
their help (script help + config keys); verb and key typos; `forgelab runs` over real records."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgelab.commands import VERBS
from forgelab.runs import PROJECT_ROOT

FORGELAB = Path(sys.executable).parent / "forgelab"  # the console script of this environment
PROBLEMS = [("Tom has 3 apples.", "He gets 2 more. How many apples does he have?", "5 apples"),
            ("A box holds 4 pens.", "How many pens are in 2 boxes?", "8 pens"),
            ("Ann read 10 pages.", "Then she read 5. How many pages did she read?", "15 pages")]


def forgelab(*args: str, env: dict | None = None, rc: int | None = 0, cwd: Path = PROJECT_ROOT,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `forgelab ARGS` as a user does (one thread); assert its exit code unless rc is None."""
    assert FORGELAB.exists(), f"{FORGELAB} missing: pip install --no-deps -e . (scripts/bootstrap_env.sh does it)"
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    e.pop("FORGELAB_COMMAND", None)
    r = subprocess.run([str(FORGELAB), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if rc is not None:
        assert r.returncode == rc, \
            f"forgelab {' '.join(args)}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def summary(stage: str, run: str, name: str = "summary.json") -> dict:
    return json.loads((Path(os.environ["FORGELAB_RUNS_DIR"]) / stage / run / name).read_text())


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# --- the command line itself -----------------------------------------------------------------
def test_help_lists_every_verb_with_its_script_from_any_directory(tmp_path):
    out = forgelab("--help", cwd=tmp_path).stdout
    for name, verb in VERBS.items():
        line = next(x for x in out.splitlines() if x.strip().startswith(name + " "))
        assert verb.target in line and verb.about in line
        if not verb.target.startswith("forgelab."):
            assert (PROJECT_ROOT / "scripts" / verb.target).is_file()
    mod = subprocess.run([sys.executable, "-m", "forgelab", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert mod.returncode == 0 and mod.stdout == out


def test_a_verb_typo_exits_2_with_the_nearest_verb():
    r = forgelab("trian", "sanity", rc=2)
    assert "unknown verb 'trian'; did you mean 'train'?" in r.stderr and not r.stdout
    assert "unknown verb 'zzz'" in forgelab("zzz", rc=2).stderr


def test_a_key_typo_passes_through_unchanged_naming_the_key_and_file(tmp_path):
    r = forgelab("corpus", "--set", "mix.targt=1", rc=2)
    assert r.stderr.strip() == "config error: unknown key 'mix.targt' (from --set); did you mean 'mix.target'?"
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lrr: 1\n")
    for args in (["--config", "configs/train/cpt.yaml", "--config", str(typo)],  # scripts/train.py itself
                 ["sanity", "--config", str(typo)]):  # through the launcher
        r = forgelab("train", *args, rc=2)
        assert f"unknown key 'optim.lrr' (from {typo}); did you mean 'optim.lr'?" in r.stderr
    assert "unknown track 'sanityy'" in forgelab("train", "sanityy", rc=2).stderr


def test_config_keys_and_serve_status_really_run(tmp_path):
    keys = forgelab("config", "keys", "train").stdout
    assert "steps.max_steps" in keys and "default=" in keys
    r = forgelab("serve", "status", env={"FORGELAB_RUNS_DIR": str(tmp_path / "runs")})
    assert r.stdout.strip() == "no servers recorded"


@pytest.mark.parametrize("verb,kind,key", [("serve", "serve", "port"), ("bench", "bench_serving", "base_url"),
                                           ("eval", "eval", "tasks"), ("export", "export", "model"),
                                           ("estimate", "train", "optim.lr")])
def test_help_of_a_config_verb_is_the_scripts_then_its_keys(verb, kind, key):
    out = forgelab(verb, "--help").stdout
    script_help, _, keys = out.partition(f"config keys ({kind};")
    assert f"usage: {VERBS[verb].target}" in script_help
    assert any(x.split()[:1] == [key] for x in keys.splitlines())


@pytest.mark.parametrize("verb", ["chat", "batch-infer", "report", "compare-curves", "check-packing", "pipeline"])
def test_help_of_the_other_verbs(verb):
    out = forgelab(verb, "--help").stdout
    assert "config keys" not in out
    assert ("STAGES=" in out) if verb == "pipeline" else (f"usage: {VERBS[verb].target}" in out)


def test_board_dispatches_or_says_it_is_missing():
    if importlib.util.find_spec("forgelab.board.cli") is None:
        r = forgelab("board", rc=1)
        assert "no module forgelab.board.cli" in r.stderr
    else:
        assert "usage: forgelab board" in forgelab("board", "--help").stdout


# --- data stages -----------------------------------------------------------------------------
def test_env_and_download(tmp_path):
    r = forgelab("env", "--run-name", "cmd-env")
    assert "| torch | required |" in r.stdout and summary("env", "cmd-env")["missing"] == []
    src = tmp_path / "hello.txt"
    src.write_text("hello\n")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"root: {tmp_path / 'raw'}\nentries:\n  - name: hello\n    uri: file://{src}\n")
    forgelab("download", "--config", str(manifest), "--run-name", "cmd-dl")
    s = summary("download", "cmd-dl")
    assert s["outcome"] == "ok" and [e["action"] for e in s["entries"]] == ["downloaded"]
    assert (tmp_path / "raw" / "hello" / "hello.txt").read_text() == "hello\n"


def test_cpt_data_corpus_tokenize_bench_slice(tmp_path, raw_data):
    cl, tk = tmp_path / "cleaned", tmp_path / "tok"
    forgelab("corpus", "--set", f"out_dir={cl}", "--set", "mix.target=50000", "--run-name", "cmd")
    c = summary("cpt_corpus", "cmd")
    assert c["outcome"] == "ok" and c["sources"]["kjv"]["documents"] == 1189
    assert len(lines(cl / "train.jsonl")) == c["outputs"]["train"]["docs"]
    forgelab("tokenize", "--set", f"out_dir={tk}", "--set", f"inputs.train={cl}/train.jsonl",
             "--set", f"inputs.heldout={cl}/heldout.jsonl", "--set", "seq_len=64", "--run-name", "cmd")
    meta = json.loads((tk / "train" / "meta.json").read_text())
    assert summary("tokenize_cpt", "cmd")["outcome"] == "ok" and meta["seq_len"] == 64 and meta["n_blocks"] > 100
    forgelab("bench-slice", "--set", f"source_dir={tk}/train", "--set", f"out_dir={tk}/bench",
             "--set", f"summary_path={tk}/bench_summary.json", "--set", f"indices_path={tk}/bench_indices.json",
             "--set", "n_blocks=8", "--run-name", "cmd")
    b = summary("cpt_bench_slice", "cmd")
    assert b["outcome"] == "ok" and b["n_blocks"] == 8 and b["source_n_blocks"] == meta["n_blocks"]


def test_sft_data_tokenize_sft_pref_data_and_tokenizer(tmp_path, raw_data):
    forgelab("sft-data", "--set", "use=[asdiv#40]", "--set", f"out_dir={tmp_path / 'sft'}", "--run-name", "cmd")
    s = summary("sft_data", "cmd")
    assert s["outcome"] == "ok" and s["train"] + s["val"] == 40
    assert len(lines(tmp_path / "sft" / "train.jsonl")) == s["train"]
    forgelab("tokenize-sft", "--set", f"data_dir={tmp_path / 'sft'}", "--set", f"out_dir={tmp_path / 'sfttok'}",
             "--run-name", "cmd")
    t = summary("tokenize_sft", "cmd")
    meta = json.loads((tmp_path / "sfttok" / "train" / "meta.json").read_text())
    assert t["outcome"] == "ok" and meta["n_samples"] == s["train"] and meta["packed"]
    forgelab("pref-data", "--set", f"out_dir={tmp_path / 'pref'}", "--run-name", "cmd")
    p = summary("pref_data", "cmd")
    assert p["outcome"] == "ok" and len(lines(tmp_path / "pref" / "pairs_train.jsonl")) == p["pairs_train"] > 0
    forgelab("tokenizer", "--set", f"sources=[{{path: {raw_data['kjv']}}}]", "--set", "vocab_size=700",
             "--set", "max_chars_per_source=60000", "--set", f"output={tmp_path / 'bpe'}", "--run-name", "cmd")
    k = summary("tokenizer", "cmd")
    assert k["outcome"] == "ok" and k["vocab_size"] == 700 and k["check"]["round_trip_exact"]
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()


# --- training and what follows it ------------------------------------------------------------
def test_train_sanity_records_the_forgelab_command_then_report_and_curves(tiny_model_dir, cpt_dir, tmp_path):
    args = ["train", "sanity", "single", "--task", "cpt", "--set", f"model.path={tiny_model_dir}",
            "--set", f"data.train={cpt_dir}", "--set", "steps.max_steps=2", "--set", "steps.micro_batch_size=2",
            "--run-name", "cmd-cpt"]
    forgelab(*args)
    s = summary("train", "cmd-cpt", "train_summary.json")
    assert (s["outcome"], s["task"], s["track"], s["backend"], s["steps"]) == ("ok", "cpt", "sanity", "single", 2)
    assert s["command"] == " ".join(["forgelab", *args])
    runs = Path(os.environ["FORGELAB_RUNS_DIR"]) / "train"
    assert (runs / "cmd-cpt" / "final" / "config.json").is_file()
    forgelab("report", "benchmark", "--runs", "cmd-cpt", "--runs-root", str(runs), "--out", str(tmp_path))
    rep = json.loads((tmp_path / "cpt_benchmark.json").read_text())
    assert [r["run"] for fam in rep["families"].values() for group in fam for r in group["rows"]] == ["cmd-cpt"]
    r = forgelab("compare-curves", str(runs), str(runs))
    assert "cmd-cpt" in r.stdout and "identical" in r.stdout and "passed" in r.stdout


def test_train_without_a_track_configs_as_given_or_task_and_backend(tiny_model_dir, cpt_dir, sft_dir):
    runs = Path(os.environ["FORGELAB_RUNS_DIR"]) / "train"
    r = forgelab("train", "--config", "configs/train/cpt.yaml", "--set", f"model.path={tiny_model_dir}",
                 "--set", f"data.train={cpt_dir}", "--run-name", "cmd-dry", "--dry-run")
    assert "cmd-dry: fresh start" in r.stdout and "configs/train/cpt.yaml --set" in r.stdout  # that file only
    r = forgelab("train", "ddp", "--task", "sft_lora", "--set", f"model.path={tiny_model_dir}",
                 "--set", f"data.train={sft_dir}", "--run-name", "cmd-dry-ddp", "--dry-run")
    assert "cmd-dry-ddp: fresh start" in r.stdout and "-m torch.distributed.run" in r.stdout
    assert "configs/train/sft_lora.yaml" in r.stdout and "configs/train/backends/ddp.yaml" in r.stdout
    assert "tracks/" not in r.stdout
    assert not (runs / "cmd-dry").exists() and not (runs / "cmd-dry-ddp").exists()


def test_sft_lora_then_merge_pairs_check_packing_estimate(tiny_model_dir, sft_dir, tmp_path):
    forgelab("train", "sanity", "--task", "sft_lora", "--set", f"model.path={tiny_model_dir}",
             "--set", f"data.train={sft_dir}", "--set", "steps.max_steps=2", "--run-name", "cmd-lora")
    t = summary("train", "cmd-lora", "train_summary.json")
    assert t["outcome"] == "ok" and t["command"].startswith("forgelab train sanity --task sft_lora")
    adapter = Path(os.environ["FORGELAB_RUNS_DIR"]) / "train" / "cmd-lora" / "final"
    merged = tmp_path / "merged"
    forgelab("merge", "--set", f"adapter={adapter}", "--set", f"output={merged}", "--set", "dtype=float32",
             "--run-name", "cmd")
    m = summary("merge", "cmd")
    assert m["outcome"] == "ok" and m["passed"] and m["base_model"] == str(tiny_model_dir)
    assert (merged / "model.safetensors").is_file()

    problems, train = tmp_path / "asdiv.jsonl", tmp_path / "train.jsonl"
    problems.write_text("".join(json.dumps({"passage": p, "question": q, "answer": a}) + "\n" for p, q, a in PROBLEMS))
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{p} {q}"},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for p, q, a in PROBLEMS[:2]))
    forgelab("pairs", "--set", f"model={merged}", "--set", f"problems={problems}", "--set", f"train_path={train}",
             "--set", "limit=0", "--set", "k=2", "--set", "max_new_tokens=4", "--set", f"out_dir={tmp_path / 'pairs'}",
             "--set", "gold_as_chosen=true", "--set", "runtime.device=cpu", "--set", "runtime.dtype=float32",
             "--run-name", "cmd")
    p = summary("pairs", "cmd")
    assert p["outcome"] == "ok" and p["problems"] == 2 and p["samples"] == 4  # the train set's problems, k each
    assert len(lines(tmp_path / "pairs" / "pairs.jsonl")) == p["pairs"]

    r = forgelab("check-packing", "--data", str(sft_dir), "--model", str(merged), "--max-samples", "4",
                 "--out", str(tmp_path / "packing.json"))
    assert "PASS" in r.stdout and json.loads((tmp_path / "packing.json").read_text())["results"]
    forgelab("estimate", "--config", "configs/train/sft_lora.yaml", "--set", f"model.path={tiny_model_dir}",
             "--set", f"data.train={sft_dir}", "--json", str(tmp_path / "estimate.json"))
    e = json.loads((tmp_path / "estimate.json").read_text())
    assert e["peak_memory_bytes"] > 0 and e["steps_detail"]["items"] == json.loads(
        (sft_dir / "meta.json").read_text())["n_rows"]


# --- forgelab runs ---------------------------------------------------------------------------
def test_runs_lists_and_filters_real_records(tmp_path):
    root = tmp_path / "runs"
    env = {"FORGELAB_RUNS_DIR": str(root)}
    forgelab("env", "--run-name", "env-ok", env=env)
    forgelab("sft-data", "--set", "use=[asdiv#20]", "--set", f"out_dir={tmp_path / 'sft'}", "--run-name", "sft-ok",
             env=env)
    forgelab("tokenize", "--set", f"inputs.train={tmp_path}/none.jsonl", "--set", f"out_dir={tmp_path / 'tk'}",
             "--run-name", "tok-bad", env=env, rc=1)

    def rows(*args: str) -> list[dict]:
        return json.loads(forgelab("runs", "--json", *args, env=env).stdout)

    every = rows()
    assert {(r["stage"], r["name"], r["status"]) for r in every} == \
        {("env", "env-ok", "ok"), ("sft_data", "sft-ok", "ok"), ("tokenize_cpt", "tok-bad", "failed")}
    assert every == rows("--root", str(root)) == json.loads(forgelab("runs", "--json", "--root", str(root)).stdout)
    assert [r["name"] for r in rows("--status", "failed")] == ["tok-bad"]
    assert {r["name"] for r in rows("--stage", "env", "--stage", "sft_data")} == {"env-ok", "sft-ok"}
    assert [r["name"] for r in rows("--grep", "SFT-")] == ["sft-ok"]
    assert rows("--since", "2999-01-01") == [] and len(rows("--since", "2000-01-01")) == 3
    table = forgelab("runs", "--status", "ok", env=env).stdout.splitlines()
    assert table[0].split()[:3] == ["stage", "name", "status"] and len(table) == 2 + 2
    assert "no runs match" in forgelab("runs", "--grep", "nothing-like-this", env=env).stderr
    assert "invalid choice" in forgelab("runs", "--status", "okay", env=env, rc=2).stderr
