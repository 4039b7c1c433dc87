"""Example chat template (kind `chat_template`) for SFT tokenization (05): a Jinja string, or
a zero-argument function returning one. It is set on the tokenizer before tokenizing, recorded
in the store's meta.json and folded into its tokenizer fingerprint.

The template must stay prefix-stable (rendering the first turns gives a prefix of the whole
conversation), and an assistant turn must end with the end token (default: the tokenizer's eos,
`<|im_end|>` for SmolLM2), which is learned.
"""

# ChatML as SmolLM2 uses it, with a fixed system prompt when the conversation has none.
CHATML_MATH = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou solve math word problems. End with: The answer is N.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_math() -> str:
    """The same template, from a function (a function may build it from files or settings)."""
    return CHATML_MATH
