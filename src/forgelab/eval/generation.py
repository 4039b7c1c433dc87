"""Greedy generation for the eval's generation tasks, in-process or through a serving endpoint.

Both paths start from the same prompt: chat messages rendered with the model's own chat template
and tokenized here, once. The in-process path decodes in batches behind a shared-prefix cache;
the served path sends those prompts to the server's /v1/completions endpoint with greedy settings
(vLLM gets the token ids themselves; `transformers serve` gets the rendered text, and its prompt
token count is checked against ours), many requests at once so the server batches them.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm.auto import tqdm

from .prefix import batch_inputs, build_prefix, common_prefix_len
from .runtime import Batcher, LoadedModel, auto_batch_size, empty_cache_fn


@dataclass
class Prompt:
    text: str        # the chat-template rendering the model sees
    ids: list[int]   # its token ids (no special tokens added: the template has them)


class GenerationError(RuntimeError):
    """A served generation did not do what the in-process path would (prompt, settings, server)."""


def render(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                         f"generation tasks prompt through it")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, messages: list[dict]) -> Prompt:
    text = render(tokenizer, messages)
    return Prompt(text, tokenizer(text, add_special_tokens=False)["input_ids"])


class InProcessGenerator:
    """Batched greedy decoding with the model in this process."""

    backend = "inprocess"

    def __init__(self, lm: LoadedModel, runtime):
        self.lm, self.runtime = lm, runtime
        self.batch_size: int | None = None

    def generate(self, prompts: list[Prompt], max_new_tokens: int, desc: str = "generate") -> list[dict]:
        lm = self.lm
        enc = [p.ids for p in prompts]
        # a system prompt or exemplars shared by every prompt: encoded once, reused by all
        p = common_prefix_len(enc)
        prefix = build_prefix(lm, enc[0][:p])
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        batcher = Batcher(auto_batch_size(lm, self.runtime, len(enc[order[0]]) + max_new_tokens, 1),
                          empty_cache_fn(lm.device))
        with tqdm(total=len(enc), desc=desc, unit="prompt") as bar:
            outs = batcher.run([enc[i][p:] for i in order],
                               lambda b: _generate_batch(lm, prefix, b, max_new_tokens), bar)
        self.batch_size = batcher.batch_size
        res: list[dict] = [{}] * len(enc)
        for i, o in zip(order, outs):
            res[i] = o
        return res


def _generate_batch(lm: LoadedModel, prefix, suffixes: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy continuations of prompts (cached prefix + suffix), stopped at the end token."""
    import torch
    from transformers import GenerationConfig

    inputs = batch_inputs(prefix, suffixes, lm.pad_id, lm.device)
    head = torch.tensor([prefix.ids] * len(suffixes), dtype=torch.long, device=lm.device)
    ids = torch.cat([head.reshape(len(suffixes), -1), inputs["input_ids"]], dim=1)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=lm.eos_ids,
                           pad_token_id=lm.pad_id)
    with torch.inference_mode():
        # generate() derives position ids from the mask, so the padding in the middle is skipped
        out = lm.model.generate(input_ids=ids, attention_mask=inputs["attention_mask"],
                                past_key_values=inputs["past_key_values"], generation_config=gen)
    res = []
    eos = set(lm.eos_ids)
    for s, row in zip(suffixes, out[:, ids.shape[1]:].tolist()):
        n = next((j for j, t in enumerate(row) if t in eos), None)
        new = row if n is None else row[:n]
        res.append({"text": lm.tokenizer.decode(new, skip_special_tokens=True),
                    "prompt_tokens": len(prefix.ids) + len(s), "new_tokens": len(new), "stopped": n is not None})
    return res


class ServedGenerator:
    """Greedy completions from a running server of the lab (vLLM or `transformers serve`)."""

    def __init__(self, endpoint, backend: str, concurrency: int = 32, timeout_s: float = 600.0,
                 retries: int = 2):
        if backend not in ("vllm", "transformers"):
            raise ValueError(f"served generation supports the vllm and transformers backends, not {backend!r}")
        self.ep, self.backend = endpoint, backend
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        self.batch_size = None  # the server batches; reported for symmetry with in-process

    def body(self, prompt: Prompt, max_new_tokens: int) -> dict:
        b = {"model": self.ep.model, "max_tokens": max_new_tokens, "temperature": 0.0, "stream": False}
        if self.backend == "vllm":
            # the exact token ids; nothing from the model's generation_config may change greedy decoding
            b.update(prompt=prompt.ids, top_p=1.0, top_k=-1, repetition_penalty=1.0, skip_special_tokens=True)
        else:
            b["prompt"] = prompt.text  # transformers serve tokenizes text; its count is checked below
        return b

    def one(self, prompt: Prompt, max_new_tokens: int) -> dict:
        from ..serve.client import RequestError, request

        for attempt in range(self.retries + 1):
            try:
                r = request(self.ep, "POST", "completions", self.body(prompt, max_new_tokens),
                            timeout=self.timeout_s)
                break
            except RequestError as e:
                if attempt == self.retries or not e.retryable:
                    raise GenerationError(f"{self.backend} server at {self.ep.base_url}: {e}") from e
                time.sleep(1.0 + attempt)
        choice = r["choices"][0]
        usage = r.get("usage") or {}
        if usage.get("prompt_tokens") not in (None, len(prompt.ids)):
            raise GenerationError(f"{self.backend} server saw {usage['prompt_tokens']} prompt tokens where the "
                                  f"chat template gives {len(prompt.ids)}: its tokenization differs")
        stopped = choice.get("finish_reason") == "stop"
        new = int(usage.get("completion_tokens", 0))
        if stopped:
            new = max(0, new - 1)  # servers count the end token they stopped at; in-process does not
        return {"text": choice.get("text", ""), "prompt_tokens": len(prompt.ids), "new_tokens": new,
                "stopped": stopped}

    def generate(self, prompts: list[Prompt], max_new_tokens: int, desc: str = "generate") -> list[dict]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool, \
                tqdm(total=len(prompts), desc=f"{desc} ({self.backend})", unit="prompt") as bar:
            futures = [pool.submit(self.one, p, max_new_tokens) for p in prompts]
            for _ in as_completed(futures):
                bar.update(1)
        return [f.result() for f in futures]
