#!/usr/bin/env python
"""Check that packed SFT rows keep their samples apart on a device and attention kernel:
the logits of every sample in a packed batch equal the sample's logits alone (and naive
packing, with positions running on, differs). Writes a JSON result; exit code 1 on failure.

  python scripts/check_packing.py --data data/tokenized/sft/train --model model/smollm2-135m-instruct
  python scripts/check_packing.py --data DIR --preset qwen3-0.6b --tokenizer DIR --device cuda \\
      --attn sdpa flex_attention --out runs/packing_check.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build_model(args, attn: str, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=attn).to(device)
    from forgelab.model import presets
    conf = presets.build_config(args.preset)
    conf.vocab_size = max(conf.vocab_size, len(AutoTokenizer.from_pretrained(args.tokenizer)))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation=attn).to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="packed SFT store dir (stage 05 with packing: true)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model dir")
    src.add_argument("--preset", help="random-init model of this preset (forgelab.model.presets)")
    p.add_argument("--tokenizer", help="tokenizer dir (with --preset)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--attn", nargs="+", default=["sdpa"], help="attention kernels to check (sdpa, eager, "
                                                                 "flex_attention on CUDA)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype (default fp32)")
    p.add_argument("--rows", type=int, default=2, help="packed rows in the batch (the fullest ones)")
    p.add_argument("--max-samples", type=int, default=40, help="samples compared alone, at most")
    p.add_argument("--tol", type=float, default=1e-4, help="max |logit diff| allowed (fp32)")
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)
    if args.preset and not args.tokenizer:
        p.error("--preset needs --tokenizer")

    import torch

    from forgelab.data.sft_store import SFTDataset
    from forgelab.runs import now_iso, write_json
    from forgelab.train.packing_check import packed_vs_alone, sample_spans

    ds = SFTDataset(args.data)
    if not ds.meta.get("packed"):
        p.error(f"{args.data} is not a packed store (stage 05 packing: false)")
    order = sorted(range(len(ds)), key=lambda i: -len(sample_spans(ds[i]["position_ids"])))
    rows = [ds[i] for i in order[: args.rows]]
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    results = []
    for attn in args.attn:
        t0 = time.time()
        model = build_model(args, attn, dtype, args.device).eval()
        model.config.use_cache = False
        # flex attention compiles its kernel per shape: pad the lone samples to blocks of 128
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        res = packed_vs_alone(model, rows, int(ds.meta["pad_token_id"]), args.device,
                              max_samples=args.max_samples, pad_alone_to=128 if attn == "flex_attention" else None)
        naive = res["naive_packing_min_abs_logit_diff"]
        res.update(attn_implementation=model.config._attn_implementation, seconds=round(time.time() - t0, 1),
                   passed=res["max_abs_logit_diff"] <= args.tol and naive is not None and naive > 10 * args.tol)
        print(f"{attn}: {res['samples']} samples in {res['rows']} rows: max |logit diff| packed vs alone "
              f"{res['max_abs_logit_diff']:.2e} (tol {args.tol:g}); naive packing min {naive:.2e} -> "
              f"{'PASS' if res['passed'] else 'FAIL'}")
        results.append(res)
        del model
    body = {"date": now_iso(), "device": args.device,
            "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "model": args.model or f"preset {args.preset} (random init)",
            "dtype": args.dtype, "data": args.data, "tolerance": args.tol,
            "command": "python scripts/check_packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "results": results, "passed": all(r["passed"] for r in results)}
    if args.out:
        write_json(args.out, body)
    return 0 if body["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
