"""Reward components shipped with the lab, in TRL's reward-function convention (the ``reward``
kind of forgelab.components): ``f(prompts, completions, **columns) -> list[float | None]``.

GRPO (``align.rewards``) and the eval's math task (``math.rewards``) call them; a user's own
reward is a dotted path with the same signature. ``completions`` may be plain strings or, for
conversational prompts, lists of message dicts (TRL passes those): :func:`text` reads both.

- :func:`math_exact_match`: 1 when the answer's final number (the eval's extractor) equals the
  gold ``answer`` column, else 0; the same check the eval scores with.
- :func:`answer_format`: 1 when the answer states a number at all, else 0 (a shaping term that
  pays for answering in the checkable form, not for being right).
- :func:`length_penalty`: -(tokens / 256), capped at -1 (TRL passes ``completion_ids``;
  without them, characters / 4 stand in for tokens).
"""
from __future__ import annotations

from ..eval.answers import extract_answer, is_correct

LENGTH_SCALE = 256


def text(completion) -> str:
    """The text of a completion: a string, or the content of the last message of a list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def math_exact_match(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    if answer is None:
        raise ValueError("math_exact_match needs an 'answer' column (the gold number) in the data")
    return [None if gold is None else float(is_correct(extract_answer(text(c)), str(gold)))
            for c, gold in zip(completions, answer)]


def answer_format(prompts, completions, **kwargs) -> list[float]:
    return [float(extract_answer(text(c)) is not None) for c in completions]


def length_penalty(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    if completion_ids is not None:
        lengths = [len(ids) for ids in completion_ids]
    else:
        lengths = [len(text(c)) / 4 for c in completions]
    return [-min(1.0, n / LENGTH_SCALE) for n in lengths]
