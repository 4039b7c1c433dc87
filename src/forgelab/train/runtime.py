"""Runtime resolution: what a requested speed or precision setting becomes on this machine.

Each ``choose_*`` takes the requested value and returns what the run applies, appending a notice
when the two differ (a CUDA-only setting on a CPU, a missing package), so the run record says
what ran. ``resolve`` applies the ones known before the model exists; the model-dependent ones
(FP8 linears, SDPA kernel, regional compile, chunked loss) are applied to the built model."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..model import base_model


@dataclass
class Runtime:
    on_cuda: bool
    precision: str      # bf16 | fp16 | fp32
    liger: bool
    compile: bool       # conf.runtime.torch_compile resolved
    memory_cap: int | None = None  # bytes the CUDA allocator may use (runtime.memory_cap_gib)
    fp8: str | None = None  # torchao float8 recipe applied to the Linear layers (runtime.fp8 resolved)


def resolve(conf, notices: list[str]) -> Runtime:
    on_cuda = torch.cuda.is_available()
    if conf.runtime.threads:
        torch.set_num_threads(conf.runtime.threads)
    apply_alloc_conf(conf.runtime.cuda_alloc_conf, on_cuda, notices)
    cap = choose_memory_cap(conf.runtime.memory_cap_gib, on_cuda, notices)
    precision = choose_precision(conf.runtime.precision, on_cuda, notices)
    liger = choose_liger(conf.runtime.liger_kernel, on_cuda, notices)
    compiled = choose_compile(conf.runtime.torch_compile, on_cuda, notices)
    conf.runtime.torch_compile = compiled  # resolved, so the recorded config says what ran
    fp8 = choose_fp8(conf, on_cuda, notices)
    return Runtime(on_cuda=on_cuda, precision=precision, liger=liger, compile=compiled, memory_cap=cap, fp8=fp8)


def apply_alloc_conf(value: str | None, on_cuda: bool, notices: list[str]) -> None:
    """PyTorch's CUDA allocator settings for this run; read when the allocator starts, i.e. before
    the first CUDA allocation of this process (an environment value already set wins)."""
    if not value:
        return
    if not on_cuda:
        notices.append(f"runtime.cuda_alloc_conf {value} sets the CUDA allocator; not used on CPU")
        return
    import os
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", value)


def choose_memory_cap(gib: float | None, on_cuda: bool, notices: list[str]) -> int | None:
    """Cap the CUDA caching allocator (a smaller card emulated on a larger one): allocations
    past the cap raise out-of-memory as they would on that card."""
    if not gib:
        return None
    if not on_cuda:
        notices.append(f"runtime.memory_cap_gib {gib:g} caps CUDA memory; CPU runs are not capped")
        return None
    import os
    dev = int(os.environ.get("LOCAL_RANK", "0"))
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = int(gib * 2**30)
    if cap < total:
        torch.cuda.set_per_process_memory_fraction(cap / total, dev)
        notices.append(f"CUDA memory capped at {gib:g} GiB of the device's {total / 2**30:.1f} GiB "
                       "(runtime.memory_cap_gib): measured as on a smaller card")
    return min(cap, total)


def choose_precision(want: str, on_cuda: bool, notices: list[str]) -> str:
    if want == "auto":
        if on_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        notices.append("CPU: training in fp32 (precision auto; bf16/fp16 are GPU settings)")
        return "fp32"
    if want == "fp16" and not on_cuda:
        notices.append("CPU: fp16 mixed precision needs CUDA; training in fp32")
        return "fp32"
    if want == "bf16" and not on_cuda:
        notices.append("CPU: bf16 autocast on CPU (slow on most CPUs; GPUs are where bf16 pays)")
    return want


def choose_attn(want: str, on_cuda: bool, notices: list[str]) -> str:
    if want == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available
        if not on_cuda or not is_torch_flex_attn_available():
            # PyTorch's CPU flex attention has no backward pass
            notices.append("flex_attention trains on CUDA only (torch has no CPU backward for it); using sdpa, "
                           "which builds the same block-diagonal mask from the position ids")
            return "sdpa"
    if want.startswith("flash_attention"):
        pkg = "flash_attn_interface" if want == "flash_attention_3" else "flash_attn"
        if not on_cuda or importlib.util.find_spec(pkg) is None:
            notices.append(f"{want} needs CUDA and the {pkg} package; using sdpa")
            return "sdpa"
    return want


def choose_compile(want, on_cuda: bool, notices: list[str]) -> bool:
    if want == "cuda" and not on_cuda:
        notices.append("runtime.torch_compile is 'cuda': CPU runs eager (compiling pays off on GPUs)")
        return False
    return bool(want)


def choose_fp8(conf, on_cuda: bool, notices: list[str]) -> str | None:
    """The torchao float8 recipe the run applies (runtime.fp8), or None with a notice saying why not."""
    want = conf.runtime.fp8
    if not want:
        return None
    why = None
    if not on_cuda:
        why = "FP8 matmuls need a CUDA GPU; CPU trains in the run's precision"
    elif (cc := torch.cuda.get_device_capability(_local_device())) < (8, 9):
        why = f"FP8 matmuls need compute capability >= 8.9 (Ada, Hopper); this GPU is {cc[0]}.{cc[1]}"
    elif importlib.util.find_spec("torchao") is None:
        why = "torchao is not installed"
    elif conf.method.trainable != "full":
        # torchao's float8 backward computes every weight gradient, frozen base weights' too
        why = "it converts full-weight training; a LoRA run's frozen base would still pay for weight gradients"
    elif conf.backend not in ("single", "ddp", "zero1", "zero2"):
        why = f"backend {conf.backend} shards the weights it would cast; use single, ddp, zero1 or zero2"
    if why:
        notices.append(f"runtime.fp8 {want} is off: {why}")
        return None
    if not conf.runtime.torch_compile:
        notices.append("runtime.fp8 without runtime.torch_compile: the float8 casts run unfused, usually "
                       "slower than bf16")
    return want


def fp8_filter(model, lm_head: bool = False):
    """torchtitan's module filter: Linear layers whose dims are multiples of 16 (FP8 tensor cores
    need them), and not the LM head unless asked (its logits feed the loss directly)."""
    head = base_model(model).get_output_embeddings()

    def keep(mod, fqn: str) -> bool:
        if not isinstance(mod, torch.nn.Linear) or (mod is head and not lm_head):
            return False
        out_f, in_f = mod.weight.shape
        return out_f % 16 == 0 and in_f % 16 == 0
    return keep


def apply_fp8(model, recipe: str, lm_head: bool = False) -> int:
    """Swap the filtered Linear layers for torchao's Float8Linear (same parameters, a tied head
    stays tied; FP8 matmuls with dynamic scaling of the given recipe); before compile, so the
    casts fuse into the graph. Returns how many layers were converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear
    convert_to_float8_training(base_model(model), config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=fp8_filter(model, lm_head))
    return sum(isinstance(m, Float8Linear) for m in model.modules())


def _local_device() -> int:
    import os
    return int(os.environ.get("LOCAL_RANK", "0"))


def choose_loss_chunk(conf, model, world: int, notices: list[str]) -> int:
    n = conf.runtime.loss_chunk_tokens
    if not n:
        return 0
    base = base_model(model)
    head = getattr(base, "lm_head", None)
    why = None
    if conf.loss:
        why = "a loss component (key loss) replaces the model's loss"
    elif world > 1:
        why = "it runs the decoder outside the DDP/DeepSpeed wrapper, so it needs one rank"
    elif conf.runtime.torch_compile and conf.runtime.compile_scope == "model":
        why = "the whole-model compile wraps the forward it bypasses; use runtime.compile_scope=blocks"
    elif head is None or getattr(head, "bias", None) is not None or not hasattr(base, "model") or \
            getattr(base.config, "final_logit_softcapping", None):
        why = "the model has no plain bias-free lm_head over base.model"
    if why:
        notices.append(f"runtime.loss_chunk_tokens is off: {why}")
        return 0
    return n


def choose_liger(want: bool, on_cuda: bool, notices: list[str]) -> bool:
    if want and not on_cuda:
        notices.append("Liger kernels need CUDA (Triton); running without them")
        return False
    if want and importlib.util.find_spec("liger_kernel") is None:
        notices.append("runtime.liger_kernel is on but liger-kernel is not installed; running without it")
        return False
    return want


def apply_sdpa_backend(want: str, on_cuda: bool, notices: list[str]) -> str:
    """Pin PyTorch's SDPA kernel choice (process-wide flags, read when a graph is traced).
    cudnn and flash keep the memory-efficient kernel (flash) or math (cudnn) as the fallback
    for what they cannot run, such as the dense masks of packed rows under sdpa."""
    if want == "auto":
        return want
    if not on_cuda:
        notices.append(f"runtime.sdpa_backend {want} is a CUDA setting; CPU uses PyTorch's own choice")
        return "auto"
    b = torch.backends.cuda
    on = {"flash": ("flash", "efficient", "math"), "cudnn": ("cudnn", "math"),
          "efficient": ("efficient", "math"), "math": ("math",)}[want]
    b.enable_flash_sdp("flash" in on)
    b.enable_cudnn_sdp("cudnn" in on)
    b.enable_mem_efficient_sdp("efficient" in on)
    b.enable_math_sdp(True)
    return want


def decoder_blocks(model) -> torch.nn.ModuleList | None:
    """The decoder's layer list (through a peft wrapper too): the ModuleList as long as the
    config's num_hidden_layers."""
    base = base_model(model)
    n = getattr(base.config.get_text_config(), "num_hidden_layers", None)
    for m in base.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m
    return None


def compile_blocks(model, mode: str | None, notices: list[str], head: bool = False) -> int:
    """Regional compilation: each decoder block (all share one graph, so it compiles once) and
    the loss (fuses the logits' upcast, log-softmax and gather); with ``head`` the LM head too
    (an FP8 head: eager, its casts would take extra passes over the logits' gradient)."""
    blocks = decoder_blocks(model)
    if blocks is None:
        notices.append("runtime.compile_scope blocks: no decoder layer list found; compiling the whole model")
        model.compile(mode=mode)
        return 0
    for b in blocks:
        b.compile(mode=mode)
    base = base_model(model)
    base.loss_function = torch.compile(base.loss_function, mode=mode)
    if head:
        base.get_output_embeddings().compile(mode=mode)
    return len(blocks)
