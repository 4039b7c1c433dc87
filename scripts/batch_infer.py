#!/usr/bin/env python3
"""Batch inference through a served model: JSONL of prompts in, JSONL of answers out.

  scripts/batch_infer.py --input prompts.jsonl --output answers.jsonl [--concurrency 4]

Input lines: {"id": "q1", "prompt": "..."} or {"id": "q1", "messages": [{"role": ..., "content": ...}]},
optionally with max_tokens / temperature / top_p / stop / seed. Output lines: {"id", "output",
"finish_reason", "usage", "model", "latency_s", "attempts"}. Interrupt it and run the same
command again: ids already in the output are skipped, none is answered twice. Failures (after
--retries) are listed in <output>.errors.jsonl and retried by the next run. Exit code 1 when
any request failed.
"""
import argparse
import sys
from pathlib import Path

from forgelab import cli
from forgelab.runs import Run
from forgelab.serve.batch import BatchError, run_batch
from forgelab.serve.server import add_endpoint_args, endpoint_from_args


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="JSONL of prompts or messages")
    p.add_argument("--output", required=True, type=Path, help="JSONL of answers (appended, resumable)")
    add_endpoint_args(p)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--retries", type=int, default=3, help="retries of a transient failure")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens per answer")
    p.add_argument("--temperature", type=float, default=None, help="default sampling temperature")
    p.add_argument("--run-name", default=None, help="run directory name under runs/batch_infer/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args()
    ep = endpoint_from_args(a)
    if ep is None:
        return 1
    try:
        with Run("batch_infer", None, a.run_name) as run:
            run.summary["args"] = {k: str(v) for k, v in vars(a).items() if k != "api_key"}
            s = run_batch(ep, a.input, a.output, a.concurrency, a.retries, a.timeout,
                          {"max_tokens": a.max_tokens, "temperature": a.temperature},
                          log=run.log, progress=not a.no_progress)
            run.summary.update(s)
            run.log.info("%d answered now, %d were already done, %d failed -> %s",
                         s["answered"], s["already_done"], s["failed"], s["output"])
    except BatchError as e:  # recorded as a failed run; one clear line here
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    cli.run_main(main)
