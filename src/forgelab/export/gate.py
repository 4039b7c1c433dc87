"""The deployment-equivalence gate: does a deliverable, under a given server, behave like the
model as trained?

Every (deliverable, server) pair is a *runner* that can build a chat prompt its own way (its
chat template and tokenizer), decode greedily from it, and, where the server allows it, score a
given token sequence (teacher-forced log-probabilities). The reference runner is the trained
model in this process (base + adapter through PEFT when there is an adapter). Each runner is
compared with it on:

- prompt ids: the ids its template + tokenizer build for each gate prompt, id for id;
- greedy continuations: the first position where its tokens differ from the reference's;
- log-probabilities: of the reference's greedy continuation, teacher-forced (or, for a server
  that cannot score, of its own greedy tokens while they agree);
- held-out perplexity on the same token windows, relative to the reference;
- math accuracy on a seeded subset of held-out problems, and how often the answers agree.

A verdict per row against the deliverable's tolerance class (exact: identical greedy outputs;
int8 / int4: perplexity bounds), and for a failing deliverable the stage where its outputs
first diverge: the prompt (template / tokenizer), the export itself (its in-process load
already differs) or the server (only that server differs).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from ..eval.answers import extract_answer, is_correct
from ..eval.perplexity import windows
from ..serve.client import Endpoint, request


# ----------------------------------------------------------------------------- runners

@dataclass
class Greedy:
    ids: list[int]                 # generated tokens, the end token excluded
    logprobs: list[float] | None   # of each generated token, where the server reports them
    stopped: bool                  # ended on an end token (not on the length limit)


class Runner:
    """One deliverable under one server. Subclasses implement the three operations."""
    server = "?"
    no_score = ""  # why this server cannot score a token sequence ("" when it can)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def greedy(self, messages: list[dict], n: int) -> Greedy:
        raise NotImplementedError

    def score(self, ids: list[int]) -> list[float | None]:
        """log p(ids[i] | ids[:i]) for i >= 1 (None where the server withholds one)."""
        raise NotImplementedError(self.no_score)


def _strip_end(ids: list[int], lps: list[float] | None, eos: set[int]) -> tuple[list[int], list[float] | None, bool]:
    if ids and ids[-1] in eos:
        return ids[:-1], (lps[:-1] if lps is not None else None), True
    return ids, lps, False


class InProcess(Runner):
    """A transformers model in this process: exact ids, exact log-probabilities."""
    server = "inprocess"

    def __init__(self, model, tokenizer, eos_ids: set[int]):
        self.model, self.tok, self.eos = model.eval(), tokenizer, set(eos_ids)

    def prompt_ids(self, messages):
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def greedy(self, messages, n):
        import torch
        ids = self.prompt_ids(messages)
        out, lps, past = [], [], None
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(n):
                o = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = o.past_key_values
                logp = torch.log_softmax(o.logits[0, -1].double(), -1)
                t = int(torch.argmax(logp))
                out.append(t)
                lps.append(float(logp[t]))
                if t in self.eos:
                    break
                x = torch.tensor([[t]])
        ids_, lps_, stopped = _strip_end(out, lps, self.eos)
        return Greedy(ids_, lps_, stopped)

    def score(self, ids):
        import torch
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1)
        return logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


class VLLM(Runner):
    """A vLLM server: its own chat template via /tokenize, greedy and prompt log-probabilities
    through /v1/completions with token ids."""
    server = "vllm"

    def __init__(self, ep: Endpoint, eos_ids: set[int]):
        self.ep, self.eos = ep, set(eos_ids)

    def prompt_ids(self, messages):
        r = request(self.ep, "POST", "/tokenize", {"model": self.ep.model, "messages": messages,
                                                   "add_generation_prompt": True, "add_special_tokens": False})
        return list(r["tokens"])

    def _complete(self, ids: list[int], n: int, **extra) -> dict:
        body = {"model": self.ep.model, "prompt": ids, "max_tokens": n, "temperature": 0.0, "top_p": 1.0,
                "top_k": -1, "repetition_penalty": 1.0, "logprobs": 1, "return_tokens_as_token_ids": True, **extra}
        return request(self.ep, "POST", "completions", body, timeout=600)["choices"][0]

    def greedy(self, messages, n):
        c = self._complete(self.prompt_ids(messages), n)
        lp = c.get("logprobs") or {}
        ids = [int(t.split(":", 1)[1]) for t in lp.get("tokens") or []]
        lps = [float(x) for x in lp.get("token_logprobs") or []]
        ids, lps, stopped = _strip_end(ids, lps, self.eos)
        return Greedy(ids, lps, stopped or c.get("finish_reason") == "stop")

    def score(self, ids):
        c = self._complete(ids, 1, prompt_logprobs=0)
        out = []
        for tok, entry in zip(ids[1:], (c.get("prompt_logprobs") or [])[1:]):
            out.append(float(entry[str(tok)]["logprob"]))
        if len(out) != len(ids) - 1:
            raise RuntimeError(f"vllm returned {len(out)} prompt log-probs for {len(ids) - 1} tokens")
        return out


class TransformersServe(Runner):
    """`transformers serve` in the lab's guard with its prompt log: the chat request goes in as
    messages, the ids its generate() received and produced come back from the log."""
    server = "transformers"
    no_score = "transformers serve returns no log-probabilities"

    def __init__(self, ep: Endpoint, prompt_log, eos_ids: set[int]):
        self.ep, self.log, self.eos = ep, prompt_log, set(eos_ids)

    def _chat(self, messages, n) -> dict:
        import json
        before = len(self.log.read_text(encoding="utf-8").splitlines()) if self.log.exists() else 0
        request(self.ep, "POST", "chat/completions",
                {"model": self.ep.model, "messages": messages, "max_tokens": n, "temperature": 0.0,
                 "stream": False}, timeout=600)
        lines = self.log.read_text(encoding="utf-8").splitlines()
        if len(lines) != before + 1:
            raise RuntimeError(f"transformers serve logged {len(lines) - before} generate() calls for one request")
        return json.loads(lines[-1])

    def prompt_ids(self, messages):
        return self._chat(messages, 1)["prompt_ids"]

    def greedy(self, messages, n):
        rec = self._chat(messages, n)
        ids, _, stopped = _strip_end(list(rec.get("output_ids") or []), None, self.eos)
        while ids and ids[-1] in self.eos:  # generate() pads finished rows with the pad (= end) token
            ids.pop()
        return Greedy(ids, None, stopped or len(rec.get("output_ids") or []) < n)



class LlamaCpp(Runner):
    """llama-server: the GGUF's own chat template (/apply-template), its tokenizer (/tokenize),
    greedy decoding with each token's probability, prompt scoring where the server offers it."""
    server = "llamacpp"

    def __init__(self, ep: Endpoint, eos_ids: set[int]):
        from ..serve import llamacpp_client as lc
        self.ep, self.eos, self.lc = ep, set(eos_ids), lc

    def prompt_ids(self, messages):
        return self.lc.tokenize(self.ep, self.lc.apply_template(self.ep, messages))

    def greedy(self, messages, n):
        r = self.lc.greedy(self.ep, self.prompt_ids(messages), n)
        ids, lps, stopped = _strip_end(list(r["ids"]), r.get("logprobs"), self.eos)
        return Greedy(ids, lps, stopped or r.get("stop_type") == "eos")

    def score(self, ids):
        # llama-server returns no prompt log-probabilities: one forced token per position, each
        # reusing the cached prefix (llamacpp_client.prompt_logprobs says how)
        return self.lc.prompt_logprobs(self.ep, ids)


# ----------------------------------------------------------------------------- measurements

@dataclass
class Probe:
    """What the gate feeds every runner (built once from the reference tokenizer)."""
    chats: list[list[dict]]
    max_new_tokens: int
    ppl_stream: list[int]
    ppl_max_length: int
    ppl_stride: int
    math: list[dict]                 # {question, gold}
    math_max_new_tokens: int
    decode: Callable[[list[int]], str] = field(repr=False, default=str)
    # the reference's prompt + greedy continuation per chat (set after the reference is measured):
    # every runner that can score is teacher-forced on them
    ref_sequences: list[tuple[list[int], int]] = field(default_factory=list)
    source: dict = field(default_factory=dict)   # where the probe's data came from, for the report


def measure(runner: Runner, probe: Probe, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Everything the comparison needs from one runner (raw: ids, log-probs, answers)."""
    t0 = time.perf_counter()
    out: dict = {"server": runner.server}
    progress("prompt ids")
    out["prompt_ids"] = [runner.prompt_ids(c) for c in probe.chats]
    progress("greedy")
    out["greedy"] = [runner.greedy(c, probe.max_new_tokens) for c in probe.chats]
    progress("perplexity")
    if probe.ppl_stream and not runner.no_score:
        targets: list[float | None] = []
        for w in windows(len(probe.ppl_stream), probe.ppl_max_length, probe.ppl_stride):
            lps = runner.score(probe.ppl_stream[w.begin:w.end])
            targets += lps[len(lps) - w.n_targets:]
        out["target_lps"] = targets
        out["ppl"] = _ppl(targets)
        out["unscored"] = sum(t is None for t in targets)
        out["cont_scores"] = [runner.score(ids)[len(ids) - 1 - k:] if k else []
                              for ids, k in probe.ref_sequences]
    else:
        out["ppl"] = None
        out["no_score"] = runner.no_score or "no held-out tokens in the probe"
    progress("math")
    answers = []
    for p in probe.math:
        g = runner.greedy([{"role": "user", "content": p["question"]}], probe.math_max_new_tokens)
        pred = extract_answer(probe.decode(g.ids))
        answers.append({"pred": pred, "correct": is_correct(pred, p["gold"])})
    out["math"] = answers
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _ppl(lps: list[float | None], mask: list[bool] | None = None) -> float:
    kept = [x for i, x in enumerate(lps) if x is not None and (mask is None or mask[i])]
    return math.exp(-sum(kept) / len(kept))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(row: dict, ref: dict) -> dict:
    """The row's numbers against the reference's."""
    n = len(ref["prompt_ids"])
    ids_equal = [a == b for a, b in zip(row["prompt_ids"], ref["prompt_ids"])]
    div = [first_divergence(g.ids, r.ids) for g, r in zip(row["greedy"], ref["greedy"])]
    out = {"prompts": n, "prompt_ids_equal": sum(ids_equal),
           "first_bad_prompt": next((i for i, ok in enumerate(ids_equal) if not ok), None),
           "greedy_identical": sum(d is None for d in div), "first_divergence": div}
    if row.get("ppl") is not None and ref.get("ppl") is not None:
        out["ppl"] = row["ppl"]
        # a server that withholds some positions' probabilities (llama.cpp, inside a UTF-8
        # character) is compared with the reference on the positions it scored
        mask = [x is not None for x in row["target_lps"]]
        out["ppl_rel"] = row["ppl"] / _ppl(ref["target_lps"], mask) - 1.0
        out["ppl_unscored"] = row.get("unscored", 0)
    else:
        out["ppl"], out["ppl_rel"] = None, None
    if row.get("cont_scores") and ref.get("cont_scores"):
        d = [abs(a - b) for x, y in zip(row["cont_scores"], ref["cont_scores"]) for a, b in zip(x, y)
             if a is not None and b is not None]
        out["logprob_diff"], out["logprob_basis"] = summarize(d), "teacher-forced on the reference's greedy tokens"
    else:
        d = own_greedy_logprob_diffs(row, ref)
        out["logprob_diff"] = summarize(d)
        out["logprob_basis"] = "own greedy tokens while they agree" if d else "none reported by the server"
    m, rm = row["math"], ref["math"]
    if m:
        acc, racc = sum(a["correct"] for a in m) / len(m), sum(a["correct"] for a in rm) / len(rm)
        out["math_acc"], out["math_delta_points"] = acc, 100 * (acc - racc)
        out["math_agree"] = sum(a["pred"] == b["pred"] for a, b in zip(m, rm)) / len(m)
    return out


def own_greedy_logprob_diffs(row: dict, ref: dict) -> list[float]:
    out = []
    for g, r in zip(row["greedy"], ref["greedy"]):
        if g.logprobs is None or r.logprobs is None:
            continue
        d = first_divergence(g.ids, r.ids)
        k = len(g.ids) if d is None else d
        out += [abs(a - b) for a, b in zip(g.logprobs[:k], r.logprobs[:k])]
    return out


def verdict(cls: str, cmp: dict, tol) -> tuple[bool, str]:
    """(passed, why) for one row under its tolerance class."""
    if cmp["prompt_ids_equal"] != cmp["prompts"]:
        return False, f"prompt ids differ (prompt {cmp['first_bad_prompt']}): chat template or tokenizer"
    if cls == "exact":
        if tol.exact_greedy and cmp["greedy_identical"] != cmp["prompts"]:
            k = next(i for i, d in enumerate(cmp["first_divergence"]) if d is not None)
            return False, f"greedy differs: prompt {k} at token {cmp['first_divergence'][k]}"
        return True, "greedy identical on every prompt"
    bound = tol.int8_ppl if cls == "int8" else tol.int4_ppl
    if cmp["ppl_rel"] is None:
        return True, "perplexity not measurable on this server (greedy and prompt ids compared only)"
    if cmp["ppl_rel"] > bound:
        return False, f"perplexity +{100 * cmp['ppl_rel']:.2f}% > +{100 * bound:.1f}%"
    return True, f"perplexity {100 * cmp['ppl_rel']:+.2f}% within +{100 * bound:.1f}%"


def diverging_stage(rows: list[dict]) -> str:
    """Where a failed deliverable's outputs diverge first: prompt, export or a server."""
    failed = [r for r in rows if r.get("passed") is False]
    if not failed:
        return ""
    if any("prompt ids" in r["why"] for r in failed):
        s = next(r["server"] for r in failed if "prompt ids" in r["why"])
        return f"prompt: the chat template / tokenizer under {s}"
    if any(r["server"] == "inprocess" for r in failed):
        return "export: the file itself (its in-process load already differs)"
    return "serving: " + ", ".join(r["server"] for r in failed) + " (the in-process load of the same file passes)"


def summarize(vals: list[float]) -> dict:
    if not vals:
        return {"max": None, "mean": None, "n": 0}
    return {"max": max(vals), "mean": sum(vals) / len(vals), "n": len(vals)}
