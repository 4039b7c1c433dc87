"""Reports from run directories. The run dirs are written here in the training stage's format,
with numbers from a real tiny computation: a tiny Llama trained for a few steps on KJV bytes
(losses, grad norms, tokens/s, RSS, checkpoint seconds/bytes measured), the real pre-flight
estimate, a measured time split, collectives measured through a one-rank gloo group, and a
real stop-at-checkpoint-and-resume run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from forgelab.model.presets import build_config
from forgelab.report.builders import build, build_all
from forgelab.report.runs import ProtocolError, discover
from forgelab.runs import PROJECT_ROOT, fingerprint_paths, write_json
from forgelab.estimate.estimator import estimate_run

VOCAB = 256  # byte-level ids


def _blocks(path: Path, seq_len: int, n: int) -> torch.Tensor:
    text = "\n".join(json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()[:2000])
    data = torch.tensor(list(text.encode("utf-8")[: n * seq_len]), dtype=torch.long)
    return data.view(n, seq_len)


def _matmul_flops() -> float:
    """This CPU's measured fp32 matmul FLOP/s (the 'peak' the MFU of these runs refers to)."""
    a = torch.randn(256, 256)
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    return 20 * 2 * 256**3 / (time.perf_counter() - t)


class TinyRun:
    """A real tiny training loop producing what the training stage records."""

    def __init__(self, blocks: torch.Tensor, micro: int, accum: int, world: int, steps: int, seed: int = 0,
                 comm: str | None = None):
        import psutil
        from transformers import AutoModelForCausalLM
        torch.manual_seed(seed)
        self.conf = build_config("tiny", vocab_size=VOCAB)
        self.model = AutoModelForCausalLM.from_config(self.conf)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.blocks, self.micro, self.accum, self.world, self.steps = blocks, micro, accum, world, steps
        self.comm = comm
        self.metrics: list[dict] = []
        self.split = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.comm_stats = {"calls": 0, "bytes": 0, "s": 0.0}
        self.proc = psutil.Process()
        self.step = 0

    def batch(self, step: int, k: int) -> torch.Tensor:
        rows = self.micro * self.world  # the ranks' micro batches, processed here one after another
        i = ((step * self.accum + k) * rows) % (len(self.blocks) - rows + 1)
        return self.blocks[i:i + rows]

    def run_to(self, last: int) -> None:
        import torch.distributed as dist
        t_prev = time.perf_counter()
        while self.step < last:
            loss_sum = 0.0
            for k in range(self.accum):
                t0 = time.perf_counter()
                x = self.batch(self.step, k)
                t1 = time.perf_counter()
                loss = self.model(input_ids=x, labels=x).loss / self.accum
                t2 = time.perf_counter()
                loss.backward()
                self.split["data"] += t1 - t0
                self.split["forward"] += t2 - t1
                self.split["backward"] += time.perf_counter() - t2
                loss_sum += loss.item()
            if self.comm:
                flat = torch.cat([p.grad.flatten() for p in self.model.parameters()])
                t = time.perf_counter()
                if self.comm == "all_reduce":
                    dist.all_reduce(flat)
                else:
                    out = [torch.empty_like(flat)]
                    dist.all_gather(out, flat)
                self.comm_stats["s"] += time.perf_counter() - t
                self.comm_stats["calls"] += 1
                self.comm_stats["bytes"] += flat.numel() * flat.element_size()
            t = time.perf_counter()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.split["optimizer"] += time.perf_counter() - t
            self.step += 1
            now = time.perf_counter()
            tokens = self.micro * self.accum * self.world * self.blocks.shape[1]
            self.metrics.append({"step": self.step, "loss": loss_sum, "lr": 3e-3, "grad_norm": float(gn),
                                 "tokens": tokens * self.step, "tokens_per_s": tokens / (now - t_prev),
                                 "mfu": None, "rss": self.proc.memory_info().rss, "time": now})
            t_prev = now

    def save(self, path: Path) -> dict:
        t = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "rng": torch.get_rng_state()}, path)
        return {"step": self.step, "seconds": time.perf_counter() - t, "bytes": path.stat().st_size, "path": str(path)}

    def load(self, path: Path) -> None:
        st = torch.load(path, weights_only=False)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.step = st["step"]
        torch.set_rng_state(st["rng"])


def write_run(root: Path, name: str, run: TinyRun, *, backend: str, track: str, data_fp: str, peak_flops: float,
              checkpoints: list | None = None, resume=None, profile: bool = False, extra_config: dict | None = None,
              sweep: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    seq = run.blocks.shape[1]
    tokens_per_step = run.micro * run.accum * run.world * seq
    n = sum(p.numel() for p in run.model.parameters())
    emb = run.model.get_input_embeddings().weight.numel()
    conf = {"task": "cpt", "track": track, "backend": backend, "run_name": name, "seed": 0,
            "steps": {"max_steps": run.steps, "micro_batch_size": run.micro, "grad_accum": run.accum},
            "runtime": {"precision": "fp32", "gradient_checkpointing": False, "torch_compile": False},
            "data": {"train": "data/tokenized/cpt/train", "num_workers": 0}}
    for k, v in (extra_config or {}).items():
        node = conf
        *parts, last = k.split(".")
        for p in parts:
            node = node.setdefault(p, {})
        node[last] = v
    (d / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    with open(d / "metrics.jsonl", "w") as f:
        for m in run.metrics:
            f.write(json.dumps(m) + "\n")
    skip = 2
    rate = lambda ms: (sum(m["tokens_per_s"] for m in ms) / len(ms)) if ms else None  # noqa: E731
    tps_mean, tps_steady = rate(run.metrics), rate(run.metrics[skip:])
    fpt = 6 * (n - emb + emb)  # tied head: 6 x (non-embedding + head) per token
    est = estimate_run(conf, run.conf, len(run.blocks), run.world)
    losses = [m["loss"] for m in run.metrics]
    summary = {
        "task": "cpt", "track": track, "backend": backend, "world_size": run.world,
        "model": {"name": "tiny", "params": n, "non_embedding_params": n - emb, "trainable_params": n},
        "seq_len": seq, "tokens_per_step": tokens_per_step, "global_batch": run.micro * run.accum * run.world,
        "steps": run.step, "tokens": tokens_per_step * run.step,
        "tokens_per_s_mean": tps_mean, "tokens_per_s_steady": tps_steady,
        "mfu_mean": tps_mean * fpt / (peak_flops * run.world), "mfu_steady": tps_steady * fpt / (peak_flops * run.world),
        "peak_memory_bytes": max(m["rss"] for m in run.metrics), "peak_memory_measure": "max RSS (CPU)",
        "checkpoints": checkpoints or [], "resume": resume, "final_loss": losses[-1], "best_loss": min(losses),
        "estimate": {"predicted": est, "measured": {"peak_memory_bytes": max(m["rss"] for m in run.metrics),
                                                    "steps": run.step}},
        "wall_seconds": run.metrics[-1]["time"] - run.metrics[0]["time"],
        "fingerprint": {"data_fingerprint": data_fp, "tokenizer_fingerprint": "bytes", "config_hash": name,
                        "git": {}, "packages": {}, "hardware": {}},
    }
    if sweep:
        summary["plan"] = {"sweep": sweep}
    write_json(d / "train_summary.json", summary)
    if profile:
        ms = {k: 1000 * v / run.step for k, v in run.split.items()}
        comms = []
        if run.comm:
            c = run.comm_stats
            comms = [{"op": run.comm, "calls_per_step": c["calls"] / run.step, "bytes_per_step": c["bytes"] / run.step,
                      "ms_per_step": 1000 * c["s"] / run.step}]
        write_json(d / "profile_summary.json", {"flops_per_step": fpt * tokens_per_step, "time_split_ms": ms,
                                                "comms": comms, "trace_files": []})
    return d


@pytest.fixture(scope="module")
def runs_root(raw_data, tmp_path_factory):
    """Bench runs (two protocols), a sweep, a profiled ddp/zero3 pair, a resume pair."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs") / "train"
    kjv_fp = fingerprint_paths([raw_data["kjv"]])
    blocks64, blocks32 = _blocks(raw_data["kjv"], 64, 64), _blocks(raw_data["kjv"], 32, 64)
    peak = _matmul_flops()
    kw = dict(data_fp=kjv_fp, peak_flops=peak)

    # bench: same tokens per step (512) for single (accum 4) and 2-rank runs (accum 2)
    for name, backend, world, accum in (("bench-single", "single", 1, 4), ("bench-ddp", "ddp", 2, 2),
                                        ("bench-zero2", "zero2", 2, 2), ("bench-zero3", "zero3_offload", 2, 2)):
        r = TinyRun(blocks64, 2, accum, world, 6)
        r.run_to(6)
        ck = r.save(root.parent / f"{name}.pt")
        write_run(root, name, r, backend=backend, track="bench", checkpoints=[ck], **kw)
    r = TinyRun(blocks32, 2, 4, 1, 6)  # another sequence length: another protocol
    r.run_to(6)
    write_run(root, "bench-single-seq32", r, backend="single", track="bench", **kw)

    # sweep: micro batch x accumulation at a fixed 512 tokens per step
    for i, (micro, accum) in enumerate(((1, 8), (2, 4), (4, 2))):
        r = TinyRun(blocks64, micro, accum, 1, 5)
        r.run_to(5)
        write_run(root, f"opt--{i:02d}", r, backend="single", track="optimize",
                  extra_config={"steps.micro_batch_size": micro, "steps.grad_accum": accum},
                  sweep={"name": "opt", "index": i, "overrides": {"steps.micro_batch_size": micro,
                                                                  "steps.grad_accum": accum}}, **kw)

    # profile: collectives through a real one-rank gloo group (its rendezvous env is restored
    # afterwards, so later tests see the environment they were started with)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))
        mp.setenv("MASTER_PORT", os.environ.get("MASTER_PORT", "29631"))
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            for name, backend, op in (("prof-ddp", "ddp", "all_reduce"), ("prof-zero3", "zero3_offload", "all_gather")):
                r = TinyRun(blocks64, 2, 2, 2, 4, comm=op)
                r.run_to(4)
                write_run(root, name, r, backend=backend, track="profile", profile=True, **kw)
        finally:
            dist.destroy_process_group()

    # resume: uninterrupted 6 steps vs 3 steps + checkpoint + a fresh process state resuming
    full = TinyRun(blocks64, 2, 2, 1, 6, seed=1)
    full.run_to(6)
    write_run(root, "res-uninterrupted", full, backend="single", track="resume", **kw)
    s1 = TinyRun(blocks64, 2, 2, 1, 6, seed=1)
    s1.run_to(3)
    ck = s1.save(root.parent / "res-ck3.pt")
    s2 = TinyRun(blocks64, 2, 2, 1, 6, seed=7)  # different init: everything must come from the checkpoint
    s2.load(root.parent / "res-ck3.pt")
    s2.run_to(6)
    s2.metrics = s1.metrics + s2.metrics
    d = write_run(root, "res-resumed", s2, backend="single", track="resume", checkpoints=[ck],
                  resume={"from_checkpoint": ck["path"], "step": 3, "tokens": 3 * 256}, **kw)
    rows = [{"step": a["step"], "loss_uninterrupted": a["loss"], "loss_resumed": b["loss"],
             "abs_diff": abs(a["loss"] - b["loss"])} for a, b in zip(full.metrics, s2.metrics)]
    write_json(d / "resume_validation.json", {
        "reference_run": "res-uninterrupted", "resumed_run": "res-resumed", "steps": rows,
        "max_abs_diff": max(x["abs_diff"] for x in rows),
        "identical": all(x["loss_uninterrupted"] == x["loss_resumed"] for x in rows),
        "tolerance": 0.0, "device": "cpu"})
    return root


def _js(md: Path) -> dict:
    return json.loads(md.with_suffix(".json").read_text())


def test_benchmark_report_families_scaling_and_protocol_split(runs_root, tmp_path):
    md, js = build("benchmark", root=runs_root, out_dir=tmp_path, command="test")
    text, data = md.read_text(), json.loads(js.read_text())
    assert "Native PyTorch" in text and "DeepSpeed" in text
    native = data["families"]["native"]
    assert len(native) == 2  # seq 64 runs vs the seq 32 run
    assert any("seq_len differs" in d for d in data["protocol_splits"])
    assert "seq_len differs" in text
    g = next(x for x in native if x["protocol"]["seq_len"] == 64)
    rows = {x["run"]: x for x in g["rows"]}
    assert set(rows) == {"bench-single", "bench-ddp"}
    # every number is the run's own
    s = json.loads((runs_root / "bench-ddp" / "train_summary.json").read_text())
    assert rows["bench-ddp"]["tokens_per_s_steady"] == s["tokens_per_s_steady"]
    assert rows["bench-ddp"]["predicted_peak_memory_bytes"] == s["estimate"]["predicted"]["peak_memory_bytes"]
    assert rows["bench-ddp"]["checkpoint_bytes"] == s["checkpoints"][0]["bytes"] > 0
    assert rows["bench-ddp"]["memory_measured_over_predicted"] is None  # CPU RSS is not GPU allocator memory
    assert "get no measured/predicted ratio" in text
    eff = g["scaling"][0]
    single = json.loads((runs_root / "bench-single" / "train_summary.json").read_text())
    assert eff["efficiency"] == pytest.approx(s["tokens_per_s_steady"] / (2 * single["tokens_per_s_steady"]))
    assert "Scaling efficiency" in text
    ds_rows = data["families"]["deepspeed"][0]["rows"]
    assert {x["backend"] for x in ds_rows} == {"zero2", "zero3_offload"}
    for img in data["images"]:
        assert (tmp_path / img).stat().st_size > 1000
    assert "scripts/train/bench.sh ddp --task cpt" in text


def test_named_runs_with_mixed_protocols_are_refused_then_allowed(runs_root, tmp_path):
    with pytest.raises(ProtocolError, match="seq_len differs: bench-single has 64, bench-single-seq32 has 32"):
        build("benchmark", root=runs_root, names=["bench-single", "bench-single-seq32"], out_dir=tmp_path)
    md, _ = build("benchmark", root=runs_root, names=["bench-single", "bench-single-seq32"], out_dir=tmp_path,
                  allow_mixed=True)
    assert "Mixed protocols" in md.read_text()
    assert len(_js(md)["families"]["native"][0]["rows"]) == 2


def test_optimization_report_marks_best_and_shows_knobs(runs_root, tmp_path):
    md, _ = build("optimization", root=runs_root, out_dir=tmp_path)
    data = _js(md)
    g = data["sweeps"]["opt"][0]
    assert g["knobs"] == ["steps.grad_accum", "steps.micro_batch_size"]
    best = max(g["rows"], key=lambda x: x["tokens_per_s_steady"])
    assert best["best"] and sum(x["best"] for x in g["rows"]) == 1
    assert f"**best** {best['run']}" in md.read_text()
    md2, _ = build("optimization", root=runs_root, out_dir=tmp_path, metric="final_loss")
    g2 = _js(md2)["sweeps"]["opt"][0]
    assert next(x for x in g2["rows"] if x["best"])["final_loss"] == min(x["final_loss"] for x in g2["rows"])


def test_resume_report_from_a_real_resume(runs_root, tmp_path):
    md, _ = build("resume", root=runs_root, out_dir=tmp_path)
    v = _js(md)["validations"][0]
    assert v["passed"] and v["identical"] and v["max_abs_diff"] == 0.0  # CPU fp32: bit-identical
    assert v["resume_step"] == 3 and len(v["curve"]) == 6
    assert "**passed**" in md.read_text()
    assert (tmp_path / "img" / "cpt_resume_validation_res-resumed_loss.png").is_file()


def test_profile_and_comms_reports(runs_root, tmp_path):
    md, _ = build("profile", root=runs_root, out_dir=tmp_path)
    rows = _js(md)["groups"][0]["rows"]
    assert {x["run"] for x in rows} == {"prof-ddp", "prof-zero3"}
    assert all(x["forward_ms"] > 0 and x["backward_ms"] > 0 and x["flops_per_step"] > 0 for x in rows)
    md, _ = build("comms", root=runs_root, out_dir=tmp_path)
    data = _js(md)
    ops = {x["run"]: x for x in data["groups"][0]["rows"]}
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(
        build_config("tiny", vocab_size=VOCAB)).parameters())
    assert ops["prof-ddp"]["op"] == "all_reduce" and ops["prof-ddp"]["bytes_per_step"] == params * 4
    assert ops["prof-zero3"]["op"] == "all_gather"
    assert "GB/s" in md.read_text()


def test_discover_filters_tracks_and_files(runs_root):
    assert {r.name for r in discover(runs_root, tracks=("profile",))} == {"prof-ddp", "prof-zero3"}
    assert [r.name for r in discover(runs_root, need="resume_validation.json")] == ["res-resumed"]


@pytest.mark.slow
def test_script_builds_all_reports(runs_root, tmp_path):
    out = tmp_path / "reports"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "scripts/12_report.py", "all", "--runs-root", str(runs_root),
                        "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    for kind in ("benchmark", "optimization", "resume_validation", "profile", "comms"):
        assert (out / f"cpt_{kind}.md").is_file() and (out / f"cpt_{kind}.json").is_file()
    p = subprocess.run([sys.executable, "scripts/12_report.py", "benchmark", "--runs-root", str(runs_root),
                        "--out", str(out), "--runs", "bench-single", "bench-single-seq32"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "seq_len differs" in p.stderr
    res = build_all(runs_root, tmp_path / "r2", log=lambda m: None)
    assert set(res["written"]) == {"benchmark", "optimization", "resume", "profile", "comms"}


def test_gpu_performance_report_rebuilds_from_the_committed_run_records(tmp_path):
    """reports/gpu_performance.md is rebuilt from the H200 run records kept in the repository:
    every target is answered by a named run, the floor and the profile sections come from their
    JSON records, and the estimator is re-run on each run's config."""
    from forgelab.report.gpu_performance import build_gpu_performance
    md, js = build_gpu_performance("configs/report/gpu_performance.yaml", out_dir=tmp_path, command="test")
    body = json.loads(js.read_text())
    assert body["device"] == "NVIDIA H200"
    assert all(t["met"] for t in body["targets"].values()), {k: t["measured"] for k, t in body["targets"].items()}
    assert body["targets"]["cpt17_mfu"]["measured"] >= 0.55
    assert body["targets"]["cpt17_vs_trainer"]["loss_agreement"]["steps"] == 14
    text = md.read_text()
    for section in ("## The device's floor", "## Where a tuned step's time goes", "## Memory estimator",
                    "## Packing without cross-contamination"):
        assert section in text
    now = {x["run"]: x["measured_over_now"] for x in body["estimator"]["now"]}
    assert 0.9 <= min(now.values()) and max(now.values()) <= 1.1
    assert (tmp_path / "img" / "gpu_performance_throughput.png").is_file()
