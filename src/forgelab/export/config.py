"""Export config (kind "export"): what is exported, to which formats, and the gate every
deliverable must pass before it is published. Every key: `python scripts/config.py keys export`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import ConfigError, field
from ..train.merge import DEFAULT_PROMPTS as MERGE_PROMPTS

FORMATS = ("hf", "gguf", "mixed")
SERVERS = ("inprocess", "transformers", "vllm", "llamacpp")
# which servers can run which format (vLLM's GGUF loader needs CUDA kernels; the mixed format
# is the lab's own and loads in-process only)
SERVERS_FOR = {"hf": ("inprocess", "transformers", "vllm"), "gguf": ("inprocess", "llamacpp"),
               "mixed": ("inprocess",)}

# the merge check's prompts (stage 08) and two short-answer ones
DEFAULT_PROMPTS = [
    *MERGE_PROMPTS,
    "What is the capital of France? Answer in one word.",
    "List three prime numbers greater than 10.",
]


@dataclass
class Deliverable:
    name: str = field(help="directory name under output_root (and the report's row label)")
    format: Literal["hf", "gguf", "mixed"] = field(
        help="hf: the model dir itself (gated, not copied); gguf: one GGUF file (+ Modelfile); "
             "mixed: the lab's INT4/INT8/FP16 per-layer format")
    qtype: str = field("", help="gguf: F32, F16, Q8_0, Q4_0, Q4_1 (gguf package) or Q4_K_M, Q5_K_M, Q6_K "
                       "(llama.cpp's quantizer); mixed: a policy (fishai, int8, int4, fp16)")
    servers: list[str] = field([], help="servers to gate it on; [] = every one that runs the format")
    group_size: int = field(0, help="mixed: INT4 group size of this deliverable; 0: mixed_group_size")
    tolerance: Literal["auto", "exact", "int8", "int4"] = field(
        "auto", help="which tolerance applies; auto: from the format and qtype")


@dataclass
class Tolerances:
    int8_ppl: float = field(0.005, help="INT8 / Q8_0: held-out perplexity at most this much above the trained model's")
    int4_ppl: float = field(0.05, help="INT4 / Q4 (and other 4-6 bit types): perplexity bound")
    exact_greedy: bool = field(True, help="merged / F16 / F32: every greedy continuation identical")


@dataclass
class PerplexityData:
    path: str = field("data/cleaned/cpt/heldout.jsonl", help="held-out documents (JSONL)")
    fallback_path: str = field("data/raw/wikitext_sample/test.jsonl", help="used when path is missing")
    text_key: str = field("text", help="field with the text")
    max_tokens: int = field(2048, help="tokens scored (the documents' stream is cut here)")
    max_length: int = field(256, help="window length")
    stride: int = field(192, help="tokens between window ends (each target scored once)")


@dataclass
class MathData:
    path: str = field("data/raw/asdiv/test.jsonl", help="math problems")
    format: Literal["gsm8k", "asdiv"] = field("asdiv", help="as eval's math.datasets[].format")
    exclude_paths: list[str] = field(["data/cleaned/sft/train.jsonl"], help="training files whose problems are not used")
    limit: int = field(24, help="problems decoded by every deliverable x server (0: none)")
    max_new_tokens: int = field(48, help="tokens per answer")
    seed: int = field(1234, help="which problems (a seeded subset)")


@dataclass
class GateConfig:
    prompts: list[str] = field(DEFAULT_PROMPTS, help="user turns, rendered with the chat template: prompt ids, "
                               "greedy continuations and their log-probabilities are compared")
    max_new_tokens: int = field(32, help="greedy tokens per prompt")
    perplexity: PerplexityData = field(PerplexityData, help="held-out perplexity")
    math: MathData = field(MathData, help="math accuracy delta")
    servers: list[str] = field(list(SERVERS), help="servers the gate may use")
    require_servers: bool = field(False, help="a server that is not installed fails the gate (CI); false: "
                                  "its rows say why they did not run")
    tolerances: Tolerances = field(Tolerances, help="verdict thresholds")
    serve_overrides: dict[str, list[str]] = field({}, help="per server, --set style overrides of its "
                                                  "configs/serve/<server>.yaml")
    server_threads: int = field(0, help="threads of each server; 0: all cores")
    adapters: dict[str, str] = field({}, help="LoRA adapters served together on their base by vLLM (name -> "
                                     "dir, loaded at run time): each one's greedy tokens and log-probs are "
                                     "checked against PEFT (base + that adapter), the base's too")
    adapter_max_logprob_diff: float = field(1e-3, help="served adapters: largest allowed |log p| difference")


@dataclass
class ExportConfig:
    model: str = field("model/merged-sft", help="the model dir exported (a merged or fully trained model)")
    adapter: Optional[str] = field("runs/train/sft_lora/final", help="the LoRA adapter the model was merged "
                                   "from: the gate's reference is base + adapter (PEFT), the model as trained; "
                                   "null: the model dir itself is the reference")
    base_model: Optional[str] = field(None, help="base of the adapter; null: the adapter's base_model_name_or_path")
    output_root: str = field("model/export", help="published deliverables: <output_root>/<name>/")
    deliverables: list[Deliverable] = field(
        [{"name": "merged", "format": "hf"}, {"name": "q8_0", "format": "gguf", "qtype": "Q8_0"},
         {"name": "fishai", "format": "mixed", "qtype": "fishai"}],
        help="what to export")
    mixed_group_size: int = field(128, help="INT4 group size of the mixed format")
    mixed_clip_search: bool = field(True, help="mixed format: choose each group's clipping range by least squares")
    modelfile: bool = field(True, help="write an Ollama Modelfile beside each GGUF")
    gate: GateConfig = field(GateConfig, help="the deployment-equivalence gate")
    on_refusal: Literal["fail", "continue"] = field(
        "fail", help="a deliverable past its tolerance is never published; fail: the stage exits 1 as well")
    report: str = field("reports/export_gate.md", help="the gate's report (+ .json beside it)")
    threads: int = field(0, help="torch threads in this process; 0: torch's default")

    def validate(self) -> None:
        names = [d.name for d in self.deliverables]
        if not names:
            raise ConfigError("key 'deliverables' is empty")
        if len(set(names)) != len(names):
            raise ConfigError(f"key 'deliverables': names repeat: {names}")
        for i, d in enumerate(self.deliverables):
            if not d.name or "/" in d.name or d.name.startswith("."):
                raise ConfigError(f"key 'deliverables[{i}].name': {d.name!r} is not a plain directory name")
            if d.format != "hf" and not d.qtype:
                raise ConfigError(f"key 'deliverables[{i}].qtype' is needed for format {d.format}")
            for s in d.servers:
                if s not in SERVERS_FOR[d.format]:
                    raise ConfigError(f"key 'deliverables[{i}].servers': {s!r} cannot run format {d.format} "
                                      f"(it can: {', '.join(SERVERS_FOR[d.format])})")
        for s in self.gate.servers:
            if s not in SERVERS:
                raise ConfigError(f"key 'gate.servers': unknown server {s!r} (known: {', '.join(SERVERS)})")
        if not self.gate.prompts:
            raise ConfigError("key 'gate.prompts' is empty")


def tolerance_class(d: Deliverable) -> str:
    """exact (merged, F16, F32, fp16), int8 (Q8_0, int8) or int4 (everything coarser)."""
    if d.tolerance != "auto":
        return d.tolerance
    q = d.qtype.upper()
    if d.format == "hf" or q in ("F32", "F16", "BF16", "FP16"):
        return "exact"
    if q in ("Q8_0", "INT8"):
        return "int8"
    return "int4"


def servers_of(d: Deliverable, allowed: list[str]) -> list[str]:
    return [s for s in (d.servers or SERVERS_FOR[d.format]) if s in allowed]
