"""Shared helpers of the training tests: builders of small real datasets in the stage-04/05
formats (KJV verses tokenized with SmolLM2's tokenizer) and helpers that run the training CLI
the way a user does. Plain functions only: the fixtures built on them (cpt_dir, sft_dir) live
in conftest.py, so test files import helpers by name and get fixtures from pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from forgelab.model.tokenizer_info import tokenizer_fingerprint
from forgelab.runs import PROJECT_ROOT, fingerprint_paths, project_path

KJV = project_path("data/raw/kjv/kjv.jsonl")
PY = sys.executable


def kjv_verses(start: int, n: int) -> list[str]:
    out = []
    with open(KJV, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if len(out) >= n:
                break
            out.append(json.loads(line)["text"])
    return out


def _finish(out: Path, meta: dict, files: list[str]) -> Path:
    meta["data_fingerprint"] = fingerprint_paths([out / f for f in files])
    (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def build_tiny_llama(out: Path, tok_dir: Path, kv_heads: int = 1) -> Path:
    """A tiny random Llama (2 layers, hidden 64, 2 heads of 32, tied) with the tokenizer of
    `tok_dir`, seeded, written to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=kv_heads,
                       max_position_embeddings=2048, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(conf).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_cpt(out: Path, tok_dir: Path, seq_len: int = 64, n_blocks: int = 160, start: int = 0) -> Path:
    """CPT blocks: verses joined with EOS, cut into [n_blocks, seq_len] int32."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids: list[int] = []
    for text in kjv_verses(start, 4000):
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= seq_len * n_blocks:
            break
    blocks = np.asarray(ids[: seq_len * n_blocks], dtype=np.int32).reshape(n_blocks, seq_len)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "blocks.npy", blocks)
    return _finish(out, {"format": "forgelab-cpt-blocks", "seq_len": seq_len, "n_blocks": n_blocks,
                         "n_tokens": int(blocks.size), "eos_token_id": tok.eos_token_id,
                         "tokenizer_fingerprint": tokenizer_fingerprint(tok_dir)}, ["blocks.npy"])


def build_sft(out: Path, tok_dir: Path, seq_len: int = 256, n_samples: int = 120, start: int = 100) -> Path:
    """Packed SFT store: 'continue the verse' chats through the chat template, labels only on the
    assistant turn, whole samples packed into rows <= seq_len, position ids restarting at 0."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    verses = kjv_verses(start, 2 * n_samples)
    samples = []
    for a, b in zip(verses[::2], verses[1::2]):
        prompt = [{"role": "system", "content": "Continue the verse."}, {"role": "user", "content": a}]
        p_ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": b}], tokenize=True,
                                       return_dict=True)["input_ids"]
        if len(full) > seq_len:
            continue
        labels = [-100] * len(p_ids) + list(full[len(p_ids):])
        samples.append((list(full), labels))
    rows: list[list[tuple]] = [[]]
    for s in samples:
        if sum(len(x[0]) for x in rows[-1]) + len(s[0]) > seq_len:
            rows.append([])
        rows[-1].append(s)
    ids, labels, pos, offsets = [], [], [], [0]
    for row in rows:
        for s_ids, s_lab in row:
            ids += s_ids
            labels += s_lab
            pos += list(range(len(s_ids)))
        offsets.append(len(ids))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "input_ids.npy", np.asarray(ids, dtype=np.int32))
    np.save(out / "labels.npy", np.asarray(labels, dtype=np.int32))
    np.save(out / "position_ids.npy", np.asarray(pos, dtype=np.int32))
    np.save(out / "row_offsets.npy", np.asarray(offsets, dtype=np.int64))
    return _finish(out, {"seq_len": seq_len, "packed": True, "n_rows": len(rows), "n_samples": len(samples),
                         "n_tokens": len(ids), "n_label_tokens": int(sum(x != -100 for x in labels)),
                         "pad_token_id": tok.pad_token_id, "tokenizer_fingerprint": tokenizer_fingerprint(tok_dir)},
                   ["input_ids.npy", "labels.npy", "position_ids.npy", "row_offsets.npy"])


def runs_dir() -> Path:
    return Path(os.environ["FORGELAB_RUNS_DIR"]) / "train"


def train_cli(*args: str, env: dict | None = None, timeout: int = 600, launcher: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run scripts/train.py (or a bash launcher) as a user would; 1 thread per process."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHON=PY)
    e.update(env or {})
    cmd = (["bash", str(PROJECT_ROOT / launcher)] if launcher else [PY, str(PROJECT_ROOT / "scripts/train.py")]) \
        + list(args)
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def train_inproc(*args: str) -> None:
    """The same entry point in this process (no interpreter start and imports per run), with one
    thread like the subprocess runs, so curves compare bit for bit."""
    import torch

    from forgelab.train.entry import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(list(args))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0


def tiny_sets(model_dir: Path, data_dir: Path, **extra) -> list[str]:
    """--set overrides that point a config at the tiny model and a test dataset."""
    sets = {"model.path": str(model_dir), "data.train": str(data_dir), **extra}
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def run_eval_script(run_name: str, report_md: Path, *sets: str, configs: tuple[str, ...] = (),
                    env: dict | None = None) -> tuple[Path, dict]:
    """scripts/09_eval.py as a user runs it (one thread, --set overrides); returns its run
    directory and summary.json."""
    cmd = [PY, "scripts/09_eval.py", *[a for c in configs for a in ("--config", c)],
           "--run-name", run_name, "--report", str(report_md), *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = project_path(env["FORGELAB_RUNS_DIR"]) / "eval" / run_name
    return run_dir, json.loads((run_dir / "summary.json").read_text())
