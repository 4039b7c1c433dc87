"""Example rewards (kind `reward`), in TRL's reward-function convention:

    reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

One value per completion (None: not applicable). Every other dataset column arrives as a
keyword list; the eval math task passes `answer` (gold, canonical number) and `question`.
"""
from forgelab.eval.answers import extract_answer, is_correct


def correct_answer(prompts, completions, answer, **kwargs):
    """1.0 when the final number of the completion equals the gold answer, else 0.0."""
    return [float(is_correct(extract_answer(c), a)) for c, a in zip(completions, answer)]


def brevity(prompts, completions, **kwargs):
    """Shorter is better: 1.0 for an empty completion, 0.0 at 200 words or more."""
    return [max(0.0, 1.0 - len(c.split()) / 200) for c in completions]
