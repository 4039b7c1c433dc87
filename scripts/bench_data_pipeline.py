#!/usr/bin/env python3
"""Benchmark the CPT tokenize+pack stage on this machine: end-to-end tokens/s (jsonl in,
blocks.npy + meta.json out, worker start-up included) next to the tokenizer's own batch-encode
tokens/s on the same texts, in the same run, as medians of interleaved repeats.

  python scripts/bench_data_pipeline.py                    # the stage 02 train corpus
  python scripts/bench_data_pipeline.py --repeats 7 --max-docs 500

Writes reports/data_pipeline_benchmark.md and reports/data_pipeline_benchmark.json.
The reference runs with TOKENIZERS_PARALLELISM=true (the tokenizer's threads on every core);
the pipeline rows run with it as the main job sets it (false: scripts/run_pipeline.sh),
unless --pipeline-parallelism true. tokenizers reads the variable at every call.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "true"  # before tokenizers is imported

from forgelab import cli  # noqa: E402
from forgelab.data.tokenize_cpt import (TokenizeCPTConfig, load_tokenizer, time_datasets_map,  # noqa: E402
                                        time_pipeline, time_tokenizer_batch_encode)
from forgelab.runs import atomic_write_text, now_iso, project_path, write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="data/cleaned/cpt/train.jsonl", help="corpus jsonl (stage 02 output)")
    p.add_argument("--config", default="configs/data/tokenize_cpt.yaml", help="tokenize_cpt config")
    p.add_argument("--repeats", type=int, default=5, help="repeats per variant (medians are reported)")
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N documents (0: all)")
    p.add_argument("--no-datasets", action="store_true", help="skip the datasets.map variant")
    p.add_argument("--out", default="reports/data_pipeline_benchmark", help="report path without extension")
    p.add_argument("--pipeline-parallelism", choices=["false", "true"], default="false",
                   help="TOKENIZERS_PARALLELISM for the pipeline rows (the main job exports false)")
    a = p.parse_args()
    from forgelab import config as cfg
    conf = cfg.load(TokenizeCPTConfig, [project_path(a.config)])
    src = project_path(a.input)
    if not src.is_file():
        raise SystemExit(f"error: {src} not found (run scripts/02_build_cpt_corpus.py first)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if a.max_docs:
            lines = lines[:a.max_docs]
        data = tmp / "input.jsonl"
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        texts = [json.loads(ln)[conf.text_field] for ln in lines]
        tok = load_tokenizer(conf.tokenizer)

        def with_parallelism(value, fn):
            def run():
                os.environ["TOKENIZERS_PARALLELISM"] = value
                t0 = os.times()
                dt, n = fn()
                t1 = os.times()  # CPU of this process's threads and of its (joined) workers
                cpu = sum(t1[i] - t0[i] for i in range(4))
                return dt, n, cpu
            return run

        variants = {
            "reference: tokenizer encode_batch, one call over all texts in memory":
                with_parallelism("true", lambda: time_tokenizer_batch_encode(tok, texts, len(texts))),
            f"tokenizer encode_batch, {conf.batch_docs} texts per call, in memory":
                with_parallelism("true", lambda: time_tokenizer_batch_encode(tok, texts, conf.batch_docs)),
        }
        pp = a.pipeline_parallelism
        chosen_label = None
        for n, kind in [(0, "thread"), (2, "thread"), (2, "process")]:
            c = TokenizeCPTConfig(**{**cfg.to_dict(conf), "num_workers": n, "workers": kind})

            def run(c=c):
                dt, meta = time_pipeline(data, tmp / f"out{c.num_workers}{c.workers}", c, tok)
                return dt, meta["n_input_tokens"] - meta["n_documents"]  # EOS out: same count as reference
            label = ("pipeline, batches in turn (tokenizer's own threads)" if n == 0
                     else f"pipeline, {n} worker {'threads' if kind == 'thread' else 'processes'}")
            if (n, kind) == (conf.num_workers, conf.workers) or (n == 0 and conf.num_workers == 0):
                chosen_label = label
            variants[label] = with_parallelism(pp, run)
        if not a.no_datasets:
            variants["alternative: datasets.map(num_proc=2) + same packing"] = \
                with_parallelism(pp, lambda: time_datasets_map(data, tmp / "outds", conf, 2))

        load_before = os.getloadavg()
        for fn in variants.values():  # warm-up: file cache, first-call costs
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpus: dict[str, list[float]] = {k: [] for k in variants}
        tokens: dict[str, int] = {}
        for r in range(a.repeats):  # interleaved, so load from other processes hits all alike
            for k, fn in variants.items():
                dt, n, cpu = fn()
                times[k].append(dt)
                cpus[k].append(cpu)
                tokens[k] = n
                print(f"repeat {r + 1}/{a.repeats}  {k}: {n / dt:,.0f} tokens/s", file=sys.stderr)

    ref_key = next(iter(variants))
    ref = tokens[ref_key] / statistics.median(times[ref_key])
    ref_cpu = tokens[ref_key] / statistics.median(cpus[ref_key])
    rows = []
    for k in variants:
        med, cpu = statistics.median(times[k]), statistics.median(cpus[k])
        rows.append({"variant": k, "tokens": tokens[k], "median_s": round(med, 3),
                     "min_s": round(min(times[k]), 3), "max_s": round(max(times[k]), 3),
                     "tokens_per_s": round(tokens[k] / med), "ratio_to_tokenizer": round(tokens[k] / med / ref, 3),
                     "median_cpu_s": round(cpu, 3), "tokens_per_cpu_s": round(tokens[k] / cpu),
                     "cpu_ratio_to_tokenizer": round(tokens[k] / cpu / ref_cpu, 3)})
    chosen = next((r for r in rows if r["variant"] == chosen_label), None)
    command = "python " + " ".join(shlex.quote(x) for x in ["scripts/bench_data_pipeline.py", *sys.argv[1:]])
    result = {
        "command": command, "date": now_iso(),
        "device": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                   "python": platform.python_version(),
                   "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}},
        "input": {"path": a.input, "documents": len(lines), "chars": sum(map(len, texts))},
        "tokenizer": conf.tokenizer, "seq_len": conf.seq_len, "batch_docs": conf.batch_docs,
        "repeats": a.repeats, "pipeline_tokenizers_parallelism": a.pipeline_parallelism, "stage_default": {"num_workers": conf.num_workers, "workers": conf.workers,
                                                 "variant": chosen_label},
        "rows": rows, "stage_default_ratio": chosen["ratio_to_tokenizer"] if chosen else None, "goal_ratio": 0.8,
    }
    out = project_path(a.out)
    write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), _markdown(result))
    print(_markdown(result))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _markdown(r: dict) -> str:
    d = r["device"]
    lines = [
        "# Data pipeline benchmark: CPT tokenize + pack", "",
        f"- command: `{r['command']}`", f"- date: {r['date']}",
        f"- device: {d['cpu']}, {d['cores']} cores, {d['platform']}, Python {d['python']}; "
        f"1-minute load average {d['load_average_1m']['before']} before, {d['load_average_1m']['after']} after",
        f"- input: `{r['input']['path']}`, {r['input']['documents']:,} documents, {r['input']['chars']:,} characters",
        f"- tokenizer: `{r['tokenizer']}`, seq_len {r['seq_len']}, {r['batch_docs']} documents per batch",
        f"- medians of {r['repeats']} interleaved repeats after one warm-up round",
        f"- TOKENIZERS_PARALLELISM: true for the two tokenizer rows, "
        f"{r['pipeline_tokenizers_parallelism']} for the pipeline rows (as the main job runs the stage)", "",
        "The reference is the tokenizer's own batch encode: one encode_batch call over every text,",
        "already in memory, on its Rust threads (all cores). Pipeline rows are the whole stage for",
        "one split: read the jsonl, encode, add EOS, pack, write blocks.npy and meta.json, worker",
        "start-up included; loading the tokenizer (the same for all rows) is not. Tokens are",
        "counted without the EOS separators, as in the reference.",
        "The machine may be shared: min/max show how much outside load moved each variant, and",
        "the CPU columns (user+system seconds of the process, its threads and its joined workers)",
        "show the work done, which outside load does not change.", "",
        "| variant | tokens | median s | min s | max s | tokens/s | ratio to tokenizer | median CPU s | ratio by CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['variant']} | {row['tokens']:,} | {row['median_s']} | {row['min_s']} | "
                     f"{row['max_s']} | {row['tokens_per_s']:,} | {row['ratio_to_tokenizer']} | "
                     f"{row['median_cpu_s']} | {row['cpu_ratio_to_tokenizer']} |")
    load = r["device"]["load_average_1m"]["before"]
    if load > r["device"]["cores"]:
        lines += ["", f"The machine was busy with other work (load {load} on {r['device']['cores']} cores): "
                      "absolute tokens/s are below what an idle machine gives, while the ratios compare "
                      "variants that ran interleaved under the same load."]
    d = r["stage_default"]
    if r["stage_default_ratio"] is not None:
        ok = "meets" if r["stage_default_ratio"] >= r["goal_ratio"] else "misses"
        lines += ["", f"The stage default (num_workers={d['num_workers']}, workers={d['workers']}: "
                      f"\"{d['variant']}\") runs at {r['stage_default_ratio']} of the tokenizer's own "
                      f"throughput: it {ok} the goal of {r['goal_ratio']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_main(main)
