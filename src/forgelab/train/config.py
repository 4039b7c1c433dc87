"""The training config (kind ``train``): one schema for every task, track and backend.

Files compose in order: ``configs/train/<task>.yaml`` (which extends ``base.yaml``), then a
track overlay (``tracks/<track>.yaml``), then a backend overlay (``backends/<backend>.yaml``),
then ``--set`` overrides. ``python scripts/config.py keys train`` lists every key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from ..config import ConfigError, field

BACKENDS = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload")
# the backends DeepSpeed runs (each with its configs/ds/<backend>.json)
DEEPSPEED_BACKENDS = ("zero1", "zero2", "zero3", "zero3_offload")
# the backends under which dist.tensor_parallel / dist.sequence_parallel run (docs/parallelism.md):
# DeepSpeed ZeRO-1/2, the stages measured with 2 gloo ranks. Under ZeRO-3 transformers refuses to
# load a model for AutoTP (integrations/deepspeed.py: "Weight conversions ... with DeepSpeed Tensor
# Parallelism are not yet implemented")
MODEL_PARALLEL_BACKENDS = ("zero1", "zero2")
# the methods they are measured with: full-weight training on CPT blocks (fixed length, stock Trainer loop)
MODEL_PARALLEL_TASKS = ("cpt", "pretrain")


@dataclass
class ModelSection:
    path: Optional[str] = field(None, help="pretrained model dir (cpt, sft); a Hugging Face model directory")
    preset: Optional[str] = field(None, help="pretrain: size preset name from forgelab.model.presets; sft "
                                             "without model.path: a random-init model of that shape (benchmarks)")
    config: dict[str, Any] = field({}, help="pretrain: transformers config as a dict "
                                            "(model_type + sizes); overrides the preset's values")
    config_file: Optional[str] = field(None, help="pretrain: a transformers config.json to build the model from")
    tokenizer: Optional[str] = field(None, help="tokenizer dir; defaults to model.path (required for pretrain)")
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] = field(
        "sdpa", help="attention kernel; flex_attention skips the masked blocks of packed rows (block-sparse); "
                     "flash_attention_* falls back to sdpa (with a notice) when unavailable")
    init_seed: Optional[int] = field(None, help="pretrain: seed of the random init (default: seed)")


@dataclass
class DataSection:
    train: str = field("data/tokenized/cpt/train",
                       help="tokenized training dir (CPT blocks.npy + meta.json, or the SFT store)")
    eval: Optional[str] = field(None, help="tokenized held-out dir evaluated every eval.every_steps (optional)")
    max_train_items: Optional[int] = field(None, help="use only the first N rows/blocks of the train dir")
    pad_to_multiple_of: Optional[int] = field(None, help="SFT: pad each batch to a multiple of this length")
    allow_tokenizer_mismatch: bool = field(False, help="train even when the data's tokenizer fingerprint "
                                                       "differs from the model's tokenizer (not recommended)")
    num_workers: int = field(0, help="DataLoader worker processes per rank")
    pin_memory: bool = field(True, help="pin host memory for batches (CUDA only)")
    persistent_workers: bool = field(False, help="keep DataLoader workers alive between epochs")
    prefetch_factor: Optional[int] = field(None, help="batches prefetched per worker (needs num_workers > 0)")


@dataclass
class SFTSection:
    mode: Literal["lora", "full"] = field("lora", help="sft: LoRA adapters (peft) or full fine-tuning")


@dataclass
class LoraSection:
    r: int = field(16, help="LoRA rank")
    alpha: int = field(32, help="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = field(0.05, help="dropout on the LoRA input path")
    target_modules: Union[str, list[str]] = field("all-linear",
                                                  help="modules that get adapters: 'all-linear' or a list of names")
    modules_to_save: list[str] = field([], help="extra modules trained in full and saved with the adapter")
    quantize_base: Literal["none", "nf4"] = field(
        "none", help="nf4: QLoRA, the frozen base loaded in 4-bit NF4 (bitsandbytes, double quantization, "
                     "bf16 compute); CUDA only, refused on CPU. Merging dequantizes the base first")


@dataclass
class AlignSection:
    mode: Literal["lora", "full"] = field("lora", help="dpo/orpo/simpo/kto/grpo: LoRA adapters (lora.*) or every "
                                                       "weight (the --task <method>_full configs set full)")
    beta: float = field(0.1, help="dpo/kto: KL strength to the reference; orpo: odds-ratio weight (lambda); "
                                  "simpo: reward scale; grpo: KL coefficient (0 = no reference model)")
    loss_type: list[str] = field(["sigmoid"], help="dpo: TRL loss variants, e.g. [sigmoid], [ipo], [hinge], "
                                                   "[sigmoid, sft] (summed with loss_weights)")
    loss_weights: Optional[list[float]] = field(None, help="dpo: one weight per loss_type (null = 1 each)")
    label_smoothing: float = field(0.0, help="dpo (sigmoid, robust) / simpo: label smoothing of the preference")
    max_length: int = field(512, help="prompt + answer tokens kept per sequence (longer ones are truncated)")
    precompute_ref_log_probs: bool = field(False, help="dpo/kto: the reference log-probs once over the data before "
                                                       "training (no reference forward per step)")
    simpo_gamma: float = field(0.5, help="simpo: target reward margin")
    cpo_alpha: float = field(0.0, help="simpo: weight of the SFT (NLL) term on the chosen answer (0 = pure SimPO)")
    desirable_weight: float = field(1.0, help="kto: weight of good (label true) examples")
    undesirable_weight: float = field(1.0, help="kto: weight of bad (label false) examples")
    rewards: list[str] = field(["forgelab.align.rewards:math_exact_match", "forgelab.align.rewards:answer_format"],
                               help="grpo: reward components (module:function, docs/components.md 'reward'); the "
                                    "shipped ones: math_exact_match, answer_format, length_penalty")
    reward_weights: Optional[list[float]] = field(None, help="grpo: one weight per reward (null = 1 each)")
    advantage: Literal["group", "group_mean", "batch"] = field(
        "group", help="grpo advantage estimator: group = (r - group mean) / group std (GRPO); group_mean = r - group "
                      "mean (Dr. GRPO, no std scaling); batch = group mean removed, scaled by the batch std")
    grpo_loss: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = field(
        "dapo", help="grpo: how token losses are averaged (TRL loss_type)")
    num_generations: int = field(4, help="grpo: answers sampled per prompt (the group)")
    max_completion_length: int = field(48, help="grpo: new tokens per sampled answer")
    temperature: float = field(1.0, help="grpo: sampling temperature")
    top_p: float = field(1.0, help="grpo: nucleus sampling")
    epsilon: float = field(0.2, help="grpo: PPO-style clip range of the importance ratio")
    num_iterations: int = field(1, help="grpo: optimizer passes over each generated batch")
    use_vllm: bool = field(False, help="grpo: generate with vLLM (needs CUDA: TRL syncs weights over NCCL); "
                                       "else transformers generate")
    vllm_mode: Literal["colocate", "server"] = field("colocate", help="grpo + use_vllm: in this process, or a "
                                                                      "`trl vllm-serve` server")
    vllm_gpu_memory_utilization: float = field(0.3, help="grpo + use_vllm colocate: GPU memory share for vLLM")


@dataclass
class OptimSection:
    lr: float = field(3e-4, help="peak learning rate")
    min_lr_ratio: float = field(0.1, help="cosine floor as a fraction of lr (scheduler cosine_with_min_lr)")
    scheduler: Literal["cosine_with_min_lr", "cosine", "linear", "constant_with_warmup", "constant"] = field(
        "cosine_with_min_lr", help="learning-rate schedule after warm-up")
    warmup_steps: int = field(10, help="linear warm-up steps from 0 to lr")
    weight_decay: float = field(0.1, help="AdamW decoupled weight decay (never on norms, biases, embeddings)")
    beta1: float = field(0.9, help="AdamW beta1")
    beta2: float = field(0.95, help="AdamW beta2")
    eps: float = field(1e-8, help="AdamW epsilon")
    max_grad_norm: float = field(1.0, help="clip the global gradient norm to this (0 = no clipping)")
    fused: Literal["auto", "on", "off"] = field("auto", help="fused AdamW kernel: auto = on for CUDA")


@dataclass
class StepsSection:
    max_steps: int = field(30, help="optimizer steps of the schedule")
    micro_batch_size: int = field(2, help="rows per rank per forward pass")
    grad_accum: int = field(2, help="micro-batches accumulated per optimizer step")
    stop_after_steps: Optional[int] = field(None, help="stop (after a checkpoint) at this step while keeping the "
                                                       "max_steps schedule; used to test resume")


@dataclass
class RuntimeSection:
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(
        "auto", help="mixed precision: auto = bf16 on CUDA that supports it, else fp16 on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")
    torch_compile: Union[bool, Literal["cuda"]] = field(
        False, help="torch.compile the model: true, false, or cuda (on CUDA only; CPU runs eager with a notice)")
    compile_mode: Optional[str] = field(None, help="torch.compile mode (default, reduce-overhead = CUDA graphs, "
                                                   "max-autotune)")
    compile_scope: Literal["model", "blocks"] = field(
        "model", help="what torch_compile compiles: the whole model, or each decoder block plus the loss "
                      "(regional: one block's graph is reused, so compiling takes seconds)")
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = field(
        "auto", help="SDPA kernel on CUDA (auto = PyTorch's choice); cudnn and flash keep a fallback for masks")
    loss_chunk_tokens: int = field(0, help="LM head + loss over chunks of this many tokens, gradients taken in the "
                                           "forward pass (no full logits in memory); 0 = off. One rank, eager or "
                                           "compile_scope blocks")
    fp8: Optional[Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]] = field(
        None, help="FP8 training linears for the decoder's Linear layers, not the LM head: tensorwise, rowwise or "
                   "rowwise_with_gw_hp (torchao float8 scaling recipes); null = off. Full-weight training on single, ddp or zero2 with a GPU of compute "
                   "capability >= 8.9 and torchao installed; elsewhere off with a notice")
    fp8_lm_head: bool = field(False, help="with runtime.fp8: the LM head too (the largest matmul; the logits then "
                                          "come from FP8 inputs, so compare the loss curve)")
    liger_kernel: bool = field(False, help="Liger Triton kernels (CUDA + liger-kernel installed; else a notice)")
    liger_kernel_config: dict[str, Any] = field({}, help="which Liger kernels (rope, rms_norm, swiglu, "
                                                         "fused_linear_cross_entropy: true/false); {} = all")
    tf32: bool = field(True, help="allow TF32 matmuls on CUDA")
    threads: Optional[int] = field(None, help="torch CPU threads per rank (default: OMP_NUM_THREADS or torch's)")
    cuda_alloc_conf: Optional[str] = field(None, help="PyTorch CUDA allocator settings for this run (as "
                                                      "PYTORCH_CUDA_ALLOC_CONF, which wins when set), e.g. "
                                                      "expandable_segments:True against fragmentation")
    memory_cap_gib: Optional[float] = field(None, help="cap this rank's CUDA allocator at this many GiB, e.g. 79.6 to "
                                                       "run as on an 80 GB H100 on a larger GPU; CPU: ignored, notice")


@dataclass
class DistSection:
    nproc_per_node: Union[int, str] = field("auto", help="ranks per node: 'auto' = all GPUs, or 2 gloo ranks on "
                                                         "CPU (env NPROC overrides)")
    launcher: Literal["torchrun", "deepspeed"] = field("torchrun", help="multi-process launcher")
    master_port: int = field(29511, help="rendezvous port on one node (env MASTER_PORT overrides)")
    deepspeed: Optional[str] = field(None, help="DeepSpeed JSON config (zero1 / zero2 / zero3 / zero3_offload backends)")
    fsdp_config: dict[str, Any] = field({}, help="Trainer fsdp_config of the fsdp backend (version, "
                                                 "reshard_after_forward, auto_wrap_policy, cpu_offload, ...)")
    find_unused_parameters: bool = field(False, help="DDP: look for parameters without gradients each step")
    bucket_cap_mb: Optional[int] = field(None, help="DDP gradient bucket size in MB")
    timeout_s: int = field(1800, help="collective timeout in seconds")
    hostfile: Optional[str] = field(None, help="DeepSpeed launcher hostfile for multi-node (launcher=deepspeed)")
    tensor_parallel: int = field(1, help="DeepSpeed AutoTP training: each decoder Linear sharded over this many "
                                         "ranks (written as tensor_parallel.autotp_size into the DeepSpeed config); "
                                         "zero1/zero2, cpt/pretrain; data-parallel size = world / this. "
                                         "docs/parallelism.md")
    sequence_parallel: int = field(1, help="DeepSpeed Ulysses (ALST) sequence parallelism through accelerate's "
                                           "ParallelismConfig(sp_backend=deepspeed): each sequence split over this "
                                           "many ranks, attention heads all-to-all; zero1/zero2, cpt/pretrain, "
                                           "sdpa or flash attention; data-parallel size = world / this. "
                                           "docs/parallelism.md")


@dataclass
class CheckpointSection:
    every_steps: int = field(0, help="save a checkpoint every N optimizer steps (0 = none, except at stop)")
    keep_last: int = field(2, help="complete checkpoints kept (older ones are deleted)")
    resume: str = field("none", help="'none', 'auto' (latest complete checkpoint of this run, if any) or a path")
    overwrite: bool = field(False, help="when not resuming, clear an earlier run's outputs in the run dir "
                                        "(otherwise refuse)")
    save_final: bool = field(True, help="write the final model (or LoRA adapter) to <run dir>/final/")
    save_on_each_node: bool = field(False, help="multi-node without a shared filesystem: save on every node")
    manifest: Literal["sha256", "size"] = field("sha256", help="what a checkpoint's manifest records of each file: "
                                                               "sha256 (catches bit flips) or size only (fast)")
    disk_check: bool = field(True, help="before training: refuse when one checkpoint does not fit the free space, "
                                        "warn when keep_last + 1 checkpoints and the final model do not")
    grace_s: float = field(120.0, help="on SIGTERM/SIGINT: seconds to finish the step and save a checkpoint before "
                                       "exiting anyway (under torchrun its own 30 s limit applies too)")


@dataclass
class EvalSection:
    every_steps: int = field(0, help="held-out loss every N steps on data.eval (0 = off)")
    max_items: Optional[int] = field(None, help="evaluate only the first N held-out items")
    batch_size: int = field(4, help="rows per rank per evaluation forward pass")


@dataclass
class MlflowSection:
    tracking_uri: Optional[str] = field(None, help="MLflow tracking URI (file:, http:, ...); null = a file store "
                                                   "in <run dir>/mlruns")
    experiment: str = field("forgelab", help="MLflow experiment the run is created in")


@dataclass
class WandbSection:
    mode: Literal["offline", "online", "disabled"] = field(
        "offline", help="offline: write <dir>/wandb/offline-run-* and never reach the network (upload later "
                        "with wandb sync); online: stream to the W&B server; disabled: no-op run")
    project: str = field("forgelab", help="W&B project")
    dir: Optional[str] = field(None, help="where W&B writes its run dirs; null = <run dir>/wandb")


# tracker -> (module it needs, pip package that provides it)
TRACKER_PACKAGES = {"mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}


@dataclass
class MetricsSection:
    tensorboard: bool = field(True, help="write per-step scalars to <run dir>/tb/")
    trackers: list[Literal["mlflow", "wandb"]] = field(
        [], help="experiment trackers besides TensorBoard (mlflow, wandb): the same scalars and the resolved "
                 "config; settings under metrics.mlflow / metrics.wandb (docs/training.md, Experiment tracking)")
    peak_flops: Optional[float] = field(None, help="peak FLOP/s per device for MFU; null = known GPU table "
                                                   "(H100 bf16 989e12) on CUDA, no MFU on CPU")
    steady_skip_steps: int = field(2, help="first steps left out of the steady-state throughput and MFU")
    sample_digests: bool = field(False, help="write samples/rank<r>.jsonl: per optimizer step, a digest of every "
                                             "item the rank trained on (which samples each rank saw, in order)")
    mlflow: MlflowSection = field(MlflowSection, help="MLflow tracker (metrics.trackers lists mlflow)")
    wandb: WandbSection = field(WandbSection, help="Weights & Biases tracker (metrics.trackers lists wandb)")

    def validate(self) -> None:
        import importlib.util
        for name in self.trackers:
            module, package = TRACKER_PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"key 'metrics.trackers' lists {name}, but the {module} package is not "
                                  f"installed: pip install {package}")


@dataclass
class ProfileSection:
    enabled: bool = field(False, help="torch.profiler traces + time split + comms (profile track)")
    wait: int = field(1, help="profiler schedule: steps skipped first")
    warmup: int = field(1, help="profiler schedule: steps traced but discarded")
    active: int = field(2, help="profiler schedule: steps recorded")
    record_shapes: bool = field(True, help="record operator input shapes")
    profile_memory: bool = field(False, help="record tensor allocations")
    with_stack: bool = field(False, help="record Python stacks (large traces)")
    deepspeed: bool = field(False, help="zero backends: also run DeepSpeed's flops profiler (at the first recorded "
                                        "step) and communication logger; profile_summary.json sets their numbers "
                                        "beside the lab's FLOPs and trace-measured collectives")
    time_split: bool = field(True, help="host timers per phase (forward/backward/optimizer/data); on CUDA they "
                                        "sync at each boundary, so turn off to see the device's own idle time")


@dataclass
class SweepSection:
    name: Optional[str] = field(None, help="sweep name; runs are named <name>--NN")
    runs: list[dict[str, Any]] = field([], help="one mapping of dotted config keys to values per run")


@dataclass
class ResumeCheckSection:
    stop_at: int = field(0, help="resume track: stage 1 stops at this step, stage 2 resumes with auto")
    tolerance_cpu: float = field(0.0, help="max allowed |loss diff| on CPU fp32 (bit-exact expected)")
    tolerance_gpu: float = field(1e-3, help="max allowed |loss diff| on GPU (kernels are not bit-deterministic)")


@dataclass
class TrainConfig:
    task: str = field("cpt", help="the training method (forgelab/train/methods/): cpt = continue a pretrained "
                                  "model, pretrain = from scratch, sft = supervised (sft.mode lora or full)")
    track: str = field("pipeline", help="track name recorded in the summary (sanity, bench, profile, ...)")
    backend: Literal["single", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload"] = field(
        "single", help="parallel backend (set by configs/train/backends/<backend>.yaml)")
    run_name: Optional[str] = field(None, help="run dir runs/train/<run_name>/ (default <task>-<track>-<backend>)")
    loss: Optional[str] = field(None, help="a loss of your own, 'module:function' or 'path/file.py:function' "
                                           "(loss(outputs, labels, num_items_in_batch=None)); null = the "
                                           "model's causal-LM cross-entropy. docs/components.md")
    seed: int = field(42, help="seed of data order, dropout and init")
    estimate: dict[str, Any] = field({}, help="knobs of the pre-flight memory/step estimate recorded next to "
                                              "the measurement (forgelab.estimate.knobs.Knobs names)")
    model: ModelSection = field(ModelSection, help="what to train")
    data: DataSection = field(DataSection, help="tokenized data")
    sft: SFTSection = field(SFTSection, help="SFT mode")
    lora: LoraSection = field(LoraSection, help="LoRA adapter settings (sft.mode or align.mode = lora)")
    align: AlignSection = field(AlignSection, help="alignment methods after SFT (dpo, orpo, simpo, kto, grpo)")
    optim: OptimSection = field(OptimSection, help="AdamW and the learning-rate schedule")
    steps: StepsSection = field(StepsSection, help="batching and length")
    runtime: RuntimeSection = field(RuntimeSection, help="precision and speed knobs")
    dist: DistSection = field(DistSection, help="launching and the parallel engines")
    checkpoint: CheckpointSection = field(CheckpointSection, help="checkpoints and resume")
    eval: EvalSection = field(EvalSection, help="held-out loss during training")
    metrics: MetricsSection = field(MetricsSection, help="per-step metrics")
    profile: ProfileSection = field(ProfileSection, help="profiler (profile track)")
    sweep: SweepSection = field(SweepSection, help="optimize track: one run per override set")
    resume_check: ResumeCheckSection = field(ResumeCheckSection, help="resume track: the stop step and tolerance")

    def validate(self) -> None:
        from .methods import method_for, tasks
        m, s = self.model, self.steps
        if self.task not in tasks():
            raise ConfigError(f"key 'task': unknown task {self.task!r}; tasks: {', '.join(tasks())}")
        method = method_for(self)
        method.validate(self)
        if self.random_init and not m.tokenizer:
            raise ConfigError("a model built from model.preset needs model.tokenizer (the tokenizer dir the data "
                              "was built with)")
        for key, v in (("steps.max_steps", s.max_steps), ("steps.micro_batch_size", s.micro_batch_size),
                       ("steps.grad_accum", s.grad_accum), ("checkpoint.keep_last", self.checkpoint.keep_last),
                       ("lora.r", self.lora.r)):
            if v < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {v}")
        if s.stop_after_steps is not None and not 0 < s.stop_after_steps < s.max_steps:
            raise ConfigError(f"key 'steps.stop_after_steps' must be between 1 and steps.max_steps - 1 "
                              f"({s.max_steps - 1}), got {s.stop_after_steps}")
        if self.checkpoint.every_steps < 0:
            raise ConfigError("key 'checkpoint.every_steps' must be >= 0")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ConfigError(f"key 'optim.min_lr_ratio' must be in [0, 1], got {self.optim.min_lr_ratio}")
        if self.optim.lr <= 0:
            raise ConfigError(f"key 'optim.lr' must be > 0, got {self.optim.lr}")
        if self.optim.warmup_steps < 0 or self.optim.warmup_steps >= s.max_steps:
            raise ConfigError(f"key 'optim.warmup_steps' must be in [0, steps.max_steps), got "
                              f"{self.optim.warmup_steps} with max_steps {s.max_steps}")
        n = self.dist.nproc_per_node
        if isinstance(n, str) and n != "auto" or isinstance(n, int) and n < 1:
            raise ConfigError(f"key 'dist.nproc_per_node' must be 'auto' or an int >= 1, got {n!r}")
        if self.backend in DEEPSPEED_BACKENDS and not self.dist.deepspeed:
            raise ConfigError(f"backend {self.backend} needs dist.deepspeed (a configs/ds/*.json file)")
        if self.backend != "fsdp" and self.dist.fsdp_config:
            raise ConfigError(f"dist.fsdp_config is set but backend is {self.backend}; use backend fsdp")
        if self.backend not in DEEPSPEED_BACKENDS and self.dist.deepspeed:
            raise ConfigError(f"dist.deepspeed is set but backend is {self.backend}; use backend "
                              + ", ".join(DEEPSPEED_BACKENDS))
        self._validate_model_parallel()
        if self.profile.enabled and self.profile.active < 1:
            raise ConfigError("key 'profile.active' must be >= 1")
        rt = self.runtime
        if rt.torch_compile and rt.compile_scope == "blocks" and rt.compile_mode and "reduce-overhead" in rt.compile_mode:
            # measured on an H200: one block graph replayed once per layer overwrites the outputs that the
            # next layer and the backward still hold ("accessing tensor output of CUDAGraphs that has been
            # overwritten by a subsequent run")
            raise ConfigError("key 'runtime.compile_mode' reduce-overhead (CUDA graphs) cannot run with "
                              "runtime.compile_scope blocks: each layer's replay overwrites the previous layer's "
                              "outputs; use compile_scope model, or another compile_mode")
        if rt.fp8_lm_head and not rt.fp8:
            raise ConfigError("key 'runtime.fp8_lm_head' is on but runtime.fp8 is null; set a recipe")
        if self.loss:
            from ..components import load_component
            load_component("loss", self.loss, "loss")  # a wrong path or signature fails here, before any model
        if self.eval.every_steps and not self.data.eval:
            raise ConfigError("key 'eval.every_steps' is set but data.eval is empty")

    def _validate_model_parallel(self) -> None:
        """dist.tensor_parallel / dist.sequence_parallel: only the combinations measured on CPU
        (docs/parallelism.md); the world size and the sequence length are checked by the ranks
        (hf_args.model_parallel_sizes), which know them."""
        d = self.dist
        for key, v in (("dist.tensor_parallel", d.tensor_parallel), ("dist.sequence_parallel", d.sequence_parallel)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"key '{key}' must be an int >= 1 (1 = off), got {v!r}")
            if v == 1:
                continue
            if self.backend not in MODEL_PARALLEL_BACKENDS:
                raise ConfigError(f"key '{key}' = {v} needs backend zero1 or zero2 (DeepSpeed), got {self.backend}"
                                  + ("; under ZeRO-3 transformers cannot load a model for AutoTP"
                                     if key == "dist.tensor_parallel" and self.backend.startswith("zero3") else ""))
            if self.task not in MODEL_PARALLEL_TASKS:
                raise ConfigError(f"key '{key}' = {v} runs with task cpt or pretrain (full weights on CPT "
                                  f"blocks), got task {self.task}")
        if d.tensor_parallel > 1 and d.sequence_parallel > 1:
            raise ConfigError("keys 'dist.tensor_parallel' and 'dist.sequence_parallel' are both > 1; set one of "
                              "them (their combination is not measured)")
        if d.sequence_parallel > 1:
            if self.model.attn_implementation == "eager":
                raise ConfigError("key 'dist.sequence_parallel' needs model.attn_implementation sdpa, flex_attention "
                                  "or flash_attention_*: DeepSpeed's Ulysses attention does not wrap eager")
            if self.loss:
                raise ConfigError("key 'dist.sequence_parallel' computes the loss itself (transformers' "
                                  "deepspeed_sp_compute_loss, weighted over the sequence shards); unset key 'loss'")

    @property
    def model_parallel(self) -> int:
        """Ranks that train one data-parallel replica's batch together (AutoTP or Ulysses group)."""
        return self.dist.tensor_parallel * self.dist.sequence_parallel

    @property
    def method(self):
        """The training method this config selects (forgelab.train.methods)."""
        from .methods import method_for
        return method_for(self)

    @property
    def random_init(self) -> bool:
        """The model is built from a config with random weights (pretrain, or an sft benchmark shape)."""
        return self.method.random_init(self)

    def resolved_run_name(self) -> str:
        # a tensor/sequence-parallel run gets its own default name, not the plain backend's run dir
        mp = "".join(f"-{tag}{n}" for tag, n in (("tp", self.dist.tensor_parallel), ("sp", self.dist.sequence_parallel))
                     if n > 1)
        return self.run_name or f"{self.task}-{self.track}-{self.backend}{mp}"
