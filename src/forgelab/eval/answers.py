"""Numeric answers of math word problems: pull the final answer out of a model's free text,
normalize it, and compare exactly.

Numbers are compared as exact fractions, so '42', '42.0', '$42.00' and '84/2' are the same
answer and '0.5' equals '1/2'. The canonical form is an integer ('42'), a terminating decimal
('1234.5') or a reduced fraction ('1/3').
"""
from __future__ import annotations

import re
from fractions import Fraction

# One number: optional sign (only where it cannot be a hyphen between two words/numbers),
# optional currency sign, digits with optional thousands separators, optional decimals,
# optional '/denominator', and a mixed number '1 1/2'.
_NUM = r"""
    (?<![\w.])                         # not glued to a word or another number
    (?P<sign>[-\u2212])?
    [$\u20ac\u00a3]?\s?
    (?:
        (?P<whole>\d+)\s+(?P<mnum>\d+)/(?P<mden>\d+)         # mixed number 1 1/2
      | (?P<num>\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?P<dec>\.\d+)?
        (?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?                     # fraction 3/4
    )
    (?![\d])
"""
NUMBER_RE = re.compile(_NUM, re.VERBOSE)
# Phrases after which the final answer follows, strongest first.
_MARKERS = [
    re.compile(r"####"),
    re.compile(r"\\boxed\{"),
    re.compile(r"answer\s*(?:is|=|:)", re.IGNORECASE),
]


def _to_fraction(m: re.Match) -> Fraction | None:
    try:
        if m.group("whole") is not None:
            val = Fraction(int(m.group("whole"))) + Fraction(int(m.group("mnum")), int(m.group("mden")))
        else:
            num = (m.group("num") or "0").replace(",", "")
            val = Fraction(num + (m.group("dec") or ""))
            if m.group("den") is not None:
                den = Fraction(m.group("den"))
                if den == 0:
                    return None
                val = val / den
    except (ValueError, ZeroDivisionError):
        return None
    return -val if m.group("sign") else val


def canonical(value: Fraction) -> str:
    """'42', '1234.5', '-0.25' or '1/3' (a fraction whose decimal does not terminate)."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    text = f"{float(value):.12f}".rstrip("0").rstrip(".")
    return text if Fraction(text) == value else f"{value.numerator}/{value.denominator}"


def numbers(text: str) -> list[Fraction]:
    """Every number in text, in order."""
    out = []
    for m in NUMBER_RE.finditer(text.replace("\u2212", "-")):
        v = _to_fraction(m)
        if v is not None:
            out.append(v)
    return out


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a model's response, canonical, or None if it has no number.

    Looks after the last '####', then inside the last '\\boxed{', then after the last
    'the answer is' / 'answer:'; the first number found there wins. Otherwise the last
    number of the text.
    """
    for marker in _MARKERS:
        hits = list(marker.finditer(text))
        for hit in reversed(hits):
            found = numbers(text[hit.end():hit.end() + 80].split("\n\n")[0])
            if found:
                return canonical(found[0])
    found = numbers(text)
    return canonical(found[-1]) if found else None


def gsm8k_gold(answer: str) -> str:
    """The reference number of a GSM8K answer ('... #### 72')."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-60:]!r}")
    found = numbers(answer.rsplit("####", 1)[1])
    if not found:
        raise ValueError(f"GSM8K answer without a number after '####': {answer[-60:]!r}")
    return canonical(found[0])


_ASDIV_RE = re.compile(r"^\$?\s?(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)(?:\s+[^\d\s].*)?$")


def asdiv_gold(answer: str) -> str | None:
    """The reference number of an ASDiv answer ('9 apples', '5/2', '100.1 cones'), or None for
    answers that are not one number (names, 'Yes', times '3:30 p.m.', ratios '3:4', several
    numbers '8; 40'): those problems are left out of a numeric-answer task."""
    a = answer.strip()
    if ";" in a or ":" in a:
        return None
    m = _ASDIV_RE.match(a)
    if not m:
        return None
    found = numbers(m.group(1))
    return canonical(found[0]) if len(found) == 1 else None


def is_correct(prediction: str | None, gold: str) -> bool:
    """Exact match of two canonical answers, compared as numbers."""
    if prediction is None:
        return False
    return Fraction(prediction) == Fraction(gold)
