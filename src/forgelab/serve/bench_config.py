"""Serving benchmark config (kind "bench_serving"): the server to load, the workload, the
arrival process and the SLOs for goodput. `scripts/config.py keys bench_serving` lists every key."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, field

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RandomWorkload:
    input_len: int = field(128, help="mean prompt length in tokens of the served tokenizer (user text)")
    output_len: int = field(32, help="mean completion length in tokens (max_tokens)")
    range_ratio: float = field(0.0, help="lengths drawn uniformly from [len*(1-r), len*(1+r)], 0 <= r < 1")


@dataclass
class ConversationWorkload:
    path: str = field("", help="ShareGPT-style JSON/JSONL ('conversations': from/value) or "
                      "messages JSONL ('messages': role/content), e.g. our SFT data")
    max_prompt_tokens: int = field(1024, help="skip conversations whose prompt is longer")
    max_output_tokens: int = field(256, help="cap on max_tokens taken from the reference answer")
    min_output_tokens: int = field(4, help="floor on max_tokens (and skip shorter references)")
    fixed_output_tokens: int = field(0, help="ask every request for this many tokens instead of "
                                     "the reference answer's length; 0: the reference length")


@dataclass
class BenchServingConfig:
    server: str = field("transformers", help="name of a server started by scripts/10_serve.sh; "
                        "empty: use base_url")
    base_url: str = field("", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                          "(overrides server)")
    model: str = field("", help="`model` sent in requests; empty: what the server expects")
    tokenizer: str = field("", help="tokenizer dir for prompts and token counts; empty: the served model")
    adapters: list[str] = field([], help="mixed-adapter workload: `model` names requests are spread over "
                                "(LoRA adapter names of a vLLM server, the base model's name allowed); "
                                "the report gets a row per name. Empty: every request sends `model`")
    adapter_weights: list[float] = field([], help="relative share of requests per entry of adapters (seeded "
                                         "draw); empty: round-robin")
    request_profile: Literal["auto", "vllm", "transformers", "openai"] = field(
        "auto", help="which optional fields requests may carry (transformers serve rejects unknown "
        "ones with 422); auto: from the server's backend")
    workload: Literal["random", "conversations"] = field("random", help="what the prompts are")
    random: RandomWorkload = field(RandomWorkload, help="random-token workload")
    conversations: ConversationWorkload = field(ConversationWorkload, help="conversation-file workload")
    num_prompts: int = field(50, help="measured requests")
    warmup_requests: int = field(2, help="requests sent (and not measured) before the run")
    request_rate: str = field("inf", help="mean requests per second (Poisson arrivals), or inf: "
                              "send all at once, bounded by max_concurrency")
    burstiness: float = field(1.0, help="gamma shape of inter-arrival times: 1 is Poisson, <1 "
                              "burstier, >1 more regular")
    max_concurrency: int = field(0, help="most requests in flight; 0: no limit (up to max_threads)")
    max_threads: int = field(256, help="client threads; bounds concurrency when max_concurrency is 0")
    temperature: float = field(0.0, help="sampling temperature sent with each request")
    ignore_eos: bool = field(True, help="ask for exactly max_tokens (sent only to backends that "
                             "accept it: vllm)")
    max_duration_s: float = field(0.0, help="stop sending new requests after this many seconds of the "
                                            "measured run (0: no limit); requests in flight finish, the "
                                            "ones never sent are reported as not sent, not as failures")
    request_timeout_s: float = field(300.0, help="a request failing as timeout after this long")
    slo: dict[str, float] = field({}, help="goodput SLOs in ms, e.g. {ttft: 500, tpot: 50}; keys: "
                                  + ", ".join(SLO_METRICS))
    percentiles: list[float] = field([50, 90, 99], help="percentiles reported for each latency")
    seed: int = field(0, help="seed of prompts, lengths and arrival times")
    report: str = field("", help="also write the report to this path stem (.md/.json/.png), e.g. "
                        "reports/serving_benchmark")
    title: str = field("", help="report title; empty: derived from server and workload")

    def validate(self) -> None:
        rate = self.rate()
        if not (rate > 0):
            raise ConfigError(f"key 'request_rate': {self.request_rate!r} must be > 0 or inf")
        if self.burstiness <= 0:
            raise ConfigError("key 'burstiness' must be > 0")
        if self.num_prompts < 1:
            raise ConfigError("key 'num_prompts' must be >= 1")
        if self.max_concurrency < 0 or self.max_threads < 1:
            raise ConfigError("keys 'max_concurrency' >= 0 and 'max_threads' >= 1")
        if not 0 <= self.random.range_ratio < 1:
            raise ConfigError("key 'random.range_ratio' must be in [0, 1)")
        if self.random.input_len < 1 or self.random.output_len < 1:
            raise ConfigError("keys 'random.input_len' and 'random.output_len' must be >= 1")
        for k, v in self.slo.items():
            if k not in SLO_METRICS:
                raise ConfigError(f"key 'slo.{k}': unknown SLO metric; use one of {list(SLO_METRICS)}")
            if v <= 0:
                raise ConfigError(f"key 'slo.{k}' must be > 0 ms")
        if any(not 0 < p < 100 for p in self.percentiles):
            raise ConfigError("key 'percentiles': each must be in (0, 100)")
        if self.workload == "conversations" and not self.conversations.path:
            raise ConfigError("key 'conversations.path' is required for workload: conversations")
        if self.adapter_weights and len(self.adapter_weights) != len(self.adapters):
            raise ConfigError(f"key 'adapter_weights': {len(self.adapter_weights)} weights for "
                              f"{len(self.adapters)} adapters")
        if any(w < 0 for w in self.adapter_weights) or (self.adapter_weights and sum(self.adapter_weights) <= 0):
            raise ConfigError("key 'adapter_weights': weights must be >= 0 with a positive sum")
        if len(set(self.adapters)) != len(self.adapters) or any(not a for a in self.adapters):
            raise ConfigError(f"key 'adapters': names must be non-empty and distinct, got {self.adapters}")
        if not self.server and not self.base_url:
            raise ConfigError("set 'server' (a name from scripts/10_serve.sh status) or 'base_url'")

    def rate(self) -> float:
        try:
            return float(self.request_rate)
        except ValueError:
            raise ConfigError(f"key 'request_rate': {self.request_rate!r} is not a number or inf") from None

    def concurrency_limit(self) -> int:
        cap = min(self.max_threads, self.num_prompts)
        return min(self.max_concurrency, cap) if self.max_concurrency else cap

    @property
    def unlimited_rate(self) -> bool:
        return math.isinf(self.rate())
