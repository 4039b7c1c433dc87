"""Numeric answer extraction and normalization of math word problems."""
import json

import pytest

from forgelab.eval.answers import asdiv_gold, canonical, extract_answer, gsm8k_gold, is_correct, numbers


@pytest.mark.parametrize("text, want", [
    # GSM8K reference format and model imitations of it
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("So the total is 5 + 3 = 8.\n#### 8\n\nQuestion: Tom has 3 apples", "8"),
    ("#### -15", "-15"),
    # answer phrases
    ("The answer is 42.", "42"),
    ("Adding them up gives 10 + 4 = 14. The answer is 14 apples.", "14"),
    ("Final answer: $1,234.50", "1234.5"),
    ("So the answer is $18.00.", "18"),
    ("The answer is: -7 degrees", "-7"),
    ("answer = 3/4", "0.75"),
    ("The answer is 1 1/2 cups of flour.", "1.5"),
    ("The answer is 1/3", "1/3"),
    ("The answer is \\boxed{17}.", "17"),
    ("\\boxed{2.50} dollars", "2.5"),
    # falls back to the last number
    ("She has 9 apples and eats 2, so 7 apples are left", "7"),
    ("42 apples", "42"),
    ("It costs €3.75 each, 4 cost €15", "15"),
    ("temperature fell to \u22123 degrees", "-3"),
    ("That is 50%", "50"),
    ("so 0.50", "0.5"),
    ("about .5 liters", "0.5"),
    ("from 3-5 apples", "5"),      # a range hyphen is not a minus sign
    ("10 - 5 = 5", "5"),           # nor is a subtraction
    ("Total is 1,000,000.", "1000000"),
    ("84/2", "42"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_marker_wins_over_later_numbers():
    assert extract_answer("#### 12\nBonus: 99 more problems") == "12"
    assert extract_answer("The answer is 6. Check: 2 * 3 = 6, and 7 is wrong") == "6"


def test_canonical_forms():
    from fractions import Fraction
    assert canonical(Fraction(42)) == "42"
    assert canonical(Fraction(2469, 2)) == "1234.5"
    assert canonical(Fraction(-1, 4)) == "-0.25"
    assert canonical(Fraction(2, 6)) == "1/3"
    assert [str(x) for x in numbers("3 apples, 2.5 kg, 1,200 m, 7/2")] == ["3", "5/2", "1200", "7/2"]


@pytest.mark.parametrize("pred, gold, ok", [
    ("42", "42", True), ("42.0", "42", True), ("0.5", "1/2", True), ("1/3", "1/3", True),
    ("41", "42", False), (None, "42", False), ("-3", "3", False),
])
def test_is_correct(pred, gold, ok):
    assert is_correct(pred, gold) is ok


def test_gsm8k_gold_on_the_real_train_file(gsm8k_train):
    rows = [json.loads(line) for line in gsm8k_train.read_text().splitlines()[:500]]
    golds = [gsm8k_gold(r["answer"]) for r in rows]
    assert golds[0] == "72"  # Natalia's clips, the first problem of the file
    # the reference solution itself, read by the extractor, gives the gold answer
    assert all(extract_answer(r["answer"]) == g for r, g in zip(rows, golds))
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final marker 12")


def test_asdiv_gold_on_the_real_file(raw_data):
    rows = [json.loads(line) for line in raw_data["asdiv"].read_text().splitlines()]
    golds = [asdiv_gold(r["answer"]) for r in rows]
    assert golds[0] == "9"  # "9 apples"
    kept = [g for g in golds if g is not None]
    # names, 'Yes', times, ratios and multi-number answers are left out, numbers kept
    assert 2000 < len(kept) < len(rows)
    assert asdiv_gold("5/2") == "2.5" and asdiv_gold("-1/3") == "-1/3" and asdiv_gold("100.1 cones") == "100.1"
    for a in ("3:30 p.m.", "3:4", "8; 40", "Yes", "Mrs. Hilt", "They are equal"):
        assert asdiv_gold(a) is None
    # a model answering in ASDiv's own words is scored right
    assert all(is_correct(extract_answer(f"The answer is {r['answer']}."), g)
               for r, g in zip(rows, golds) if g is not None)
