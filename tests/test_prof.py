"""Device-side profiling helpers: the kernel breakdown of a Chrome trace and the kernel floor."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from forgelab.prof.floor import Shape, step_floor
from forgelab.prof.kernels import category, kernel_breakdown, trace_events
from forgelab.runs import PROJECT_ROOT


def _kernel(name, ts, dur, stream=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_categories_of_real_kernel_names():
    assert category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention"
    assert category("void fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"  # not a gemm
    assert category("triton_poi_fused__unsafe_view_mul_silu_silu_backward_view_2") == "triton_compiled"
    assert category("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer_foreach"
    assert category("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "collective"
    assert category("Memcpy DtoD", "gpu_memcpy") == "memcpy"


def test_breakdown_counts_overlap_once_and_finds_the_idle_gaps(tmp_path):
    # one step: a gemm 0-100 us, an overlapping copy on another stream 50-120, a gap, then a
    # triton kernel 200-300 and a memset 300-310; CPU events are not device time
    events = [_kernel("nvjet_sm90_tst_x", 0, 100), _kernel("Memcpy DtoD", 50, 70, 13, "gpu_memcpy"),
              _kernel("triton_red_fused_x", 200, 100), _kernel("Memset", 300, 10, 7, "gpu_memset"),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 400}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    k = kernel_breakdown(trace_events(trace), steps=1)
    assert k["window_ms_per_step"] == pytest.approx(0.310)
    assert k["busy_ms_per_step"] == pytest.approx(0.230)  # 0-120 + 200-310
    assert k["idle_fraction"] == pytest.approx(1 - 230 / 310)
    shares = {c["category"]: c["ms_per_step"] for c in k["categories"]}
    assert shares == pytest.approx({"gemm": 0.1, "memcpy": 0.07, "triton_compiled": 0.1, "memset": 0.01})
    assert k["top_kernels"][0]["calls_per_step"] == 1
    cpu_only = tmp_path / "cpu.json"
    cpu_only.write_text(json.dumps({"traceEvents": events[-1:]}))
    assert kernel_breakdown(trace_events(cpu_only), steps=1) is None


def test_step_floor_sums_layers_and_takes_the_fastest_attention():
    shape = Shape(hidden=8, intermediate=16, layers=3, heads=2, kv_heads=1, head_dim=4, vocab=32)
    mm = [{"matmul": n, "ms_fwd_bwd": 1.0} for n, _, _ in shape.linears()] + [{"matmul": "lm_head",
                                                                              "ms_fwd_bwd": 5.0}]
    att = [{"backend": "flash", "ms_fwd_bwd": 2.0}, {"backend": "cudnn", "ms_fwd_bwd": 1.0},
           {"backend": "efficient", "error": "No available kernel"}]
    f = step_floor(shape, tokens=1000, matmuls=mm, attention=att, fpt=1e9, peak=1e15)
    assert f["ms_per_micro_batch"] == pytest.approx(3 * (7 + 1) + 5)
    assert f["attention_backend"] == "cudnn"
    assert f["tokens_per_s"] == pytest.approx(1000 / 0.029)
    assert f["mfu"] == pytest.approx(f["tokens_per_s"] * 1e9 / 1e15)


def test_kernel_floor_script_times_a_real_shape_on_cpu(tmp_path):
    out = tmp_path / "floor.json"
    p = subprocess.run([sys.executable, "scripts/kernel_floor.py", "--preset", "tiny", "--device", "cpu",
                        "--dtype", "fp32", "--micro-batch", "1", "--seq", "128", "--repeats", "2", "--out", str(out)],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    body = json.loads(out.read_text())
    (f,) = body["floors"]
    assert [r["matmul"] for r in f["matmuls"]][-1] == "lm_head" and len(f["matmuls"]) == 8
    assert all(r["ms_fwd_bwd"] > 0 and r["tflops_fwd_bwd"] > 0 for r in f["matmuls"])
    assert f["attention"][0]["backend"] == "math" and f["attention"][0]["ms_fwd_bwd"] > 0
    assert f["floor"]["tokens_per_s"] > 0 and body["copy_bytes_per_s"] > 0
    assert "floor:" in p.stdout
