"""Model presets: real transformers configs/models, exact parameter counts, save/load round
trips, the generated configs/model/*.yaml in sync with the code, clear errors."""
from __future__ import annotations

import pytest
import torch

from forgelab.model import presets
from forgelab.model.presets import PRESETS, PresetError, build_config, count_params
from forgelab.runs import PROJECT_ROOT


def analytic_params(c) -> int:
    """Parameter count of a Llama/Qwen3 decoder from its config, written out term by term."""
    h, hd, L, inter, V = c.hidden_size, c.head_dim, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    if c.model_type == "qwen3":
        per_layer += 2 * hd  # q_norm, k_norm
    return V * h * (1 if c.tie_word_embeddings else 2) + L * per_layer + h


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_shapes_and_exact_counts(name):
    c = build_config(name)
    assert c.model_type == PRESETS[name][0]
    assert c.head_dim >= 32 and c.tie_word_embeddings and not c.attention_bias
    assert c.hidden_act == "silu" and c.num_attention_heads % c.num_key_value_heads == 0
    n = count_params(c)
    assert n["total"] == analytic_params(c)
    assert n["non_embedding"] == n["total"] - c.vocab_size * c.hidden_size
    assert n["lm_head"] == 0 and n["tied_embeddings"]


def test_sizes_match_their_names():
    total = {k: count_params(build_config(k))["total"] for k in PRESETS}
    assert 1e6 <= total["tiny"] <= 3e6
    assert 30e6 <= total["small"] <= 40e6
    assert 350e6 <= total["medium"] <= 450e6
    assert 1.4e9 <= total["large"] <= 1.7e9
    assert round(total["qwen3-0.6b"] / 1e6) == 596  # Qwen3-0.6B: 0.6B with tied embeddings
    assert round(total["qwen3-1.7b"] / 1e6) == 1721


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_real_model_round_trip(name, tmp_path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    c = build_config(name, vocab_size=512)
    model = AutoModelForCausalLM.from_config(c).eval()
    assert sum(p.numel() for p in model.parameters()) == count_params(c)["total"]
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("name", ["medium", "large", "qwen3-0.6b", "qwen3-1.7b"])
def test_large_presets_round_trip_at_full_width(name, tmp_path):
    """Full widths (heads, head_dim, intermediate) with one layer and a small vocabulary: the
    same modules as the full preset, cheap enough to build for real."""
    from transformers import AutoConfig, AutoModelForCausalLM
    full = build_config(name)
    c = build_config(name, vocab_size=1024, num_hidden_layers=1)
    c.save_pretrained(tmp_path / "conf")
    back_conf = AutoConfig.from_pretrained(tmp_path / "conf").to_dict()
    back_conf.pop("_name_or_path", None)
    assert back_conf == {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16).eval()
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[full.model_type]
    model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_yaml_files_are_generated_from_the_code():
    for name in PRESETS:
        path = PROJECT_ROOT / "configs" / "model" / f"{name}.yaml"
        assert path.read_text() == presets.preset_yaml(name), \
            f"{path} is stale: python -m forgelab.model.presets --write configs/model"
        assert build_config(path).to_dict() == build_config(name).to_dict()


def test_vocab_and_overrides():
    c = build_config("small", vocab_size=16384, bos_token_id=None, eos_token_id=0, pad_token_id=3)
    assert c.vocab_size == 16384 and c.eos_token_id == 0 and c.pad_token_id == 3
    assert count_params(c)["total"] == count_params(build_config("small"))["total"] - (32000 - 16384) * 512


def test_errors_are_clear():
    with pytest.raises(PresetError, match="did you mean 'small'"):
        build_config("smal")
    with pytest.raises(PresetError, match="unknown llama config key 'hiden_size'.*'hidden_size'"):
        build_config("tiny", hiden_size=64)
    with pytest.raises(PresetError, match="head_dim 16 < 32"):
        build_config("tiny", head_dim=16)
    with pytest.raises(PresetError, match="not a multiple"):
        build_config("tiny", num_key_value_heads=3)
    with pytest.raises(PresetError, match="not found"):
        build_config("configs/model/nope.yaml")
