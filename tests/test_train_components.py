"""Components in training: a loss of the user's own (key `loss`) replaces the model's
cross-entropy and is recorded with its file's hash; an SFT store tokenized with its own chat
template trains a model whose saved tokenizer carries that template and the store's fingerprint."""
from __future__ import annotations

import json

import pytest

from forgelab import config as cfg
from forgelab.runs import PROJECT_ROOT, Run, read_json
from helpers import kjv_verses, metrics, runs_dir, tiny_sets, train_inproc

pytestmark = pytest.mark.slow

EX = "examples/components"


def _cpt(tiny_model_dir, cpt_dir, name, *extra):
    train_inproc("--config", "configs/train/cpt.yaml", "--config", "configs/train/tracks/sanity.yaml",
                 *tiny_sets(tiny_model_dir, cpt_dir), "--set", "steps.max_steps=4", "--set", "steps.micro_batch_size=2",
                 "--set", "checkpoint.save_final=false", *extra, "--run-name", name)
    return read_json(runs_dir() / name / "train_summary.json"), [r["loss"] for r in metrics(runs_dir() / name)]


def test_a_loss_component_replaces_the_models_loss(tiny_model_dir, cpt_dir, tmp_path):
    # gamma 0 of the example focal loss is plain cross-entropy: the same curve as the model's own loss
    (tmp_path / "my_losses.py").write_text(
        "import importlib.util\nfrom functools import partial\n"
        f"spec = importlib.util.spec_from_file_location('ex_losses', {str(PROJECT_ROOT / EX / 'losses.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
        "cross_entropy = partial(mod.focal_loss, gamma=0.0)\n")
    _, stock = _cpt(tiny_model_dir, cpt_dir, "t-loss-stock")
    s0, ce = _cpt(tiny_model_dir, cpt_dir, "t-loss-ce", "--set", f"loss={tmp_path / 'my_losses.py'}:cross_entropy")
    assert ce == pytest.approx(stock, rel=1e-5)
    assert s0["loss_component"]["spec"].endswith("my_losses.py:cross_entropy")
    s1, focal = _cpt(tiny_model_dir, cpt_dir, "t-loss-focal", "--set", f"loss={EX}/losses.py:focal_loss_g1",
                     "--set", "runtime.loss_chunk_tokens=32")
    # focal loss weighs each token's -log p by (1 - p): below cross-entropy from the first step on
    assert all(f < c for f, c in zip(focal, ce)) and len(focal) == 4
    files = s1["loss_component"]["files"]
    assert list(files) == [f"{EX}/losses.py:focal_loss_g1"] and len(files[f"{EX}/losses.py:focal_loss_g1"]) == 16
    assert s1["loss_chunk_tokens"] == 0 and any("loss component" in n for n in s1["notices"])


def test_a_wrong_loss_path_fails_before_any_model_loads(tiny_model_dir, cpt_dir):
    from forgelab.train.config import TrainConfig
    with pytest.raises(cfg.ConfigError, match=r"key 'loss'.*examples/components/losses.py:nope"):
        cfg.load(TrainConfig, [PROJECT_ROOT / "configs/train/cpt.yaml"], [f"loss={EX}/losses.py:nope"])


def _store(tmp_path, tok_dir, name, template_spec=None):
    from forgelab.data.tokenize_sft import TokenizeSFTConfig, tokenize_sft
    clean = tmp_path / f"clean-{name}"
    clean.mkdir()
    verses = kjv_verses(300, 80)
    for split, part in (("train", verses[:60]), ("val", verses[60:])):
        (clean / f"{split}.jsonl").write_text("".join(
            json.dumps({"id": f"{split}{i}", "source": "kjv", "messages": [
                {"role": "user", "content": a}, {"role": "assistant", "content": b}]}) + "\n"
            for i, (a, b) in enumerate(zip(part[::2], part[1::2]))))
    sets = [f"tokenizer={tok_dir}", f"data_dir={clean}", f"out_dir={tmp_path / name}", "seq_len=256"]
    if template_spec:
        sets.append(f"chat_template={template_spec}")
    conf = cfg.load(TokenizeSFTConfig, [PROJECT_ROOT / "configs/data/tokenize_sft.yaml"], sets)
    with Run("tokenize_sft", conf, run_name=f"{name}-{tmp_path.name}") as run:
        tokenize_sft(conf, run)
    return tmp_path / name


def test_the_stores_chat_template_is_the_trained_models(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from forgelab.model.tokenizer_info import tokenizer_fingerprint
    from forgelab.train.config import TrainConfig
    from forgelab.train.entry import preflight
    store = _store(tmp_path, tiny_model_dir, "tmpl", f"{EX}/templates.py:chatml_math")
    meta = json.loads((store / "train" / "meta.json").read_text())
    template = meta["chat_template"]["template"]
    train_inproc("--config", "configs/train/sft_lora.yaml", "--config", "configs/train/tracks/sanity.yaml",
                 *tiny_sets(tiny_model_dir, store / "train"), "--set", f"data.eval={store / 'val'}",
                 "--set", "steps.max_steps=2", "--run-name", "t-sft-template")
    run = runs_dir() / "t-sft-template"
    s = read_json(run / "train_summary.json")
    assert s["outcome"] == "ok" and s["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]
    assert AutoTokenizer.from_pretrained(run / "final").chat_template == template
    assert tokenizer_fingerprint(run / "final") == meta["tokenizer_fingerprint"]
    # held-out data rendered with another template is refused before any model loads
    plain = _store(tmp_path, tiny_model_dir, "plain")
    conf = cfg.load(TrainConfig, [PROJECT_ROOT / "configs/train/sft_lora.yaml"],
                    [f"model.path={tiny_model_dir}", f"data.train={store / 'train'}", f"data.eval={plain / 'val'}"])
    with pytest.raises(cfg.ConfigError, match="another chat template"):
        preflight(conf, "t-mixed-templates")
