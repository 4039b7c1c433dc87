"""Serving config (kind "serve"): which backend serves which model where, and the backend's
own settings. One file per backend under configs/serve/; `scripts/config.py keys serve` lists
every key."""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, field

API_KEY_ENV = "FORGELAB_API_KEY"


@dataclass
class VLLMSettings:
    python: str = field(".venv-vllm/bin/python",
                        help="interpreter of the vLLM environment (scripts/setup_vllm_cpu.sh makes it)")
    served_model_name: str = field("", help="model name clients send; empty: the model path")
    tensor_parallel_size: int = field(1, help="GPUs the weights are split across (--tensor-parallel-size)")
    max_model_len: int = field(2048, help="longest prompt + completion in tokens (--max-model-len)")
    gpu_memory_utilization: float | None = field(
        None, help="fraction of GPU memory vLLM may take (--gpu-memory-utilization); null: vLLM's default")
    kv_cache_memory_bytes: int | None = field(
        None, help="KV cache size in bytes (--kv-cache-memory-bytes); needed on CPU, e.g. 134217728")
    max_num_seqs: int = field(32, help="most sequences decoded at once (--max-num-seqs)")
    dtype: str = field("auto", help="weights/activation dtype (--dtype); float32 on CPU")
    enforce_eager: bool = field(False, help="no CUDA graphs / compilation (--enforce-eager); true on CPU")
    reasoning_parser: str = field("", help="split reasoning from the answer, e.g. qwen3 (--reasoning-parser)")
    lora_modules: dict[str, str] = field({}, help="adapter name -> adapter dir, served on one base "
                                         "(--enable-lora --lora-modules name=path ...)")
    max_lora_rank: int | None = field(None, help="largest LoRA rank among the adapters (--max-lora-rank); "
                                      "null: the smallest rank vLLM accepts that fits every adapter's r")
    runtime_lora: dict[str, str] = field({}, help="adapter name -> adapter dir, loaded after the server is up "
                                         "through POST /v1/load_lora_adapter (sets "
                                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING and --enable-lora)")
    max_loras: int | None = field(None, help="adapters usable in one batch (--max-loras); null: all configured "
                                  "adapters (vLLM's own default is 1, which serializes mixed requests)")
    extra_args: list[str] = field([], help="further api_server arguments, passed as given")
    env: dict[str, str] = field({}, help="extra environment for the server, e.g. VLLM_CPU_OMP_THREADS_BIND")


@dataclass
class TransformersSettings:
    device: str = field("cpu", help="device for inference: cpu, cuda:0, auto (--device)")
    dtype: str = field("auto", help="model dtype: auto, float32, bfloat16 (--dtype)")
    continuous_batching: bool = field(False, help="paged-attention continuous batching (--continuous-batching)")
    cb_num_blocks: int | None = field(None, help="continuous batching KV cache blocks of 256 tokens "
                                      "(--cb-num-blocks); null: sized from free memory (on CPU "
                                      "that took 14 GB of RAM for a tiny model)")
    cb_max_batch_tokens: int | None = field(None, help="continuous batching tokens per step "
                                            "(--cb-max-batch-tokens); null: sized from free memory")
    guard: bool = field(True, help="run inside forgelab's guard: malformed chat requests get 400 instead "
                        "of 500, and api_key is enforced; false runs the plain `transformers serve` CLI")
    prompt_log: bool = field(False, help="guard: append the token ids of every prompt the model received to "
                             "<server dir>/prompt_ids.jsonl (exact chat-template checks; off: it grows per request)")
    extra_args: list[str] = field([], help="further `transformers serve` arguments, passed as given")
    env: dict[str, str] = field({}, help="extra environment for the server")


@dataclass
class LlamaCppSettings:
    bin_dir: str = field("", help="dir holding llama-server; empty: $FORGELAB_LLAMACPP_HOME/0.3.36/bin "
                         "(default ~/.cache/forgelab/llama.cpp/0.3.36/bin, where scripts/setup_llamacpp.sh "
                         "installs it)")
    ctx_size: int = field(4096, help="context tokens shared by all slots (-c); each slot gets ctx_size / n_parallel")
    n_parallel: int = field(2, help="requests decoded at once, one slot each (-np)")
    threads: int = field(0, help="CPU threads for decoding (-t); 0: the top-level threads key, else llama.cpp's default")
    alias: str = field("", help="model name clients send and /v1/models lists (--alias); empty: the GGUF's file stem")
    extra_args: list[str] = field([], help="further llama-server arguments, passed as given")
    env: dict[str, str] = field({}, help="extra environment for the server")


@dataclass
class DeepSpeedInferenceSettings:
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", help="weights/activation dtype (--dtype); auto: fp32 on CPU, bf16 (else fp16) on CUDA")
    kernel_inject: bool = field(False, help="DeepSpeed's fused inference kernels (replace_with_kernel_inject); "
                                "CUDA only: on CPU the server says so and serves without them")
    tensor_parallel_size: int = field(1, help="GPUs the weights are split across; only 1 (more needs one "
                                      "process per GPU through the deepspeed launcher)")
    max_new_tokens: int = field(1024, help="cap on a request's max_tokens (and the default when it sends none)")
    served_model_name: str = field("", help="model name clients send and /v1/models lists; empty: the model path")
    env: dict[str, str] = field({}, help="extra environment for the server")


@dataclass
class ServeConfig:
    backend: Literal["transformers", "vllm", "llamacpp", "deepspeed"] = field("transformers", help="serving engine")
    name: str = field("", help="server name: its records live in runs/serve/<name>/ (default: backend)")
    model: str = field("model/smollm2-135m-instruct", help="model dir (or hub id) to serve")
    host: str = field("127.0.0.1", help="listen address; a non-loopback one needs api_key")
    port: int = field(8000, help="listen port")
    api_key: str = field("", help=f"key clients must send (Bearer); empty: taken from ${API_KEY_ENV} "
                         "if set. Prefer the environment variable to a key in a file")
    force_insecure: bool = field(False, help="allow a non-loopback host without an API key")
    threads: int = field(0, help="OMP_NUM_THREADS for the server; 0: leave the environment's")
    startup_timeout_s: float = field(600.0, help="seconds to wait for the server to answer")
    stop_timeout_s: float = field(30.0, help="seconds between SIGTERM and SIGKILL on stop")
    vllm: VLLMSettings = field(VLLMSettings, help="settings used when backend is vllm")
    transformers: TransformersSettings = field(TransformersSettings,
                                               help="settings used when backend is transformers")
    llamacpp: LlamaCppSettings = field(LlamaCppSettings, help="settings used when backend is llamacpp "
                                       "(model is a .gguf file)")
    deepspeed: DeepSpeedInferenceSettings = field(DeepSpeedInferenceSettings,
                                                  help="settings used when backend is deepspeed (DeepSpeed Inference)")

    def validate(self) -> None:
        if self.backend == "llamacpp":
            if not self.model.lower().endswith(".gguf"):
                raise ConfigError(f"key 'model': backend llamacpp serves a .gguf file, got {self.model!r} "
                                  "(a transformers model dir: make a GGUF first, or use backend transformers/vllm)")
            if self.llamacpp.n_parallel < 1 or self.llamacpp.ctx_size < self.llamacpp.n_parallel:
                raise ConfigError("keys 'llamacpp.n_parallel' and 'llamacpp.ctx_size' must be >= 1 and "
                                  "ctx_size >= n_parallel")
        if self.deepspeed.tensor_parallel_size != 1:
            raise ConfigError(f"key 'deepspeed.tensor_parallel_size': {self.deepspeed.tensor_parallel_size} is not "
                              "supported, only 1 (tensor parallelism needs one process per GPU)")
        if self.deepspeed.max_new_tokens < 1:
            raise ConfigError("key 'deepspeed.max_new_tokens' must be >= 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"key 'port': {self.port} is not a TCP port")
        if self.vllm.tensor_parallel_size < 1:
            raise ConfigError("key 'vllm.tensor_parallel_size' must be >= 1")
        for key in ("lora_modules", "runtime_lora"):
            for name in getattr(self.vllm, key):
                if not name or "=" in name or " " in name:
                    raise ConfigError(f"key 'vllm.{key}': bad adapter name {name!r}")
                if name == self.vllm.served_model_name:
                    raise ConfigError(f"key 'vllm.{key}': adapter name {name!r} is the served model's name")
        both = set(self.vllm.lora_modules) & set(self.vllm.runtime_lora)
        if both:
            raise ConfigError(f"keys 'vllm.lora_modules' and 'vllm.runtime_lora' both name {sorted(both)}")
        if self.vllm.max_loras is not None and self.vllm.max_loras < 1:
            raise ConfigError("key 'vllm.max_loras' must be >= 1")

    @property
    def server_name(self) -> str:
        return self.name or self.backend

    def resolved_api_key(self) -> str:
        return self.api_key or os.environ.get(API_KEY_ENV, "")

    def check_security(self) -> None:
        """Refuse to listen beyond this machine without an API key, unless forced."""
        if is_loopback(self.host) or self.resolved_api_key() or self.force_insecure:
            return
        raise ConfigError(
            f"host {self.host!r} is reachable from other machines and no API key is set: set "
            f"${API_KEY_ENV} (or api_key), bind 127.0.0.1, or set force_insecure: true to serve "
            "without authentication")


def is_loopback(host: str) -> bool:
    """True when every address the host name resolves to is a loopback address."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
