"""The Ollama Modelfile's TEMPLATE is measured from the model's own chat template and proven to
rebuild it; templates it cannot express are refused rather than exported wrong."""
from __future__ import annotations

import copy

import pytest

from forgelab.config import RunError
from forgelab.export.modelfile import CHECK_CHATS, assemble, go_template, measure, modelfile


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_pieces_of_chatml_with_its_default_system_prompt(tok):
    p = measure(tok)
    assert (p.system_prefix, p.user_prefix, p.assistant_prefix) == \
        ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n")
    assert p.system_suffix == p.user_suffix == p.assistant_suffix == "<|im_end|>\n"
    assert p.default_system.startswith("You are a helpful AI assistant named SmolLM")
    for chat in CHECK_CHATS + [[{"role": "user", "content": "{{ .Content }} stays text"}]]:
        assert assemble(p, chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_modelfile_text(tok):
    text = modelfile("model.Q8_0.gguf", tok, {"temperature": 0})
    assert text.splitlines()[1] == "FROM ./model.Q8_0.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    tpl = go_template(measure(tok))
    assert "{{-" not in tpl and "-}}" not in tpl  # trimming would eat the template's own newlines
    assert tpl.count("{{ .Content }}") == 3


@pytest.mark.parametrize("template, match", [
    # content rewritten: no fixed prefix/suffix can carry it
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | replace('S', 's') }}\n{% endfor %}"
     "{% if add_generation_prompt %}<assistant>{% endif %}", "prefix and suffix|does not reproduce"),
    # the last user turn gets another prefix than earlier ones: position-dependent
    ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}<{{ m['role'] }}>{{ m['content'] }}\n"
     "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}", "prefix and suffix|does not reproduce"),
])
def test_templates_it_cannot_express_are_refused(tok, template, match):
    t = copy.deepcopy(tok)
    t.chat_template = template
    with pytest.raises(RunError, match=match):
        measure(t)


def test_no_template_is_refused(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(RunError, match="no chat template"):
        measure(t)
