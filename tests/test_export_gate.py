"""Stage 13 end to end on a tiny model: a real LoRA adapter merged (stage 08), exported to every
format the CPU supports (GGUF F16 / Q8_0 / Q4_0 / Q4_1 through the gguf package, Q4_K_M
through llama.cpp's quantizer, the FishAI / INT8 / FP16 mixed format), each reloaded and gated
against base + adapter under every server that runs it (in-process, `transformers serve`, vLLM,
llama.cpp); then a refusal (nothing published, the diverging stage named) and corrupt files
refused at load."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from forgelab import config as cfg
from forgelab.config import RunError
from forgelab.export import gate as G
from forgelab.export.config import SERVERS_FOR, Deliverable, ExportConfig, Tolerances
from forgelab.runs import PROJECT_ROOT

pytestmark = pytest.mark.slow

DELIVERABLES = [
    {"name": "merged", "format": "hf"},
    {"name": "f16", "format": "gguf", "qtype": "F16"},
    {"name": "q8_0", "format": "gguf", "qtype": "Q8_0"},
    {"name": "q4_0", "format": "gguf", "qtype": "Q4_0"},
    {"name": "q4_k_m", "format": "gguf", "qtype": "Q4_K_M"},
    {"name": "fishai", "format": "mixed", "qtype": "fishai"},
    {"name": "int8", "format": "mixed", "qtype": "int8"},
]
VLLM_SETS = ["vllm.max_num_seqs=8", "vllm.env={VLLM_ENABLE_V1_MULTIPROCESSING: '0'}",
             "vllm.extra_args=[--distributed-executor-backend, uni]"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, raw_data, tmp_path_factory):
    """base (the tiny model) + a LoRA adapter trained on KJV verses + its merge (stage 08's code)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgelab.train.merge import MergeConfig, merge_lora
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    verses = [json.loads(x)["text"] for x in raw_data["kjv"].read_text(encoding="utf-8").splitlines()[:160]]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(20):  # enough that greedy decoding is not a coin toss between near-equal logits
        b = tok(verses[(step % 20) * 8:(step % 20 + 1) * 8], return_tensors="pt", padding=True,
                truncation=True, max_length=48)
        model(**b, labels=b.input_ids.masked_fill(b.attention_mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    root = tmp_path_factory.mktemp("export")
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(tiny_model_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(conf))
    merge_lora(cfg.build(MergeConfig, {"adapter": str(adapter), "output": str(root / "merged"), "dtype": "float32"}),
               __import__("logging").getLogger("test"))
    return root


def _export(root, *sets: str, run_name: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = root / f"{run_name}.md"
    cmd = [sys.executable, "scripts/13_export.py", "--run-name", run_name,
           "--set", f"model={root / 'merged'}", "--set", f"adapter={root / 'adapter'}",
           "--set", f"output_root={root / 'published'}", "--set", f"report={report}",
           "--set", "gate.max_new_tokens=16", "--set", "gate.perplexity.max_tokens=512",
           "--set", "gate.perplexity.max_length=128", "--set", "gate.perplexity.stride=96",
           "--set", "gate.math.limit=3", "--set", "gate.math.max_new_tokens=16",
           "--set", "gate.require_servers=true", "--set", "gate.server_threads=2",
           "--set", "gate.servers=[inprocess, transformers, vllm, llamacpp]",
           "--set", "gate.serve_overrides={vllm: " + json.dumps(VLLM_SETS) + "}", *sets]
    p = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1500)
    summary = json.loads(report.with_suffix(".json").read_text()) if report.with_suffix(".json").exists() else {}
    return p, summary


@pytest.fixture(scope="module")
def gated(trained, vllm_python, llamacpp_bin_dir):
    p, s = _export(trained, "--set", "deliverables=" + json.dumps(DELIVERABLES), "--set", "on_refusal=continue",
                   "--set", "gate.adapters=" + json.dumps({"sft": str(trained / "adapter")}), run_name="gate-all")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return trained, s, p


def test_every_format_under_every_server(gated):
    root, s, _ = gated
    by_name = {e["name"]: e for e in s["deliverables"]}
    assert list(by_name) == [d["name"] for d in DELIVERABLES]
    for e in s["deliverables"]:
        servers = [r["server"] for r in e["rows"]]
        assert servers == list(SERVERS_FOR[e["format"]]), e["name"]
        for r in e["rows"]:
            assert r["passed"] is not None, (e["name"], r)          # every server really ran
            # one chat template end to end: every deliverable under every server builds the reference's ids
            assert r["prompt_ids_equal"] == r["prompts"] == 6, (e["name"], r["server"])
    # the merged model is the trained one: identical greedy tokens everywhere it is served, and
    # in-process its log-probs match base + adapter to float32 noise
    for r in by_name["merged"]["rows"]:
        assert r["passed"] and r["greedy_identical"] == 6, r
    assert by_name["merged"]["rows"][0]["logprob_diff"]["max"] < 1e-4
    assert abs(by_name["merged"]["rows"][0]["ppl_rel"]) < 1e-5
    # every server that can score did (in-process, vLLM, llama.cpp); transformers serve cannot
    for e in s["deliverables"]:
        for r in e["rows"]:
            assert (r["ppl"] is None) == (r["server"] == "transformers"), (e["name"], r["server"])


def test_served_adapter_equals_peft(gated):
    _, s, _ = gated
    rows = {r["model"]: r for r in s["served_adapters"]}
    assert set(rows) == {"base", "sft"}
    for r in rows.values():  # vLLM with the adapter loaded at run time = PEFT, token for token
        assert r["passed"] and r["agree"] == r["prompts"] == 6, r
        assert r["max_abs_logprob_diff"] < 1e-3
    assert rows["sft"]["distinct"]  # the adapter changes the answers: the check can see a wrong one


def test_sizes_and_tolerance_classes(gated):
    _, s, _ = gated
    by = {e["name"]: e for e in s["deliverables"]}
    b = {k: by[k]["stats"]["bytes"] for k in by}
    assert b["q4_0"] < b["q8_0"] < b["f16"] < b["merged"]
    assert b["fishai"] < b["int8"] < b["merged"]
    assert [by[k]["tolerance"] for k in ("merged", "f16", "q8_0", "q4_k_m", "fishai", "int8")] == \
        ["exact", "exact", "int8", "int4", "int4", "int8"]
    # quantization moves the log-probabilities in order of bits (in-process rows measure the files
    # themselves); on this random tiny model the perplexity change is noise of either sign (1e-5),
    # so the size of the teacher-forced log-prob difference is what is ordered
    ppl = {k: by[k]["rows"][0]["ppl_rel"] for k in by}
    assert abs(ppl["f16"]) < 1e-3
    lp = {k: by[k]["rows"][0]["logprob_diff"]["mean"] for k in by}
    assert lp["merged"] < lp["f16"] < lp["q8_0"] < lp["q4_0"] and lp["int8"] < lp["fishai"]


def test_published_only_what_passed(gated):
    root, s, _ = gated
    pub = root / "published"
    for e in s["deliverables"]:
        if e["format"] == "hf":
            continue
        assert (pub / e["name"]).is_dir() == e["passed"], e
        if e["passed"]:
            assert (pub / e["name"] / "forgelab_manifest.json").is_file()
    assert not list(root.glob(".published.staging*"))  # staging removed
    gguf = pub / "q8_0"
    assert (gguf / "model.Q8_0.gguf").is_file() and "TEMPLATE" in (gguf / "Modelfile").read_text()
    report = (root / "gate-all.md").read_text()
    assert "| q4_k_m | llamacpp |" in report and "| merged | vllm |" in report


def test_refused_deliverable_is_not_published_and_names_the_stage(trained, llamacpp_bin_dir):
    # an impossible bound: the Q4_0 file itself is past it, so the export stage is to blame
    p, s = _export(trained, "--set", 'deliverables=[{name: q4_0, format: gguf, qtype: Q4_0}]',
                   "--set", "gate.tolerances.int4_ppl=-1.0", "--set", "gate.servers=[inprocess, llamacpp]",
                   "--set", "on_refusal=fail",
                   "--set", f"output_root={trained / 'refused'}", run_name="gate-refused")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "REFUSED" in p.stdout
    e = s["deliverables"][0]
    assert not e["passed"] and e["published"] is None
    assert e["diverged_at"].startswith("export")
    assert not (trained / "refused" / "q4_0").exists()


def test_corrupt_export_is_refused_at_load(gated):
    root, s, _ = gated
    from forgelab.export.stage import open_runner
    conf = cfg.build(ExportConfig, {"model": str(root / "merged"), "adapter": None})
    for d, f in ((Deliverable("q8_0", "gguf", "Q8_0"), "model.Q8_0.gguf"),
                 (Deliverable("fishai", "mixed", "fishai"), "model.quant.safetensors")):
        path = root / "published" / d.name
        if not path.is_dir():
            continue
        target = path / f
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        with pytest.raises(RunError, match=f):
            with open_runner(d, path, "inprocess", conf, {2}):
                pass


# ----------------------------------------------------------------------------- verdict logic

def _cmp(**kw):
    base = {"prompts": 2, "prompt_ids_equal": 2, "first_bad_prompt": None, "greedy_identical": 2,
            "first_divergence": [None, None], "ppl_rel": 0.0}
    return {**base, **kw}


def test_verdicts_and_diverging_stage():
    t = Tolerances()
    assert G.verdict("exact", _cmp(), t)[0]
    ok, why = G.verdict("exact", _cmp(greedy_identical=1, first_divergence=[None, 5]), t)
    assert not ok and "prompt 1 at token 5" in why
    assert not G.verdict("int8", _cmp(ppl_rel=0.006), t)[0] and G.verdict("int8", _cmp(ppl_rel=0.004), t)[0]
    assert not G.verdict("int4", _cmp(ppl_rel=0.06), t)[0] and G.verdict("int4", _cmp(ppl_rel=0.04), t)[0]
    ok, why = G.verdict("int4", _cmp(prompt_ids_equal=1, first_bad_prompt=0), t)
    assert not ok and "chat template" in why
    rows = [{"server": "inprocess", "passed": True, "why": ""}, {"server": "llamacpp", "passed": False, "why": "x"}]
    assert G.diverging_stage(rows).startswith("serving: llamacpp")
    rows[0]["passed"] = False
    assert G.diverging_stage(rows).startswith("export")
    rows[1]["why"] = "prompt ids differ (prompt 0): chat template or tokenizer"
    assert G.diverging_stage(rows).startswith("prompt")
    assert G.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert G.first_divergence([1, 2, 3], [1, 5, 3]) == 1 and G.first_divergence([1, 2], [1, 2, 3]) == 2


def test_config_refuses_a_server_that_cannot_run_the_format():
    with pytest.raises(cfg.ConfigError, match="cannot run format mixed"):
        cfg.build(ExportConfig, {"deliverables": [{"name": "x", "format": "mixed", "qtype": "fishai",
                                                   "servers": ["vllm"]}]})
    with pytest.raises(cfg.ConfigError, match="qtype"):
        cfg.build(ExportConfig, {"deliverables": [{"name": "x", "format": "gguf"}]})
