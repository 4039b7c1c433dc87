"""The merge check on a tiny real model and a real LoRA adapter with non-zero weights: the merged
dir reproduces the PEFT model's logits and is published only when it does; a changed adapter or
an impossible threshold fails (scripts/mutation.py, area merge)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from forgelab import config as cfg
from forgelab import manifest
from forgelab.config import ConfigError, RunError
from forgelab.runs import sha256_file
from forgelab.train import merge as mg

LOG = logging.getLogger("test_merge_guards")
WORDS = ["the", "earth", "was", "without", "form", "and", "void", "light", "day", "night", "God", "saw"]
PROMPTS = ["the earth was without form", "God saw the light and day"]
CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def _tokenizer(bos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<user>", "<assistant>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:  # a tokenizer that adds <s>: the check must not let it into the prompts
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(base dir, adapter dir): a 1-layer Llama and a LoRA adapter on it whose B is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("merge-parts")
    tok = _tokenizer()
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       bos_token_id=2, eos_token_id=3, pad_token_id=1)
    base = root / "base"
    LlamaForCausalLM(conf).save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    ac = json.loads((adapter / "adapter_config.json").read_text())
    ac["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(ac))
    return base, adapter


def _conf(adapter, out, **kw) -> mg.MergeConfig:
    return cfg.build(mg.MergeConfig, {"adapter": str(adapter), "output": str(out), "dtype": "float32",
                                      "prompts": PROMPTS, **kw})


def test_the_merged_dir_reproduces_the_adapter_and_records_the_check(parts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, adapter = parts
    out = tmp_path / "merged"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = mg.merge_lora(_conf(adapter, out, threads=1), LOG)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    rec = json.loads((out / mg.CHECK_FILE).read_text())
    assert rec["passed"] is True and rec["prompts"] == 2 and rec["threshold"] == 1e-4
    assert rec["check_dtype"] == "float64" and rec["saved_dtype"] == "float32"
    assert 0 <= rec["in_memory"] <= 1e-4 and 0 <= rec["saved"] <= 1e-4
    assert rec["max_abs_diff"] == max(rec["saved"], rec["in_memory"])
    assert rec["base_model"] == str(base) and rec["adapter"] == str(adapter)
    assert rec["adapter_sha256"] == sha256_file(adapter / "adapter_model.safetensors") and rec["checked_at"]
    assert res["output"] == str(out) and {k: res[k] for k in rec} == rec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging dir left
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    # the guarantee itself, measured independently: merged == base + adapter
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    assert res["params"] == sum(p.numel() for p in merged.parameters())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    ids = torch.tensor([[6, 7, 8, 9, 10]])
    with torch.no_grad():
        want, got, without = ref(input_ids=ids).logits, merged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-6 and (without - want).abs().max() > 1e-3  # the adapter matters


def test_an_impossible_threshold_fails_and_keeps_the_published_dir(parts, tmp_path):
    _, adapter = parts
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("the earlier merge")
    with pytest.raises(mg.MergeCheckError) as e:
        mg.merge_lora(_conf(adapter, out, max_abs_diff=0.0, check_dtype="float32"), LOG)
    assert str(e.value).startswith("merged logits differ from the PEFT model by ")
    assert str(e.value).endswith(" > max_abs_diff 0.0e+00 (in memory, float32)")
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_half_precision_weights_are_gated_by_the_merge_in_memory(parts, tmp_path):
    _, adapter = parts
    out = tmp_path / "m16"
    mg.merge_lora(_conf(adapter, out, dtype="bfloat16"), LOG)
    rec = json.loads((out / mg.CHECK_FILE).read_text())
    assert rec["saved_dtype"] == "bfloat16" and "saved" not in rec and rec["saved_half_precision"] > 0
    assert rec["max_abs_diff"] == rec["in_memory"] and rec["passed"] is True
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # the gate is "more than the threshold": a difference equal to it passes (the merge is deterministic)
    again = mg.merge_lora(_conf(adapter, tmp_path / "again", dtype="bfloat16", max_abs_diff=rec["in_memory"]), LOG)
    assert again["in_memory"] == rec["in_memory"] and again["passed"] is True


def test_verify_merge_passes_then_detects_a_changed_adapter(parts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    _, adapter = parts
    own = tmp_path / "adapter"
    shutil.copytree(adapter, own)
    out = tmp_path / "merged"
    mg.merge_lora(_conf(own, out, max_abs_diff=1e-3), LOG)
    res = mg.verify_merge(out, prompts=PROMPTS)
    assert res["merged"] == str(out) and res["adapter"] == str(own)
    assert res["threshold"] == 1e-3 and res["check_dtype"] == "float64" and res["max_abs_diff"] <= 1e-4
    assert mg.verify_merge(str(out), own, prompts=PROMPTS, threshold=1.0, check_dtype="float32")["threshold"] == 1.0
    f = own / "adapter_model.safetensors"
    w = load_file(f)
    for k in w:
        if "lora_B" in k:
            w[k] = w[k] * 3.0
    save_file(w, f)
    with pytest.raises(mg.MergeCheckError) as e:
        mg.verify_merge(out, prompts=PROMPTS)
    assert str(e.value).startswith(f"{out}: merged logits differ from the PEFT model by ")
    assert str(e.value).endswith(" > max_abs_diff 1.0e-03 on 2 prompts")


def test_verify_merge_needs_an_adapter(tmp_path):
    with pytest.raises(ConfigError) as e:
        mg.verify_merge(tmp_path)
    assert str(e.value) == (f"no adapter to verify {tmp_path} against (pass adapter; {tmp_path / mg.CHECK_FILE} "
                            "has none)")


def test_a_corrupt_adapter_is_refused_before_merging(parts, tmp_path):
    import shutil
    _, adapter = parts
    own = tmp_path / "adapter"
    shutil.copytree(adapter, own)
    manifest.write_manifest(own)
    (own / "adapter_config.json").write_text("{}")
    with pytest.raises(RunError, match="adapter .* does not match its forgelab_manifest.json"):
        mg.merge_lora(_conf(own, tmp_path / "out"), LOG)
    assert not (tmp_path / "out").exists()


def test_a_base_without_generation_config_gets_one_from_the_tokenizer(parts, tmp_path):
    import shutil
    base, adapter = parts
    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)
    (own_base / "generation_config.json").unlink()
    out = tmp_path / "merged"
    mg.merge_lora(_conf(adapter, out, base_model=str(own_base)), LOG)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 3, 1)
    assert json.loads((out / mg.CHECK_FILE).read_text())["base_model"] == str(own_base)


def test_the_base_model_is_found_or_the_key_to_set_is_named(parts, tmp_path):
    base, adapter = parts
    assert mg.resolve_base(adapter, None) == base and mg.resolve_base(adapter, str(base)) == base
    with pytest.raises(ConfigError) as e:
        mg.resolve_base(tmp_path, None)
    assert str(e.value) == f"key 'adapter': {tmp_path / 'adapter_config.json'} not found (not a peft adapter dir)"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2}))
    with pytest.raises(ConfigError) as e:
        mg.resolve_base(tmp_path, None)
    assert str(e.value) == f"{tmp_path / 'adapter_config.json'}: no base_model_name_or_path; set key 'base_model'"
    with pytest.raises(ConfigError) as e:
        mg.resolve_base(tmp_path, str(tmp_path / "nobase"))
    assert str(e.value) == f"base model {tmp_path / 'nobase'} has no config.json (set key 'base_model')"


def test_the_tokenizer_comes_from_the_adapter_when_training_saved_it_there(parts, tmp_path):
    base, adapter = parts
    assert mg._tokenizer_source(adapter, base) == base
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert mg._tokenizer_source(tmp_path, base) == tmp_path


def test_prompts_are_rendered_with_the_chat_template_and_scored_without_added_tokens(parts):
    from transformers import AutoModelForCausalLM
    base, _ = parts
    tok = _tokenizer()
    assert mg.render_prompts(tok, PROMPTS) == PROMPTS
    tok.chat_template = CHAT
    assert mg.render_prompts(tok, ["the day"]) == ["<user> the day <assistant>"]
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    logits = mg.prompt_logits(model, tok, ["the earth was", "night"])
    assert [x.shape for x in logits] == [(1, 3, len(tok)), (1, 1, len(tok))]  # no <s> added
    assert all(x.dtype == torch.float64 for x in logits)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([[6, 7, 8]])).logits.double()
    assert torch.equal(logits[0], want)
    other = [x + 0.5 for x in logits]
    other[1][0, 0, 3] += 2.0
    assert mg.max_abs_diff(logits, other) == pytest.approx(2.5)
    assert mg.max_abs_diff(logits, logits) == 0.0


def test_dtypes_are_read_from_the_name_or_the_base_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert mg._dtype("auto", tmp_path) is torch.bfloat16 and mg._dtype("float16", tmp_path) is torch.float16
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert mg._dtype("auto", tmp_path) is torch.float16
    (tmp_path / "config.json").write_text("{}")
    assert mg._dtype("auto", tmp_path) is torch.float32 and mg._dtype("float32", tmp_path) is torch.float32
    assert mg._check_dtype("float64") is torch.float64 and mg._check_dtype("float32") is torch.float32


def test_merge_config_refuses_no_prompts_and_a_negative_threshold():
    with pytest.raises(ConfigError) as e:
        cfg.build(mg.MergeConfig, {"prompts": []})
    assert str(e.value) == "key 'prompts' is empty: the merge check needs at least one prompt"
    with pytest.raises(ConfigError) as e:
        cfg.build(mg.MergeConfig, {"max_abs_diff": -1e-9})
    assert str(e.value) == "key 'max_abs_diff' must be >= 0, got -1e-09"
    assert cfg.build(mg.MergeConfig, {"max_abs_diff": 0}).max_abs_diff == 0.0


def test_the_reference_and_the_reload_are_evaluated_in_the_check_dtype(parts, tmp_path):
    from transformers import AutoModelForCausalLM
    base, adapter = parts
    tok = _tokenizer()
    ref_model, ref = mg.peft_reference(base, adapter, PROMPTS, tok)  # float64 unless told
    params = list(ref_model.parameters())
    assert {p.dtype for p in params} == {torch.float64} and not any(p.requires_grad for p in params)
    assert all(x.dtype == torch.float64 for x in ref)
    assert {p.dtype for p in mg.peft_reference(base, adapter, PROMPTS, tok, "float32")[0].parameters()} == \
        {torch.float32}
    # a saved dir checked against its own float64 logits differs by exactly 0, which a 0 threshold accepts
    own = mg.prompt_logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval(), tok, PROMPTS)
    assert mg.verify_merged(base, own, tok, PROMPTS, 0.0) == 0.0
    res = mg.merge_lora(_conf(adapter, tmp_path / "m"), LOG)
    assert res["in_memory"] < 1e-9  # both sides in float64: only the merge's own rounding is left


def test_verify_merge_follows_the_record_of_the_merge(parts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    base, adapter = parts
    own_base = tmp_path / "base"  # another base than the adapter names: the record says which
    shutil.copytree(base, own_base)
    w = load_file(own_base / "model.safetensors")
    key = next(k for k in w if "q_proj" in k)
    w[key] = w[key] + 0.5
    save_file(w, own_base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    mg.merge_lora(_conf(adapter, out, base_model=str(own_base), check_dtype="float32"), LOG)
    res = mg.verify_merge(out, prompts=PROMPTS)
    assert res["check_dtype"] == "float32" and res["max_abs_diff"] <= 1e-4
    saved = json.loads((out / mg.CHECK_FILE).read_text())["saved"]
    assert res["max_abs_diff"] == saved  # the re-check measures what the merge measured, in float32 both times
    tok = _tokenizer()
    _, ref32 = mg.peft_reference(own_base, adapter, PROMPTS, tok, "float32")
    assert saved == mg.verify_merged(out, ref32, tok, PROMPTS, float("inf"), "float32")
    rec_file = out / mg.CHECK_FILE
    rec = json.loads(rec_file.read_text())
    del rec["threshold"], rec["check_dtype"]  # a record of an older version: the defaults apply
    rec_file.write_text(json.dumps(rec))
    assert mg.verify_merge(out, prompts=PROMPTS)["check_dtype"] == "float64"
    assert mg.verify_merge(out, prompts=PROMPTS)["threshold"] == 1e-4
    shutil.copytree(adapter, tmp_path / "adapter")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    a = load_file(f)
    save_file({k: v * 1.05 if "lora_B" in k else v for k, v in a.items()}, f)
    rec["adapter"] = str(tmp_path / "adapter")
    rec_file.write_text(json.dumps(rec))
    with pytest.raises(mg.MergeCheckError, match="> max_abs_diff 1.0e-04 on 2 prompts"):
        mg.verify_merge(out, prompts=PROMPTS)


def test_a_passing_merge_replaces_the_published_dir_and_logs_what_it_checked(parts, tmp_path, caplog):
    base, adapter = parts
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("the earlier merge")
    stale = tmp_path / f"merged.tmp{os.getpid()}"  # left by a killed merge of this process id
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger=LOG.name):
        rec = mg.merge_lora(_conf(adapter, out, dtype="auto"), LOG)
    assert not (out / "previous.txt").exists() and not (out / "junk.bin").exists() and not stale.exists()
    assert rec["saved_dtype"] == "float32"  # auto: the base's own dtype
    msgs = caplog.messages
    assert msgs[0] == f"PEFT reference: {base} + {adapter} (float64, 2 prompts)"
    assert msgs[1] == f"merged in memory: max |diff| {rec['in_memory']:.3e}"


def test_half_precision_difference_is_measured_in_the_check_dtype(parts, tmp_path):
    _, adapter = parts
    out = tmp_path / "m16"
    rec = mg.merge_lora(_conf(adapter, out, dtype="bfloat16", check_dtype="float32"), LOG)
    tok = _tokenizer()
    _, ref = mg.peft_reference(mg.resolve_base(adapter, None), adapter, PROMPTS, tok, "float32")
    assert rec["saved_half_precision"] == mg.verify_merged(out, ref, tok, PROMPTS, float("inf"), "float32")


def test_an_adapter_saved_without_safetensors_has_no_sha_to_record(parts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, adapter = parts
    binary = tmp_path / "adapter-bin"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).save_pretrained(
        binary, safe_serialization=False)
    ac = json.loads((binary / "adapter_config.json").read_text())
    ac["base_model_name_or_path"] = str(base)
    (binary / "adapter_config.json").write_text(json.dumps(ac))
    assert not (binary / "adapter_model.safetensors").exists()
    rec = mg.merge_lora(_conf(binary, tmp_path / "m"), LOG)
    assert rec["adapter_sha256"] is None and rec["passed"] is True
