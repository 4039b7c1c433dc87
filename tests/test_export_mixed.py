"""The FishAI mixed-precision export (forgelab.export.mixed): INT4 packing is exact, each policy
assigns the scheme of its layer types, an export of the tiny model loads back within the
quantization bound, a corrupt, truncated, manifest-less or malformed export is refused naming
what is wrong, a failed export leaves nothing behind, and on the real SmolLM2 the perplexity of
each policy stays within measured bounds of the original."""
from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from forgelab.config import RunError
from forgelab.export import mixed
from forgelab.export.mixed import (META, POLICIES, WEIGHTS, dequantize_int4, dequantize_state_dict, export_mixed,
                                   layer_kind, load_mixed, pack_int4, quantize_int4, quantize_int8, scheme_for,
                                   unpack_int4)
from forgelab.manifest import NAME as MANIFEST, write_manifest

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void."


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two busy cores: one thread keeps these elementwise-heavy tests from oversubscribing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- packing, kinds, policies ------------------------------------------------------------------

def test_int4_pack_unpack_round_trip_is_exact():
    codes = torch.randint(0, 16, (5, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 128)
    assert torch.equal(unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    assert pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21  # element 0 in the low nibble


NAMES = {
    "model.embed_tokens.weight": "embedding",
    "model.norm.weight": "norm",
    "model.layers.0.input_layernorm.weight": "norm",
    "model.layers.0.post_attention_layernorm.weight": "norm",
    "model.layers.0.self_attn.q_norm.weight": "norm",  # Qwen3
    "lm_head.weight": "lm_head",
    "model.layers.3.self_attn.q_proj.weight": "q",
    "model.layers.3.self_attn.q_proj.bias": "q",  # Qwen2
    "model.layers.3.self_attn.k_proj.weight": "k",
    "model.layers.3.self_attn.v_proj.weight": "v",
    "model.layers.3.self_attn.o_proj.weight": "o",
    "model.layers.3.mlp.gate_proj.weight": "ffn",
    "model.layers.3.mlp.up_proj.weight": "ffn",
    "model.layers.3.mlp.down_proj.weight": "ffn",
    "model.layers.3.mlp.router.weight": "other",
}


def test_layer_kinds():
    assert {n: layer_kind(n) for n in NAMES} == NAMES


@pytest.mark.parametrize("policy,linear", [("fishai", None), ("int8", "int8"), ("int4", "int4"), ("fp16", "fp16")])
def test_policy_schemes(policy, linear):
    want = {"q": "int8", "k": "int8", "v": "int4", "o": "int4", "ffn": "int4"} if policy == "fishai" else \
        {k: linear for k in ("q", "k", "v", "o", "ffn")}
    for name, kind in NAMES.items():
        one_d = "norm" in name or name.endswith(".bias")
        got = scheme_for(name, (64,) if one_d else (64, 64), policy)
        assert got == (want[kind] if kind in want and not one_d else "fp16"), (policy, name)
    assert set(POLICIES) == {"fishai", "int8", "int4", "fp16"}
    assert all(set(p) == set(mixed.KINDS) for p in POLICIES.values())


def test_int4_padding_reconstruction_bound_and_clip_search():
    """An input dim of 200 (not a multiple of 128) pads the last group; without clipping every
    weight is within half a step of its group; clip search never has a larger group error."""
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(1)) * 0.05
    w[0, 7] = 0.6  # an outlier: the clip search has something to gain
    plain, clipped = quantize_int4(w, 128, clip_search=False), quantize_int4(w, 128, clip_search=True)
    assert plain["qweight"].shape == (16, 100) and plain["scale"].shape == (16, 2)  # padding not stored
    d = dequantize_int4(plain["qweight"], plain["scale"], plain["zero"], w.shape)
    assert d.shape == w.shape
    step = plain["scale"].float().repeat_interleave(128, dim=1)[:, :200]
    assert ((d - w).abs() <= step / 2 + 1e-7).all()

    def group_sse(q):
        e = (dequantize_int4(q["qweight"], q["scale"], q["zero"], w.shape) - w) ** 2
        return torch.nn.functional.pad(e, (0, 56)).reshape(16, 2, 128).sum(dim=2)
    assert (group_sse(clipped) <= group_sse(plain) * (1 + 1e-5) + 1e-12).all()
    assert group_sse(clipped).sum() < group_sse(plain).sum()

    q8, q8c = quantize_int8(w, clip_search=False), quantize_int8(w, clip_search=True)
    d8 = q8["qweight"].float() * q8["scale"].float()[:, None]
    assert ((d8 - w).abs() <= q8["scale"].float()[:, None] / 2 + 1e-7).all()
    d8c = q8c["qweight"].float() * q8c["scale"].float()[:, None]
    assert (((d8c - w) ** 2).sum(1) <= ((d8 - w) ** 2).sum(1) * (1 + 1e-5) + 1e-12).all()


# --- the tiny model ----------------------------------------------------------------------------

def _logits(model, tok, text=TEXT):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tok, _logits(model, tok)


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    out = {}
    for name, policy, clip in [("fp16", "fp16", True), ("int8", "int8", True), ("fishai", "fishai", True),
                               ("fishai_rtn", "fishai", False), ("int4", "int4", True)]:
        out[name] = (root / name, export_mixed(tiny_model_dir, root / name, policy, clip_search=clip))
    return out


def test_export_layout_and_stats(exports, tiny_model_dir):
    d, stats = exports["fishai"]
    for f in (WEIGHTS, META, MANIFEST, "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja"):
        assert (d / f).is_file(), f
    assert not list(d.parent.glob(".*tmp*")) and not list(d.parent.glob(".*old*"))
    meta = json.loads((d / META).read_text())
    assert (meta["format"], meta["policy"], meta["group_size"], meta["clip_search"]) == \
        ("forgelab-mixed-1", "fishai", 128, True)
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    rec = meta["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert (rec["kind"], rec["scheme"], rec["shape"], rec["dtype"]) == ("ffn", "int4", [64, 128], "float32")
    assert meta["tensors"]["model.layers.0.self_attn.k_proj.weight"]["scheme"] == "int8"
    stored = load_file(d / WEIGHTS)
    assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"].dtype == torch.float16
    q = "model.layers.0.self_attn.v_proj.weight"  # hidden 64 < 128: one padded group per row
    assert stored[f"{q}.qweight"].shape == (32, 32) and stored[f"{q}.scale"].shape == (32, 1)
    assert stored[f"{q}.zero"].dtype == torch.float16
    assert stats["quant_file_bytes"] == (d / WEIGHTS).stat().st_size
    assert stats["source_fp32_bytes"] == 2 * stats["source_fp16_bytes"] == 4 * stats["params"]
    assert stats["compression_vs_fp16"] == pytest.approx(stats["source_fp16_bytes"] / stats["quant_file_bytes"])
    assert sum(k["params"] for k in stats["by_kind"].values()) == stats["params"]
    assert stats["by_kind"]["ffn"]["schemes"].keys() == {"int4"}
    assert stats["by_kind"]["embedding"]["max_abs_err"] < 1e-3 and stats["unknown_2d"] == []


def test_fp16_export_logits_match(exports, tiny):
    model, tok, ref = tiny
    loaded = load_mixed(exports["fp16"][0])
    assert not loaded.training
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert (_logits(loaded, tok) - ref).abs().max().item() < 1e-3
    assert load_mixed(exports["fp16"][0], dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_fishai_weights_within_half_a_step(exports, tiny):
    """Round-to-nearest (no clip search): every weight within half a quantization step."""
    model, tok, ref = tiny
    d = exports["fishai_rtn"][0]
    sd, stored, meta = dequantize_state_dict(d), load_file(d / WEIGHTS), json.loads((d / META).read_text())
    orig = model.state_dict()
    assert sd.keys() == orig.keys()
    for name, rec in meta["tensors"].items():
        err = (sd[name] - orig[name]).abs()
        if rec["scheme"] == "int8":
            bound = stored[f"{name}.scale"].float()[:, None] / 2
        elif rec["scheme"] == "int4":
            bound = stored[f"{name}.scale"].float().repeat_interleave(128, dim=1)[:, :rec["shape"][1]] / 2
        else:  # fp16 rounding: half an fp16 ulp
            bound = orig[name].abs() * 2.0 ** -11
        assert (err <= bound + 1e-7).all(), name
    # Random Gaussian weights in groups of 64 are the worst case for 4 bits: measured 11% relative
    # logit error (int8: 0.8%), 20 of 21 next-token argmaxes kept; SmolLM2's perplexity test below
    # is the one that says what the format costs.
    logits = _logits(load_mixed(d), tok)
    assert ((logits - ref).norm() / ref.norm()).item() < 0.15
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
    int8 = _logits(load_mixed(exports["int8"][0]), tok)
    assert ((int8 - ref).norm() / ref.norm()).item() < 0.015


def test_sizes_order_and_clip_search_helps(exports):
    size = {k: s["quant_file_bytes"] for k, (_, s) in exports.items()}
    assert size["int4"] < size["fishai"] < size["int8"] < size["fp16"]
    err = lambda s, k: s["by_kind"][k]["mean_abs_err"]  # noqa: E731
    assert err(exports["fishai"][1], "ffn") < err(exports["fishai_rtn"][1], "ffn")


# --- refusals -------------------------------------------------------------------------------

@pytest.fixture
def copy(exports, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(exports["fishai"][0], d)
    return d


def test_corrupt_byte_is_refused(copy):
    p = copy / WEIGHTS
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(RunError, match=f"{WEIGHTS}.*sha256"):
        load_mixed(copy)


def test_truncated_file_is_refused(copy):
    p = copy / WEIGHTS
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(RunError, match=f"{WEIGHTS} has .* bytes"):
        load_mixed(copy)


def test_no_manifest_is_refused(copy):
    (copy / MANIFEST).unlink()
    with pytest.raises(RunError, match=f"no {MANIFEST}"):
        load_mixed(copy)


def test_wrong_format_is_refused(copy):
    meta = json.loads((copy / META).read_text())
    meta["format"] = "forgelab-mixed-0"
    (copy / META).write_text(json.dumps(meta))
    write_manifest(copy)
    with pytest.raises(RunError, match=f"{META} key 'format'"):
        load_mixed(copy)
    del meta["format"]
    (copy / META).write_text(json.dumps(meta))
    write_manifest(copy)
    with pytest.raises(RunError, match=f"{META} has no key 'format'"):
        load_mixed(copy)


def test_missing_or_misshapen_tensor_is_refused(copy):
    stored = load_file(copy / WEIGHTS)
    name = "model.layers.1.mlp.up_proj.weight.zero"
    save_file({k: v for k, v in stored.items() if k != name}, copy / WEIGHTS)
    write_manifest(copy)
    with pytest.raises(RunError, match=f"no tensor {name}"):
        load_mixed(copy)
    stored[name] = stored[name][:10]
    save_file(stored, copy / WEIGHTS)
    write_manifest(copy)
    with pytest.raises(RunError, match=rf"tensor {name} .* shape \[10, 1\], expected \[128, 1\]"):
        load_mixed(copy)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_failed_export_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "q"
    with pytest.raises(RunError, match="unknown quantization policy 'fishy'"):
        export_mixed(tiny_model_dir, out, "fishy")
    with pytest.raises(RunError, match="group_size"):
        export_mixed(tiny_model_dir, out, group_size=7)
    assert _leftovers(tmp_path) == []

    def disk_full(d, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mixed, "write_manifest", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_mixed(tiny_model_dir, out, "fp16")
    assert _leftovers(tmp_path) == []  # neither out_dir nor its temp dir


def test_reexport_replaces_and_failed_reexport_keeps_old(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "q"
    export_mixed(tiny_model_dir, out, "fp16")
    export_mixed(tiny_model_dir, out, "int8")
    assert json.loads((out / META).read_text())["policy"] == "int8"
    assert _leftovers(tmp_path) == ["q"]

    real_replace = mixed.os.replace

    def fail_publish(src, dst):  # the rename that publishes the new export fails
        if ".tmp" in str(src) and str(dst) == str(out):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)
    monkeypatch.setattr(mixed.os, "replace", fail_publish)
    with pytest.raises(OSError, match="Input/output"):
        export_mixed(tiny_model_dir, out, "int4")
    monkeypatch.undo()
    assert _leftovers(tmp_path) == ["q"]
    assert json.loads((out / META).read_text())["policy"] == "int8"
    load_mixed(out)  # the old export, intact against its manifest


# --- the real SmolLM2: perplexity per policy ------------------------------------------------

PPL_TOKENS, PPL_WINDOW, FIRST_VERSE = 4096, 512, 20000


def _perplexity(model, ids: torch.Tensor) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), PPL_WINDOW):
            w = ids[i:i + PPL_WINDOW][None]
            out = model(input_ids=w, labels=w)
            nll += out.loss.item() * (w.shape[1] - 1)
            n += w.shape[1] - 1
    return math.exp(nll / n)


# Relative perplexity increase over the fp32 original allowed per export: the measured value plus
# about 10% of it (SmolLM2-135M-Instruct, KJV verses 20000+, 4096 tokens; -s prints the table).
# model/smollm2-135m-instruct is the dequantized Q4_1 GGUF of the manifest: its weights already
# lie on a 4-bit grid with blocks of 32, so INT4 g32 re-quantizes it almost exactly while g128
# (a coarser grid over a grid) costs +62%; a bf16 original would lose less at g128.
BOUNDS = {"fp16": 0.001, "int8": 0.01, "int8_rtn": 0.01, "fishai": 0.69, "fishai_rtn": 0.69,
          "int4": 0.73, "int4_rtn": 0.76, "fishai_g32": 0.01}


@pytest.mark.slow
def test_smollm2_perplexity_per_policy(smollm2_dir, raw_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    verses = [json.loads(line)["text"] for line in raw_data["kjv"].read_text(encoding="utf-8").splitlines()]
    ids = tok(" ".join(verses[FIRST_VERSE:FIRST_VERSE + 600]), return_tensors="pt").input_ids[0][:PPL_TOKENS]
    assert len(ids) == PPL_TOKENS
    base = _perplexity(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(), ids)
    rows = []
    for name in BOUNDS:
        policy, clip = name.removesuffix("_rtn").removesuffix("_g32"), not name.endswith("_rtn")
        t0 = time.time()
        stats = export_mixed(smollm2_dir, tmp_path / name, policy, 32 if name.endswith("_g32") else 128, clip)
        seconds = time.time() - t0
        ppl = _perplexity(load_mixed(tmp_path / name), ids)
        rows.append((name, policy, clip, ppl, ppl / base - 1, stats, seconds))
        shutil.rmtree(tmp_path / name)
    print(f"\nSmolLM2-135M-Instruct, KJV verses {FIRST_VERSE}+, {PPL_TOKENS} tokens, fp32 perplexity {base:.4f}")
    print(f"{'export':<11} {'policy':<7} {'clip':<5} {'ppl':>8} {'vs fp32':>8} {'MB':>7} {'x fp16':>6} "
          f"{'x fp32':>6} {'bits':>5} {'export s':>8}")
    for name, policy, clip, ppl, rel, s, sec in rows:
        print(f"{name:<11} {policy:<7} {str(clip):<5} {ppl:8.4f} {rel:+8.2%} {s['quant_file_bytes'] / 1e6:7.1f} "
              f"{s['compression_vs_fp16']:6.2f} {s['compression_vs_fp32']:6.2f} {s['bits_per_param']:5.2f} {sec:8.1f}")
    for name, _, _, ppl, rel, _, _ in rows:
        assert rel < BOUNDS[name], f"{name}: perplexity {ppl:.4f} is {rel:+.2%} over fp32 {base:.4f}"
    rel = {r[0]: r[4] for r in rows}
    # Clip search: -2.9 points with Q/K in INT4 too; with them in INT8 (fishai) it measured neutral.
    assert rel["int4"] < rel["int4_rtn"] - 0.02 and abs(rel["fishai"] - rel["fishai_rtn"]) < 0.005
    size = {r[0]: r[5]["quant_file_bytes"] for r in rows}
    assert size["int4"] < size["fishai"] < size["fishai_g32"] < size["int8"] < size["fp16"]
