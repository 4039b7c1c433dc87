#!/usr/bin/env python3
"""Preference pairs for the GPU alignment benchmark, in TRL's conversational schema: each GSM8K
training problem as the user turn, its own worked solution as `chosen` and the next problem's
solution as `rejected` (a fluent answer to another question). Real text with GSM8K's lengths
(about 60 prompt and 120 answer tokens), for throughput and memory, not for learning.

  python scripts/gpu/build_pref_bench.py ../shared/data/gsm8k/train.jsonl .gpu/pref_gsm.jsonl 2048
"""
import json
import sys
from pathlib import Path


def main() -> int:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()[: n + 1] if x.strip()]
    say = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    out = [{"prompt": [{"role": "user", "content": a["question"]}], "chosen": say(a["answer"]),
            "rejected": say(b["answer"])} for a, b in zip(rows, rows[1:])]
    prompts = [{"prompt": [{"role": "user", "content": r["question"]}],
                "answer": r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")} for r in rows[:n]]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    dst.with_name(dst.stem + "_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts),
                                                          encoding="utf-8")
    print(f"{len(out)} pairs -> {dst}; {len(prompts)} prompts -> {dst.with_name(dst.stem + '_prompts.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
