#!/usr/bin/env python
"""The device's floor for a training step of a model shape: each matmul of a decoder block and
the LM head (forward, input and weight gradients) and causal attention per SDPA backend, timed
alone at the run's tokens per micro-batch, and a copy for the memory bandwidth. Prints a table
and writes JSON: the tokens/s and MFU if nothing but those kernels ran (the ceiling a tuned run
is compared with).

  python scripts/kernel_floor.py --preset qwen3-1.7b --micro-batch 4 --seq 2048 --out floor.json
  python scripts/kernel_floor.py --preset tiny --device cpu --dtype fp32      # the code path, on CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="model shape (forgelab.model.presets or configs/model/*.yaml)")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[4], help="rows per micro-batch (several: one "
                                                                             "floor each)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="matmul dtype")
    p.add_argument("--backends", nargs="+", default=["flash", "cudnn", "efficient"],
                   help="SDPA backends to time (CUDA)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per kernel (median)")
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from forgelab.model import presets
    from forgelab.prof.floor import INNER, Shape, attention_floor, copy_bandwidth, matmul_floor, step_floor
    from forgelab.runs import now_iso, write_json
    from forgelab.train.flops import count_model, flops_per_token, peak_flops

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("notice: no CUDA device; timing on the CPU instead (numbers describe this CPU only)")
        args.device = "cpu"
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    conf = presets.build_config(args.preset)
    shape = Shape.from_config(conf)
    with torch.device("meta"):
        counts = count_model(AutoModelForCausalLM.from_config(conf))
    fpt = flops_per_token(counts, args.seq)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, peak_src = peak_flops(None, name if device.type == "cuda" else None, args.dtype)
    backends = args.backends if device.type == "cuda" else ["math"]
    result = {"command": "python scripts/kernel_floor.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": now_iso(), "device": name, "torch": torch.__version__, "dtype": args.dtype,
              "timing": f"CUDA events around {INNER} back-to-back calls, median of {args.repeats} repeats",
              "preset": args.preset, "shape": shape.__dict__, "seq": args.seq, "flops_per_token": fpt,
              "peak_flops": peak, "peak_flops_source": peak_src,
              "copy_bytes_per_s": copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (64 << 20),
                                                 args.repeats),
              "floors": []}
    print(f"{name}: copy {result['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")
    for mb in args.micro_batch:
        tokens = mb * args.seq
        mm = matmul_floor(shape, tokens, device, dtype, args.repeats)
        at = attention_floor(shape, mb, args.seq, device, dtype, backends, args.repeats)
        fl = step_floor(shape, tokens, mm, at, fpt, peak)
        result["floors"].append({"micro_batch": mb, "tokens": tokens, "matmuls": mm, "attention": at, "floor": fl})
        print(f"\nmicro batch {mb} x {args.seq} = {tokens} tokens")
        print(f"{'matmul':<10} {'in':>6} {'out':>7} {'fwd TF/s':>9} {'dX TF/s':>8} {'dW TF/s':>8} {'ms f+b':>7}")
        for r in mm:
            t = r["tflops"]
            print(f"{r['matmul']:<10} {r['in']:>6} {r['out']:>7} {t['forward']:>9.0f} {t['grad_input']:>8.0f} "
                  f"{t['grad_weight']:>8.0f} {r['ms_fwd_bwd']:>7.2f}")
        for r in at:
            if "error" in r:
                print(f"attention {r['backend']}: cannot run ({r['error']})")
            else:
                print(f"attention {r['backend']:<9} fwd+bwd {r['ms_fwd_bwd']:.2f} ms/layer, "
                      f"{r['tflops_causal']:.0f} TF/s (causal work)")
        mfu = f", MFU {fl['mfu']:.1%}" if fl["mfu"] else ""
        print(f"floor: {fl['ms_per_micro_batch']:.1f} ms per micro-batch (matmuls {fl['matmul_ms']:.1f}, attention "
              f"{fl['attention_ms']:.1f} with {fl['attention_backend']}) = {fl['tokens_per_s']:,.0f} tokens/s{mfu}")
    if args.out:
        write_json(Path(args.out), result)
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
