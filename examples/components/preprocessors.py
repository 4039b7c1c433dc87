"""Example preprocessor (kind `preprocessor`) for the SFT dataset stage (03):

    preprocess(record: dict) -> dict | None

called on each raw record of a source (before its format is converted to messages); return the
record (changed or not), or None to drop it. Drops are counted per source under the
preprocessor's name in the run summary.
"""
from forgelab.eval.answers import asdiv_gold


def asdiv_answer_sentence(record: dict) -> dict | None:
    """ASDiv records (passage/question/answer): an answer like '9 (apples)' becomes
    'The answer is 9 (apples).', the phrase the eval's answer extraction looks for first;
    answers that are not one number (names, ratios, times) are dropped."""
    answer = str(record.get("answer", "")).strip()
    if asdiv_gold(answer) is None:
        return None
    return {**record, "answer": f"The answer is {answer}."}
