"""Example metrics (kind `metric`) for the eval math task:

    metric(prediction: str, reference: str) -> float

`prediction` is the model's whole response, `reference` the gold answer as a canonical number
('42', '2.5', '1/3'). The eval stage averages each metric over the scored problems and reports
it next to exact match.
"""
from fractions import Fraction

from forgelab.eval.answers import extract_answer


def relative_closeness(prediction: str, reference: str) -> float:
    """1 for the exact answer, falling linearly to 0 at 100% relative error (0 if no number)."""
    pred = extract_answer(prediction)
    if pred is None:
        return 0.0
    p, g = Fraction(pred), Fraction(reference)
    err = abs(p - g) / max(abs(g), Fraction(1))
    return float(max(Fraction(0), 1 - err))


def states_an_answer(prediction: str, reference: str) -> float:
    """1 if the response states its result with a marker ('The answer is', '####', \\boxed)."""
    text = prediction.lower()
    return float(any(m in text for m in ("the answer is", "####", "\\boxed{")))
