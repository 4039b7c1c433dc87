"""Plug-in components: the loader (dotted paths, signature checks, errors that name the key and
the path) and every example of examples/components/ run through the real stage it is wired
into: CPT corpus filter, SFT preprocessor and filter, SFT chat template, eval metrics and
rewards, and the loss as transformers' Trainer calls it."""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from forgelab import components as comp
from forgelab import config as cfg
from forgelab.config import ConfigError
from forgelab.runs import PROJECT_ROOT, Run, project_path

LOG = logging.getLogger("test")
EX = "examples/components"
EXAMPLES = {  # kind -> example paths, in both spellings (file and module)
    "loss": [f"{EX}/losses.py:focal_loss", "examples.components.losses:focal_loss_g1"],
    "metric": [f"{EX}/metrics.py:relative_closeness", "examples.components.metrics:states_an_answer"],
    "preprocessor": [f"{EX}/preprocessors.py:asdiv_answer_sentence"],
    "filter": [f"{EX}/filters.py:no_shouting", "examples.components.filters:short_prompts"],
    "chat_template": [f"{EX}/templates.py:CHATML_MATH", f"{EX}/templates.py:chatml_math"],
    "reward": [f"{EX}/rewards.py:correct_answer", "examples.components.rewards:brevity"],
}


def example(kind, name):
    """An example component, loaded the way a stage loads it."""
    files = {"metric": "metrics", "reward": "rewards", "chat_template": "templates"}
    return comp.load_component(kind, f"{EX}/{files[kind]}.py:{name}", "k", ("answer",) if kind == "reward" else ())


def read_jsonl(path):
    return [json.loads(x) for x in open(path, encoding="utf-8")]


# ----------------------------------------------------------------------------- the loader

def test_registry_documents_every_kind():
    assert set(comp.KINDS) == set(EXAMPLES)
    text = comp.describe()
    for k in comp.KINDS.values():
        assert k.signature and len(k.doc) > 40 and f"{k.name}: {k.signature}" in text
    readme = (PROJECT_ROOT / EX / "README.md").read_text(encoding="utf-8").replace("\\|", "|")
    for k in comp.KINDS.values():  # the examples' README states every signature as the registry does
        assert k.signature in readme, k.name


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_every_example_loads_as_its_kind(kind):
    provides = ("answer", "question") if kind == "reward" else ()
    for spec in EXAMPLES[kind]:
        obj = comp.load_component(kind, spec, "k", provides)
        if kind == "chat_template":
            assert isinstance(obj, str) and "<|im_start|>" in obj
        else:
            assert callable(obj)
    # the file and the module spelling give the same object (one module, imported once)
    a = comp.load_component("filter", f"{EX}/filters.py:no_shouting", "k")
    assert a is comp.load_component("filter", f"{EX}/filters.py:no_shouting", "k")


def _err(kind, spec, key="data.filter", provides=()):
    with pytest.raises(ConfigError) as e:
        comp.load_component(kind, spec, key, provides)
    msg = str(e.value)
    assert f"key '{key}'" in msg and repr(spec) in msg and comp.KINDS[kind].signature in msg, msg
    return msg


def test_every_failure_names_key_path_and_signature(tmp_path):
    assert "module 'no_such_module_xyz' not found" in _err("filter", "no_such_module_xyz:keep")
    assert "not found" in _err("filter", f"{EX}/no_such_file.py:keep")
    msg = _err("filter", f"{EX}/filters.py:keep_long")
    assert "has no attribute 'keep_long'" in msg and "no_shouting" in msg  # lists what is there
    assert "cannot be called as f(<1>)" in _err("filter", f"{EX}/metrics.py:relative_closeness")
    assert "unexpected keyword argument 'num_items_in_batch'" in _err(
        "loss", f"{EX}/metrics.py:relative_closeness", "loss")
    assert "not callable" in _err("filter", f"{EX}/losses.py:IGNORE_INDEX")
    assert "is a class" in _err("filter", "collections:Counter")
    assert "not a dotted path" in _err("filter", "json")
    # a reward must take **kwargs (TRL passes every dataset column) and may only require what is given
    assert "missing a required argument: 'prediction'" in _err(
        "reward", f"{EX}/metrics.py:relative_closeness", "math.rewards")
    no_kw = tmp_path / "no_kwargs.py"
    no_kw.write_text("def reward(prompts, completions):\n    return [0.0 for _ in completions]\n")
    assert "no **kwargs" in _err("reward", f"{no_kw}:reward", "math.rewards")
    assert comp.load_component("reward", f"{EX}/rewards.py:correct_answer", "k", ("answer", "question"))
    assert "missing a required argument: 'answer'" in _err("reward", f"{EX}/rewards.py:correct_answer")
    # the template kind: a str, or a zero-argument callable returning one, that Jinja parses
    assert "cannot be called as f()" in _err("chat_template", f"{EX}/losses.py:focal_loss", "chat_template")
    bad = tmp_path / "bad_components.py"
    bad.write_text("import math\n\nBROKEN = '{% for m in messages %}{{ m }}'\n\n"
                   "def not_text():\n    return 42\n\n\ndef boom():\n    return 1 / 0\n")
    assert "not a valid Jinja template" in _err("chat_template", f"{bad}:BROKEN", "chat_template")
    assert "not a str" in _err("chat_template", f"{bad}:not_text", "chat_template")
    assert f"ZeroDivisionError: division by zero (at {bad}:10)" in _err("chat_template", f"{bad}:boom", "chat_template")
    raising = tmp_path / "raising.py"
    raising.write_text("x = 1\nraise RuntimeError('no GPU here')\n")
    assert f"importing {raising} raised RuntimeError: no GPU here (at {raising}:2)" in _err("metric", f"{raising}:f")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n    pass\n")
    assert "SyntaxError" in _err("metric", f"{broken}:f") and f"{broken}:1" in _err("metric", f"{broken}:f")
    nested = tmp_path / "nested_import.py"
    nested.write_text("import not_installed_pkg_xyz\n")
    msg = _err("metric", f"{nested}:f")
    assert "ModuleNotFoundError" in msg and "not_installed_pkg_xyz" in msg
    with pytest.raises(ConfigError, match=r"key 'm\[1\]'.*a second metric named 'relative_closeness'"):
        comp.load_components("metric", [f"{EX}/metrics.py:relative_closeness"] * 2, "m")


def test_runtime_results_are_checked():
    assert comp.check_score("metric", "m", True) == 1.0
    with pytest.raises(comp.ComponentError, match="metric 'm' returned 'x'; expected a number"):
        comp.check_score("metric", "m", "x")
    with pytest.raises(comp.ComponentError, match="expected a finite number"):
        comp.check_score("metric", "m", float("nan"))
    assert comp.check_rewards("r", [1, None, 0.5], 3) == [1.0, None, 0.5]
    with pytest.raises(comp.ComponentError, match="reward 'r' returned 2 values for 3 completions"):
        comp.check_rewards("r", [1, 2], 3)


# ----------------------------------------------------------------------------- before any model loads

BAD = f"{EX}/metrics.py:relative_closeness"  # a metric: the wrong signature for a filter


@pytest.mark.parametrize("schema,config,override,key", [
    ("corpus", "configs/data/corpus.yaml", f"filters.keep=[{BAD}]", "filters.keep[0]"),
    ("sft_data", "configs/data/sft.yaml", f"keep=[{BAD}]", "keep[0]"),
    ("sft_data", "configs/data/sft.yaml", f"sources.asdiv.preprocess=[{EX}/preprocessors.py:nope]",
     "sources.asdiv.preprocess[0]"),
    ("tokenize_sft", "configs/data/tokenize_sft.yaml", f"chat_template={EX}/nowhere.py:T", "chat_template"),
    ("eval", "configs/eval/default.yaml", "math.metrics=[no_such_module_xyz:m]", "math.metrics[0]"),
    ("eval", "configs/eval/default.yaml", f"math.rewards=[{BAD}]", "math.rewards[0]"),
])
def test_config_validation_fails_on_a_wrong_component(schema, config, override, key):
    from forgelab.cli import schema as schema_of
    with pytest.raises(ConfigError, match=re.escape(f"key '{key}'")) as e:
        cfg.load(schema_of(schema), [PROJECT_ROOT / config], [override])
    assert override.split("=", 1)[1].strip("[]") in str(e.value)


def test_scripts_refuse_a_wrong_component_without_loading_torch(tmp_path):
    """The config error comes from validation (exit 2, one line), with neither torch nor
    transformers imported, and no run directory made."""
    code = ("import sys\nfrom forgelab import config as cfg\nfrom forgelab.eval.config import EvalConfig\n"
            "from forgelab.data.sft_dataset import SFTDataConfig\n"
            "cfg.load(EvalConfig, [], ['math.rewards=[examples/components/rewards.py:correct_answer]',"
            " 'math.metrics=[examples.components.metrics:relative_closeness]'])\n"
            "cfg.load(SFTDataConfig, ['configs/data/sft.yaml'], ['keep=[examples/components/filters.py:short_prompts]',"
            " 'sources.asdiv.preprocess=[examples/components/preprocessors.py:asdiv_answer_sentence]'])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    env = dict(os.environ, FORGELAB_RUNS_DIR=str(tmp_path / "runs"))
    r = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # rewards.py imports forgelab.eval.answers (stdlib only): validating loads neither torch nor transformers
    assert r.stdout.strip() == "[]", r.stdout
    r = subprocess.run([sys.executable, "scripts/09_eval.py", "--run-name", "bad-metric",
                        "--set", f"math.metrics=[{EX}/metrics.py:closeness]"],
                       cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"config error: key 'math.metrics[0]': metric '{EX}/metrics.py:closeness': {EX}/metrics.py has no "
        f"attribute 'closeness' (it has: Fraction, extract_answer, relative_closeness, states_an_answer); "
        f"expected {comp.KINDS['metric'].signature}")
    assert not (tmp_path / "runs" / "eval" / "bad-metric").exists()


# ----------------------------------------------------------------------------- filter: CPT corpus

def test_filter_in_the_cpt_corpus_stage(tmp_path, raw_data):
    from forgelab.data.corpus import REASONS, CorpusConfig, build_corpus, format_summary

    rows = [json.loads(x) for x in open(raw_data["kjv"], encoding="utf-8")]
    keep = [r for r in rows if r["book"] == "Genesis" and r["chapter"] <= 6]
    shout = [dict(r, book="Shout", text=r["text"].upper()) for r in rows if r["book"] == "Genesis" and r["chapter"] == 7]
    src = tmp_path / "kjv.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in keep + shout), encoding="utf-8")
    data = {"sources": [{"name": "kjv", "path": str(src), "group_by": ["book", "chapter"],
                         "title": "{book} {chapter}", "join": " "}],
            "out_dir": str(tmp_path / "out"), "mix": {"target": 0}, "heldout_fraction": 0.0,
            "filters": {"keep": [f"{EX}/filters.py:no_shouting"]}}
    s = build_corpus(cfg.build(CorpusConfig, data), LOG)
    assert s["sources"]["kjv"]["documents"] == 7
    assert s["dropped"]["no_shouting"] == s["sources"]["kjv"]["dropped"]["no_shouting"] == 1
    assert list(s["dropped"]) == list(REASONS[:6]) + ["no_shouting"] + list(REASONS[6:])
    assert "no_shouting" in format_summary(s).splitlines()[0]
    out = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert len(out) == 6 and not any(d["text"].startswith("Shout") for d in out)
    assert set(s["components"]) == {f"{EX}/filters.py:no_shouting"}
    # without the filter: the upper-case chapter stays, and the summary has only the built-in reasons
    del data["filters"]
    s0 = build_corpus(cfg.build(CorpusConfig, data), LOG)
    assert list(s0["dropped"]) == list(REASONS) and "components" not in s0
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 7


# ----------------------------------------------------------------------------- preprocessor + filter: SFT

def test_preprocessor_and_filter_in_the_sft_stage(tmp_path, raw_data):
    from forgelab.data.sft_dataset import SFTDataConfig, build_sft_dataset
    from forgelab.eval.answers import asdiv_gold

    pre, keep = f"{EX}/preprocessors.py:asdiv_answer_sentence", "examples.components.filters:short_prompts"
    conf = cfg.load(SFTDataConfig, [PROJECT_ROOT / "configs/data/sft.yaml"],
                    ["use=[asdiv]", f"out_dir={tmp_path / 'out'}", f"sources.asdiv.preprocess=[{pre}]",
                     f"keep=[{keep}]"])
    with Run("sft_data", conf, run_name=f"components-{tmp_path.name}") as run:
        s = build_sft_dataset(conf, run)
    raw = read_jsonl(raw_data["asdiv"])
    numeric = [r for r in raw if asdiv_gold(r["answer"].strip()) is not None]
    long_ = [r for r in numeric if len(f"{r['passage'].strip()} {r['question'].strip()}".split()) > 60]
    src = s["sources"]["asdiv"]
    assert src["records"] == 2305 and src["dropped_by_preprocessor"] == {"asdiv_answer_sentence": 2305 - len(numeric)}
    assert src["dropped_by_filter"] == {"short_prompts": len(long_)} and len(long_) > 0
    assert s["dropped_by_preprocessor"] == {"asdiv_answer_sentence": 212}
    assert s["dropped_by_filter"] == {"short_prompts": len(long_)}
    assert src["converted"] == len(numeric) - len(long_) and s["bad_records"] == 0
    rows = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "val.jsonl")
    assert len(rows) == src["converted"] - src["duplicates"]
    answers = {f"The answer is {r['answer'].strip()}." for r in numeric}
    for r in rows:
        assert r["messages"][-1]["content"] in answers
        assert len(r["messages"][0]["content"].split()) <= 60
    assert set(s["components"]) == {pre, keep} and all(len(v) == 16 for v in s["components"].values())


def test_sft_stage_without_components_is_unchanged(tmp_path, raw_data):
    from forgelab.data.sft_dataset import SFTDataConfig, build_sft_dataset

    conf = cfg.load(SFTDataConfig, [PROJECT_ROOT / "configs/data/sft.yaml"], ["use=[asdiv#50]", f"out_dir={tmp_path}"])
    with Run("sft_data", conf, run_name=f"plain-{tmp_path.name}") as run:
        s = build_sft_dataset(conf, run)
    assert not {"dropped_by_preprocessor", "dropped_by_filter", "components"} & set(s)
    assert not {"dropped_by_preprocessor", "dropped_by_filter"} & set(s["sources"]["asdiv#50"])


# ----------------------------------------------------------------------------- chat template: SFT tokenization

def test_chat_template_travels_into_the_store_and_the_fingerprints(tmp_path, raw_data, smollm2_dir):
    from transformers import AutoTokenizer

    from forgelab.data.sft_store import IGNORE_INDEX, SFTDataset
    from forgelab.data.tokenize_sft import TokenizeSFTConfig, tokenize_sft, tokenize_split
    from forgelab.model.tokenizer_info import tokenizer_fingerprint
    from forgelab.runs import fingerprint_paths

    CHATML_MATH = example("chat_template", "CHATML_MATH")

    clean = tmp_path / "clean"
    clean.mkdir()
    asdiv = read_jsonl(raw_data["asdiv"])[:40]
    convs = [[{"role": "user", "content": f"{r['passage'].strip()} {r['question'].strip()}"},
              {"role": "assistant", "content": r["answer"].strip()}] for r in asdiv]
    for split, part in (("train", convs[:30]), ("val", convs[30:])):
        (clean / f"{split}.jsonl").write_text("".join(json.dumps({"id": str(i), "source": "asdiv", "messages": m}) + "\n"
                                                      for i, m in enumerate(part)))

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = [f"tokenizer={smollm2_dir}", f"data_dir={clean}"]
    plain_conf = cfg.load(TokenizeSFTConfig, [PROJECT_ROOT / "configs/data/tokenize_sft.yaml"],
                          base + [f"out_dir={tmp_path / 'plain'}"])
    tokenize_split(plain_conf, tok, clean / "train.jsonl", tmp_path / "plain" / "train", LOG)
    plain = SFTDataset(tmp_path / "plain" / "train")
    spec = f"{EX}/templates.py:chatml_math"
    conf = cfg.load(TokenizeSFTConfig, [PROJECT_ROOT / "configs/data/tokenize_sft.yaml"],
                    base + [f"out_dir={tmp_path / 'tmpl'}", f"chat_template={spec}"])
    with Run("tokenize_sft", conf, run_name=f"tmpl-{tmp_path.name}") as run:  # the whole stage, as 05 runs it
        tokenize_sft(conf, run)
    summary = json.loads((run.dir / "summary.json").read_text())
    ds = SFTDataset(tmp_path / "tmpl" / "train")
    meta = ds.meta
    assert "chat_template" not in plain.meta
    assert meta["chat_template"]["path"] == spec and meta["chat_template"]["template"] == CHATML_MATH
    base_fp = tokenizer_fingerprint(smollm2_dir)
    assert plain.meta["tokenizer_fingerprint"] == meta["chat_template"]["base_tokenizer_fingerprint"] == base_fp
    assert meta["tokenizer_fingerprint"] != base_fp and meta["data_fingerprint"] != plain.meta["data_fingerprint"]
    assert summary["fingerprint"]["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]
    assert summary["fingerprint"]["data_fingerprint"] != fingerprint_paths([clean / "train.jsonl", clean / "val.jsonl"])
    # the tokens were rendered with the plug-in template: its system prompt opens every sample,
    # and labels still cover only the assistant answer and its end token
    row = ds[0]
    pos = row["position_ids"].tolist()
    end = pos.index(0, 1) if 0 in pos[1:] else len(pos)
    text = tok.decode(row["input_ids"][:end])
    assert text.startswith("<|im_start|>system\nYou solve math word problems. End with: The answer is N.<|im_end|>\n")
    labelled = [t for t, lab in zip(row["input_ids"][:end].tolist(), row["labels"][:end].tolist()) if lab != IGNORE_INDEX]
    assert tok.decode(labelled).endswith("<|im_end|>") and "system" not in tok.decode(labelled)
    assert meta["content_sha256"] != plain.meta["content_sha256"]
    assert not tok.decode(plain[0]["input_ids"]).startswith("<|im_start|>system\nYou solve math")
    # what training must do: set the store's template on the tokenizer it saves with the model;
    # that saved directory then has exactly the store's tokenizer fingerprint
    tok.chat_template = meta["chat_template"]["template"]
    tok.save_pretrained(tmp_path / "trained-model")
    assert tokenizer_fingerprint(tmp_path / "trained-model") == meta["tokenizer_fingerprint"]
    assert AutoTokenizer.from_pretrained(tmp_path / "trained-model").chat_template == CHATML_MATH


# ----------------------------------------------------------------------------- metric + reward: eval

def test_example_metrics_and_rewards_on_known_texts():
    closeness, states = example("metric", "relative_closeness"), example("metric", "states_an_answer")
    assert closeness("so the answer is 9.", "9") == 1.0
    assert closeness("The answer is 12", "10") == pytest.approx(0.8)
    assert closeness("no idea", "10") == 0.0
    assert states("#### 3", "3") == 1.0 and states("3", "3") == 0.0
    correct, brevity = example("reward", "correct_answer"), example("reward", "brevity")
    assert correct(prompts=["p", "p"], completions=["The answer is 9.", "#### 8"], answer=["9", "9"]) == [1.0, 0.0]
    assert brevity(prompts=["p"], completions=["one two"], answer=["2"]) == [0.99]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch

    from forgelab.eval.config import RuntimeConfig
    from forgelab.eval.runtime import load_model
    torch.set_num_threads(1)
    return load_model("tiny", str(tiny_model_dir), RuntimeConfig(device="cpu", batch_size=4))


def test_metrics_and_rewards_in_the_eval_math_task(tiny, raw_data):
    from forgelab.eval import gsm
    from forgelab.eval.config import EvalConfig, RuntimeConfig

    c = cfg.load(EvalConfig, [], [f"math.datasets=[{{name: asdiv, path: {raw_data['asdiv']}, format: asdiv}}]",
                                  "math.shots=1", "math.limit=4", "math.fewshot_paths=[]", "math.max_new_tokens=10",
                                  f"math.metrics=[{EX}/metrics.py:relative_closeness, "
                                  "examples.components.metrics:states_an_answer]",
                                  f"math.rewards=[{EX}/rewards.py:correct_answer, {EX}/rewards.py:brevity]"])
    ds = c.math.datasets[0]
    prep = gsm.prepare(c.math, ds)
    res = gsm.evaluate(tiny, c.math, ds, RuntimeConfig(device="cpu", batch_size=4), prep)
    recs = res["records"]
    assert res["n"] == 4 and set(res["metrics"]) == {"relative_closeness", "states_an_answer"}
    for r in recs:
        assert r["metrics"]["relative_closeness"] == example("metric", "relative_closeness")(r["response"], r["gold"])
        assert r["metrics"]["states_an_answer"] == example("metric", "states_an_answer")(r["response"], r["gold"])
        assert r["rewards"]["correct_answer"] == float(r["correct"])  # same extraction as exact match
        assert r["rewards"]["brevity"] == example("reward", "brevity")(prompts=[], completions=[r["response"]])[0]
    assert res["metrics"]["relative_closeness"] == {
        "mean": pytest.approx(sum(r["metrics"]["relative_closeness"] for r in recs) / 4), "n": 4}
    assert res["rewards"]["correct_answer"] == {"mean": pytest.approx(res["exact_match"]), "n": 4}
    # without plug-ins the result has exactly the keys it always had
    plain = cfg.load(EvalConfig, [], [f"math.datasets=[{{name: asdiv, path: {raw_data['asdiv']}, format: asdiv}}]",
                                      "math.shots=1", "math.limit=1", "math.fewshot_paths=[]", "math.max_new_tokens=4"])
    r0 = gsm.evaluate(tiny, plain.math, ds, RuntimeConfig(device="cpu", batch_size=1), gsm.prepare(plain.math, ds))
    assert "metrics" not in r0 and "rewards" not in r0 and "metrics" not in r0["records"][0]


@pytest.mark.slow
def test_eval_script_reports_metrics_and_rewards(tiny_model_dir, raw_data, tmp_path):
    report_md = tmp_path / "eval.md"
    runs = tmp_path / "runs"
    cmd = [sys.executable, "scripts/09_eval.py", "--run-name", "plugins", "--report", str(report_md),
           "--set", f"models=[{{name: tiny, path: {tiny_model_dir}}}]", "--set", "tasks=[math]",
           "--set", "math.limit=3", "--set", "math.shots=0", "--set", "math.max_new_tokens=8",
           "--set", "math.exclude_paths=[]",
           "--set", f"math.metrics=[{EX}/metrics.py:relative_closeness]",
           "--set", "math.rewards=[examples.components.rewards:correct_answer]", "--set", "runtime.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", FORGELAB_RUNS_DIR=str(runs))
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((runs / "eval" / "plugins" / "summary.json").read_text())
    res = s["models"]["tiny"]["results"]["math"]["asdiv"]
    assert res["metrics"]["relative_closeness"]["n"] == 3 and res["rewards"]["correct_answer"]["n"] == 3
    prot = s["protocol"]["math"]
    assert prot["metrics"]["relative_closeness"]["path"] == f"{EX}/metrics.py:relative_closeness"
    assert prot["rewards"]["correct_answer"]["sha256"] == comp.component_fingerprints(
        ["examples.components.rewards:correct_answer"])["examples.components.rewards:correct_answer"]
    md = report_md.read_text()
    mean = res["metrics"]["relative_closeness"]["mean"]
    assert f"|   math asdiv, metric relative_closeness (mean over 3 problems) | {mean:.3f} |" in md
    assert "reward correct_answer" in md and "Math plug-ins" in md
    table = json.loads(report_md.with_suffix(".json").read_text())["table"]
    assert {r["key"] for r in table} >= {"math.asdiv.metrics.relative_closeness", "math.asdiv.rewards.correct_answer"}


# ----------------------------------------------------------------------------- loss: as Trainer calls it

@pytest.fixture(scope="module")
def tiny_batch(tiny_model_dir):
    """Real KJV verses through SmolLM2's tokenizer, padded, the first tokens and padding -100."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(x)["text"] for _, x in zip(range(3), open(project_path("data/raw/kjv/kjv.jsonl")))]
    enc = tok(rows, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, :4] = -100  # a prompt that is not learned
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, dict(enc), labels


def test_focal_loss_equals_cross_entropy_at_gamma_0(tiny_batch):
    import torch
    import torch.nn.functional as F

    model, enc, labels = tiny_batch
    loss_fn = comp.load_component("loss", f"{EX}/losses.py:focal_loss", "loss")
    with torch.no_grad():
        out = model(**enc)
        ref = model(**enc, labels=labels).loss  # transformers' own causal-LM loss
    logits, target = out.logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    ce0 = functools.partial(loss_fn, gamma=0.0)
    assert ce0(out, labels).item() == pytest.approx(ce.item(), rel=1e-5)
    assert ce0(out, labels).item() == pytest.approx(ref.item(), rel=1e-5)
    n = int((target != -100).sum())
    # num_items_in_batch (labelled tokens over the accumulated batch): the sum divided by it
    assert ce0(out, labels, num_items_in_batch=torch.tensor(2 * n)).item() == pytest.approx(ce.item() / 2, rel=1e-5)
    focal = loss_fn(out, labels).item()
    assert 0 < focal < ce.item()  # (1 - p)^2 < 1 down-weights every token
    g1 = comp.load_component("loss", "examples.components.losses:focal_loss_g1", "loss")
    assert focal < g1(out, labels).item() < ce.item()


def test_focal_loss_through_transformers_trainer(tiny_batch, tmp_path):
    """Trainer(compute_loss_func=...) calls the loss with (outputs, labels, num_items_in_batch=);
    at gamma 0 it gives Trainer's stock loss."""
    import torch
    from transformers import Trainer, TrainingArguments

    model, enc, labels = tiny_batch
    focal0 = functools.partial(comp.load_component("loss", f"{EX}/losses.py:focal_loss", "loss"), gamma=0.0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    stock = Trainer(model=model, args=args)
    plug = Trainer(model=model, args=args, compute_loss_func=focal0)
    n = torch.tensor(int((labels[:, 1:] != -100).sum()))
    with torch.no_grad():
        for kw in ({}, {"num_items_in_batch": n}):
            a = stock.compute_loss(model, {**enc, "labels": labels.clone()}, **kw)
            b = plug.compute_loss(model, {**enc, "labels": labels.clone()}, **kw)
            assert b.item() == pytest.approx(a.item(), rel=1e-5)
