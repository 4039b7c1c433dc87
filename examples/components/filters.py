"""Example filters (kind `filter`):

    keep(record: dict) -> bool

CPT corpus stage (02): `record` is a normalized document {"id", "source", "lang", "text"} that
passed the built-in filters. SFT dataset stage (03): a converted conversation {"id", "source",
"messages"[, "tools"]}. False drops it; drops are counted under the filter's name.
"""


def no_shouting(record: dict) -> bool:
    """CPT: drop documents whose letters are mostly capitals (headings, banners, spam)."""
    letters = [c for c in record["text"] if c.isalpha() and c.isascii()]
    if len(letters) < 20:
        return True
    return sum(c.isupper() for c in letters) / len(letters) < 0.5


def short_prompts(record: dict) -> bool:
    """SFT: keep conversations whose user turns hold at most 60 words in all (long word
    problems cost sequence length and are rare at eval time)."""
    return sum(len(m["content"].split()) for m in record["messages"] if m["role"] == "user") <= 60
