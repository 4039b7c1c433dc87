"""The shipped reward components (forgelab/align/rewards.py) under TRL's two completion forms
(text, and a list of messages for conversational prompts) and the component loader's checks."""
from __future__ import annotations

import pytest

from forgelab.align import rewards
from forgelab.components import load_components


def test_math_exact_match_scores_the_final_number_like_the_eval():
    texts = ["9 apples", "Seven plus two is 9.", "The answer is 10", "no idea"]
    got = rewards.math_exact_match(prompts=["q"] * 4, completions=texts, answer=["9", "9", "9", "9"])
    assert got == [1.0, 1.0, 0.0, 0.0]
    msgs = [[{"role": "assistant", "content": t}] for t in texts]
    assert rewards.math_exact_match(prompts=["q"] * 4, completions=msgs, answer=["9"] * 4) == got
    assert rewards.math_exact_match(prompts=["q"], completions=["1/3"], answer=["1/3"]) == [1.0]
    assert rewards.math_exact_match(prompts=["q"], completions=["3"], answer=[None]) == [None]
    with pytest.raises(ValueError, match="'answer' column"):
        rewards.math_exact_match(prompts=["q"], completions=["3"])


def test_answer_format_and_length_penalty():
    assert rewards.answer_format(prompts=["q", "q"], completions=["It is 4.", "four"]) == [1.0, 0.0]
    assert rewards.length_penalty(prompts=["q", "q"], completions=["a", "b"], completion_ids=[[1] * 64, [1] * 999]) \
        == [-0.25, -1.0]
    assert rewards.length_penalty(prompts=["q"], completions=["x" * 512]) == [-0.5]  # 4 characters a token


def test_the_shipped_rewards_load_as_components_with_the_data_columns():
    got = load_components("reward", ["forgelab.align.rewards:math_exact_match", "forgelab.align.rewards:answer_format",
                                     "forgelab.align.rewards:length_penalty"], "align.rewards", ("answer",))
    assert list(got) == ["math_exact_match", "answer_format", "length_penalty"]
