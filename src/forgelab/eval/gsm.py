"""GSM8K-style math word problems through the model's chat template, greedy generation
(generation.py: in-process or served), numeric answer extraction, exact match.

By default the problem alone is the user turn (0-shot), the way stage 03's SFT rows ask it, so
a fine-tune is scored on what it was taught. With math.shots > 0 few-shot chain-of-thought
exemplars come first: alternating user/assistant turns before the problem. They are GSM8K
training problems with their reference solutions (ending '#### N') when a GSM8K train file is
present; otherwise problems of the eval set itself that are outside the scored subset, whose
assistant turn can only be 'The answer is <reference answer>.' (ASDiv has no worked solutions).
"""
from __future__ import annotations

from ..components import ComponentError, check_rewards, check_score, load_components
from ..runs import project_path
from .answers import extract_answer, is_correct
from .config import MATH_REWARD_COLUMNS, MathConfig, MathDataset
from .data import gsm8k_solution_turn, load_math, normalize_text, seeded_order, training_texts
from .generation import InProcessGenerator, encode, render
from .runtime import LoadedModel


def exemplar_turns(problem: dict) -> list[dict]:
    if problem["solution"] is not None:
        answer = gsm8k_solution_turn(problem["solution"])
    else:
        answer = f"The answer is {problem['answer_text'].strip()}."
    return [{"role": "user", "content": problem["question"]},
            {"role": "assistant", "content": answer}]


def build_messages(question: str, exemplars: list[dict], system_prompt: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for ex in exemplars:
        msgs.extend(exemplar_turns(ex))
    msgs.append({"role": "user", "content": question})
    return msgs


render_prompt = render  # the chat-template prompt of a problem (generation.render)


def prepare(conf: MathConfig, ds: MathDataset) -> dict:
    """The scored problems of one dataset and its exemplars (deterministic given math.seed)."""
    problems, skipped = load_math(ds.path, ds.format)
    # problems a model was trained on (e.g. ASDiv in the SFT train split) are neither scored
    # nor used as exemplars
    seen, missing = training_texts(conf.exclude_paths)
    before = len(problems)
    problems = [p for p in problems if normalize_text(p["question"]) not in seen]
    limit = conf.limit if ds.limit is None else ds.limit
    order = seeded_order(len(problems), conf.seed)
    scored_idx = order[:limit] if limit else order
    fewshot_file = next((p for p in conf.fewshot_paths if project_path(p).is_file()), None)
    if conf.shots == 0:
        exemplars, source = [], "none (0-shot)"
    elif fewshot_file:
        pool, _ = load_math(fewshot_file, "gsm8k")
        exemplars = [pool[i] for i in seeded_order(len(pool), conf.seed)[:conf.shots]]
        source = f"GSM8K train: {fewshot_file}"
    else:
        rest = order[len(scored_idx):]
        if len(rest) < conf.shots:
            raise ValueError(f"math.datasets[{ds.name}]: {len(rest)} problems outside the scored "
                             f"subset, {conf.shots} exemplars asked (lower math.shots or limit)")
        exemplars = [problems[i] for i in rest[:conf.shots]]
        source = f"{ds.name} problems outside the scored subset"
    return {"problems": [problems[i] for i in scored_idx], "exemplars": exemplars,
            "exemplar_source": source, "fewshot_file": fewshot_file if conf.shots else None,
            "non_numeric_skipped": skipped, "pool_size": len(problems),
            "excluded_as_training_data": before - len(problems), "exclude_paths_missing": missing}


def score_components(conf: MathConfig, items: list[dict], prompts: list[str]) -> dict:
    """Plug-in metrics (metric(response, gold) per problem) and rewards (TRL-style, over all
    completions at once) -> {"metrics"|"rewards": {name: {"mean", "n"}}}; each item gets its values."""
    out: dict = {}
    completions = [it["response"] for it in items]
    for kind, specs, key in (("metric", conf.metrics, "math.metrics"), ("reward", conf.rewards, "math.rewards")):
        provides = MATH_REWARD_COLUMNS if kind == "reward" else ()
        for name, fn in load_components(kind, specs, key, provides).items():
            try:
                if kind == "metric":
                    vals = [check_score("metric", name, fn(it["response"], it["gold"])) for it in items]
                else:
                    vals = check_rewards(name, fn(prompts=prompts, completions=completions,
                                                  answer=[it["gold"] for it in items],
                                                  question=[it["question"] for it in items]), len(items))
            except ComponentError:
                raise
            except Exception as e:
                raise ComponentError(f"{kind} {name!r} ({key}) raised {type(e).__name__}: {e}") from e
            for it, v in zip(items, vals):
                it.setdefault(f"{kind}s", {})[name] = v
            scored = [v for v in vals if v is not None]
            out.setdefault(f"{kind}s", {})[name] = {"mean": sum(scored) / len(scored) if scored else None,
                                                    "n": len(scored)}
    return out


def evaluate(lm: LoadedModel, conf: MathConfig, ds: MathDataset, runtime, prepared: dict,
             generator=None) -> dict:
    """Score one dataset; generation runs in-process unless a served generator is given."""
    gen = generator or InProcessGenerator(lm, runtime)
    items, prompts = [], []
    for p in prepared["problems"]:
        prompt = encode(lm.tokenizer, build_messages(p["question"], prepared["exemplars"], conf.system_prompt))
        prompts.append(prompt)
        items.append({"row": p["row"], "question": p["question"], "gold": p["gold"]})
    if not items:
        raise ValueError(f"math.datasets[{ds.name}]: no problems to score")
    outs = gen.generate(prompts, conf.max_new_tokens, desc=f"math {ds.name}")
    for it, o in zip(items, outs):
        pred = extract_answer(o["text"])
        it.update(response=o["text"], pred=pred, correct=is_correct(pred, it["gold"]),
                  prompt_tokens=o["prompt_tokens"], new_tokens=o["new_tokens"], stopped=o["stopped"])
    n = len(items)
    # what the model saw, for rewards; the same for every problem but the question, so the
    # records leave it out and the summary keeps one example
    extra = score_components(conf, items, [p.text for p in prompts])  # {} without metrics/rewards
    return {"n": n, "correct": sum(it["correct"] for it in items),
            "exact_match": sum(it["correct"] for it in items) / n,
            "no_answer": sum(it["pred"] is None for it in items),
            "hit_max_new_tokens": sum(not it["stopped"] for it in items),
            "mean_prompt_tokens": sum(it["prompt_tokens"] for it in items) / n,
            "mean_new_tokens": sum(it["new_tokens"] for it in items) / n,
            **extra, "generation": gen.backend,
            "batch_size": gen.batch_size, "example_prompt": prompts[0].text, "records": items}
