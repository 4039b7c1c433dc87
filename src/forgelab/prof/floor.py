"""The device's floor for one training step of a model shape: every matmul of a decoder block
and of the LM head (forward, input gradient, weight gradient) and the attention kernel (forward
+ backward, per SDPA backend), each timed alone at the run's tokens per micro-batch, plus a
large copy for the memory bandwidth.

Summed over the layers this is the step time if nothing else ran (norms, RoPE, SwiGLU, the
loss, casts and the optimizer free): its tokens/s and MFU are the ceiling that a tuned run is
measured against. Matmuls run in bf16 (the autocast dtype), timed with CUDA events after a
warm-up: the median over repeats of 5 back-to-back calls on rotating random inputs.
"""
from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, conf) -> "Shape":
        heads = int(conf.num_attention_heads)
        return cls(hidden=int(conf.hidden_size), intermediate=int(conf.intermediate_size),
                   layers=int(conf.num_hidden_layers), heads=heads,
                   kv_heads=int(getattr(conf, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(conf, "head_dim", None) or conf.hidden_size // heads),
                   vocab=int(conf.vocab_size))

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one decoder block's matmuls."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


INNER = 5  # calls per timed repeat


def _timer(device):
    import torch

    def run(fn, make_inputs, repeats: int, warmup: int = 3, inner: int = INNER) -> float:
        """Median seconds of one fn(*inputs) over repeats; each repeat times `inner` calls back to
        back (so launch gaps and a cold clock weigh less), rotating over three input sets."""
        inputs = [make_inputs() for _ in range(3)]
        for k in range(warmup):
            fn(*inputs[k % len(inputs)])
        times = []
        for k in range(repeats):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for j in range(inner):
                    fn(*inputs[(k + j) % len(inputs)])
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3 / inner)
            else:
                import time
                t = time.perf_counter()
                for j in range(inner):
                    fn(*inputs[(k + j) % len(inputs)])
                times.append((time.perf_counter() - t) / inner)
        return statistics.median(times)
    return run


def matmul_floor(shape: Shape, tokens: int, device, dtype, repeats: int = 10) -> list[dict]:
    """Time Y = X W^T, dX = dY W and dW = dY^T X for each linear of a block and the LM head."""
    import torch
    run = _timer(device)
    rows = []
    for name, k, n in shape.linears() + [("lm_head", shape.hidden, shape.vocab)]:
        def inp(m=tokens, kk=k, nn=n):
            return (torch.randn(m, kk, device=device, dtype=dtype), torch.randn(nn, kk, device=device, dtype=dtype),
                    torch.randn(m, nn, device=device, dtype=dtype))
        t_fwd = run(lambda x, w, g: x @ w.t(), inp, repeats)
        t_dx = run(lambda x, w, g: g @ w, inp, repeats)
        t_dw = run(lambda x, w, g: g.t() @ x, inp, repeats)
        flops = 2.0 * tokens * k * n
        total = t_fwd + t_dx + t_dw
        rows.append({"matmul": name, "in": k, "out": n, "tokens": tokens,
                     "ms": {"forward": t_fwd * 1e3, "grad_input": t_dx * 1e3, "grad_weight": t_dw * 1e3},
                     "tflops": {"forward": flops / t_fwd / 1e12, "grad_input": flops / t_dx / 1e12,
                                "grad_weight": flops / t_dw / 1e12},
                     "ms_fwd_bwd": total * 1e3, "tflops_fwd_bwd": 3 * flops / total / 1e12})
    return rows


def attention_floor(shape: Shape, batch: int, seq: int, device, dtype, backends: list[str],
                    repeats: int = 10) -> list[dict]:
    """Causal SDPA forward + backward of one layer per backend (GQA through enable_gqa, as
    transformers calls it); a backend that cannot run the shape is reported, not fatal."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    run = _timer(device)
    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    b, s, hq, hk, d = batch, seq, shape.heads, shape.kv_heads, shape.head_dim
    # causal: half the non-causal 4*b*s*s*hq*d forward; backward 2.5x the forward (5 matmuls vs 2)
    flops_real = 0.5 * 4.0 * b * s * s * hq * d * 3.5
    rows = []
    for name in backends:
        def inp():
            q = torch.randn(b, hq, s, d, device=device, dtype=dtype, requires_grad=True)
            kk = torch.randn(b, hk, s, d, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(b, hk, s, d, device=device, dtype=dtype, requires_grad=True)
            return q, kk, v, torch.randn(b, hq, s, d, device=device, dtype=dtype)

        def fwd_bwd(q, kk, v, g):
            with sdpa_kernel([names[name]]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a backend that cannot run says why in the error too
                out = F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=hq != hk)
            torch.autograd.grad(out, (q, kk, v), g)  # no .grad accumulation between repeats
        try:
            t = run(fwd_bwd, inp, repeats)
        except RuntimeError as e:
            rows.append({"backend": name, "error": str(e).splitlines()[0][:200]})
            continue
        rows.append({"backend": name, "batch": b, "seq": s, "ms_fwd_bwd": t * 1e3,
                     "tflops_causal": flops_real / t / 1e12})
    return rows


def copy_bandwidth(device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    import torch
    run = _timer(device)
    n = nbytes // 4
    t = run(lambda a, b: b.copy_(a), lambda: (torch.randn(n, device=device), torch.empty(n, device=device)),
            repeats)
    return 2.0 * n * 4 / t


def step_floor(shape: Shape, tokens: int, matmuls: list[dict], attention: list[dict], fpt: float,
               peak: float | None) -> dict:
    """Seconds per micro-batch of tokens if only the matmuls and the best attention kernel ran."""
    block = sum(r["ms_fwd_bwd"] for r in matmuls if r["matmul"] != "lm_head")
    head = sum(r["ms_fwd_bwd"] for r in matmuls if r["matmul"] == "lm_head")
    ok = [r for r in attention if "ms_fwd_bwd" in r]
    best = min(ok, key=lambda r: r["ms_fwd_bwd"]) if ok else None
    attn = best["ms_fwd_bwd"] if best else 0.0
    ms = shape.layers * (block + attn) + head
    tps = tokens / (ms / 1e3)
    return {"ms_per_micro_batch": ms, "matmul_ms": shape.layers * block + head,
            "attention_ms": shape.layers * attn, "attention_backend": best["backend"] if best else None,
            "tokens_per_s": tps, "mfu": tps * fpt / peak if peak else None}
