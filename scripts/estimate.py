#!/usr/bin/env python3
"""Pre-flight estimate of a training run: peak GPU memory per device (weights, gradients,
optimizer states, activations, logits, buffers) and the number of optimizer steps.

  python scripts/estimate.py --config configs/train/base.yaml --set backend=zero2 --world-size 2
  python scripts/estimate.py --model qwen3-1.7b --items 2446 --world-size 2 \\
      --set per_device_batch_size=1 --set gradient_accumulation_steps=8 --set epochs=3

The model comes from the training config (a preset name, a configs/model/*.yaml or a model
directory) or --model; the item count from --items or the config's training data.
Estimator constants are tunable with --set estimate.<knob>=VALUE (see `--knobs`).
"""
import dataclasses
import sys

from forgelab import cli
from forgelab.config import to_dict
from forgelab.runs import write_json
from forgelab.estimate import estimator as est, measure, sources


def main() -> int:
    p = cli.parser(__doc__, default_config=None)
    p.add_argument("--model", help="preset name, configs/model/*.yaml or model directory (overrides the config)")
    p.add_argument("--items", type=int, help="training items (packed blocks or samples)")
    p.add_argument("--world-size", type=int, help="data-parallel ranks (default: config or 1)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the config's, else the data's meta.json)")
    p.add_argument("--json", metavar="PATH", help="also write the estimate as JSON")
    p.add_argument("--measure", type=int, metavar="STEPS", default=0,
                   help="also train STEPS steps on random tokens on this CUDA GPU and compare the measured "
                        "peak (torch.cuda.max_memory_allocated) with the prediction")
    p.add_argument("--knobs", action="store_true", help="list the estimator's tunable constants and exit")
    args = p.parse_args()
    if args.knobs:
        for f in dataclasses.fields(est.Knobs):
            print(f"estimate.{f.name} = {f.default!r}")
        return 0
    conf, source = sources.load_train_conf(args.config or [], args.overrides)
    model_conf, model_src = sources.resolve_model_config(conf, args.model)
    items, items_src, data_seq = sources.resolve_items(conf, args.items)
    world = args.world_size or sources.resolve_world_size(conf)
    knobs = est.knobs_from_conf(conf)
    shape = to_dict(conf)
    if args.seq_len or data_seq:
        shape["seq_len"] = args.seq_len or data_seq  # the data decides the length of CPT blocks
    e = est.estimate_run(shape, model_conf, items, world, knobs=knobs)
    print(f"config: {source}\nmodel: {model_src}\nitems: {items} ({items_src})\nworld size: {world}\n")
    print(est.format_table(e))
    if args.measure:
        m = measure.measure_peak(shape, model_conf, args.measure, knobs=knobs)
        e["measured"] = m
        print(f"\nmeasured peak {m['peak_memory_bytes'] / est.GiB:.3f} GiB on {m['device']} "
              f"(weights {m['weights_dtype']}, autocast {m['autocast']}); predicted "
              f"{e['peak_memory_bytes'] / est.GiB:.3f} GiB; measured/predicted "
              f"{m['peak_memory_bytes'] / e['peak_memory_bytes']:.3f}")
    if args.json:
        write_json(args.json, e)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
