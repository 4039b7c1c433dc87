"""MMLU-style multiple choice, scored by the log-likelihood of the answer letter.

Prompt (plain text, no chat template), the same layout as lm-evaluation-harness' default MMLU
task:

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {exemplar question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n   (x shots)
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

The prediction is the letter among " A", " B", " C", " D" with the highest log-probability as
the next token after "Answer:" (each is one token for BPE vocabularies; checked). Exemplars
come from the subject's dev split when one is given; otherwise (a test-only file) from the
subject's first questions in file order, which are then left out of the scored set.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from .config import MMLUConfig
from .data import LETTERS, EvalDataError, load_mmlu, subject_key
from .prefix import Prefix, batch_inputs, build_prefix, common_prefix_len
from .runtime import Batcher, LoadedModel, auto_batch_size, empty_cache_fn


def format_question(q: dict) -> str:
    lines = [q["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, q["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(q: dict, exemplars: list[dict]) -> str:
    head = f"The following are multiple choice questions (with answers) about {q['subject'].replace('_', ' ')}.\n\n"
    shots = "".join(f"{format_question(e)} {LETTERS[e['answer']]}\n\n" for e in exemplars)
    return head + shots + format_question(q)


def letter_token_ids(tokenizer) -> list[int]:
    ids = []
    for L in LETTERS:
        enc = tokenizer(f" {L}", add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"' {L}' is {len(enc)} tokens for this tokenizer; letter scoring needs one")
        ids.append(enc[0])
    return ids


def select(conf: MMLUConfig, max_shots: int) -> dict:
    """The scored questions and the exemplar pool per subject, and what was left out."""
    test, dropped = load_mmlu(conf.path)
    dev = load_mmlu(conf.dev_path)[0] if conf.dev_path else None
    wanted = [subject_key(s) for s in conf.subjects] or sorted(test)
    missing = [s for s in wanted if s not in test]
    if missing:
        raise EvalDataError(f"mmlu.subjects: {missing} not in {conf.path}; "
                            f"available: {', '.join(sorted(test))}")
    scored, pools = {}, {}
    for s in wanted:
        qs = test[s]
        if dev is not None:
            pools[s] = dev.get(s, [])[:max_shots]
            rest = qs
        else:  # test-only file: exemplars are the subject's first questions, not scored
            pools[s], rest = qs[:max_shots], qs[max_shots:]
        if len(pools[s]) < max_shots:
            raise EvalDataError(f"mmlu: subject {s} has {len(pools[s])} exemplars, {max_shots} shots asked")
        scored[s] = rest[:conf.per_subject_limit] if conf.per_subject_limit else rest
    return {"scored": scored, "pools": pools, "dropped_rows": dropped,
            "exemplar_source": "dev_path" if dev is not None else "first questions of each subject (excluded from scoring)"}


def letter_logprobs(lm: LoadedModel, prefix: Prefix, suffixes: list[list[int]],
                   letter_ids: list[int]) -> list[list[float]]:
    """Log-probabilities of the letter tokens as the next token after each prompt
    (prompt = cached prefix + suffix)."""
    import torch

    inputs = batch_inputs(prefix, suffixes, lm.pad_id, lm.device)
    with torch.inference_mode():
        logits = lm.model(**inputs, use_cache=True, logits_to_keep=1).logits
    logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
    return logp[:, letter_ids].tolist()


def evaluate(lm: LoadedModel, conf: MMLUConfig, runtime, shots: int, selection: dict) -> dict:
    """Accuracy per subject and macro (mean over subjects) for one few-shot setting, plus the
    per-question records."""
    letter_ids = letter_token_ids(lm.tokenizer)
    items = []
    for s, qs in selection["scored"].items():
        ex = selection["pools"][s][:shots]
        for q in qs:
            items.append({"subject": s, "row": q["row"], "prompt": build_prompt(q, ex), "answer": q["answer"]})
    if not items:
        raise EvalDataError("mmlu: nothing to score (check mmlu.subjects / per_subject_limit)")
    tok = lm.tokenizer
    batcher = Batcher(1, empty_cache_fn(lm.device))  # resized per subject
    example = None
    with tqdm(total=len(items), desc=f"mmlu {shots}-shot", unit="q") as bar:
        for s in selection["scored"]:
            idx = [i for i, it in enumerate(items) if it["subject"] == s]
            if not idx:
                continue
            enc = {i: tok(items[i]["prompt"], add_special_tokens=False)["input_ids"] for i in idx}
            # the description and exemplars are the same for the subject: encode them once
            p = common_prefix_len(list(enc.values()))
            prefix = build_prefix(lm, enc[idx[0]][:p])
            idx.sort(key=lambda i: -len(enc[i]))  # longest first: little padding, an OOM shows at once
            batcher.resize(auto_batch_size(lm, runtime, len(enc[idx[0]]), 1))
            example = example or items[idx[-1]]["prompt"]
            scores = batcher.run([enc[i][p:] for i in idx],
                                 lambda b: letter_logprobs(lm, prefix, b, letter_ids), bar)
            for i, sc in zip(idx, scores):
                del items[i]["prompt"]  # one example prompt goes to the summary instead
                pred = max(range(4), key=lambda k: sc[k])
                items[i].update(logprobs=[round(x, 6) for x in sc], pred=pred,
                                correct=pred == items[i]["answer"], prompt_tokens=len(enc[i]))
    per_subject = {}
    for s in selection["scored"]:
        rows = [it for it in items if it["subject"] == s]
        per_subject[s] = {"n": len(rows), "correct": sum(r["correct"] for r in rows),
                          "accuracy": sum(r["correct"] for r in rows) / len(rows) if rows else None}
    accs = [v["accuracy"] for v in per_subject.values() if v["accuracy"] is not None]
    n = len(items)
    return {"shots": shots, "n": n, "macro_accuracy": sum(accs) / len(accs),
            "micro_accuracy": sum(it["correct"] for it in items) / n, "per_subject": per_subject,
            "batch_size": batcher.batch_size, "example_prompt": example, "records": items}
