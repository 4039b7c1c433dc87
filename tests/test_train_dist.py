"""Distributed backends on CPU, launched the way users launch them, each compared step by step
with one process training the same global batch: DDP with 2 gloo ranks
(torchrun), two nodes simulated on this machine (two torchrun agents meeting at a 127.0.0.1
rendezvous), DeepSpeed ZeRO-2 and ZeRO-3 with offload, and the profile track's collectives."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest

from forgelab.runs import PROJECT_ROOT, read_json
from helpers import PY, metrics, runs_dir, tiny_sets, train_cli

pytestmark = pytest.mark.slow


# Every run here trains on the same 32 blocks (one epoch in 4 steps of a global batch of 8) with
# the learning rate at its peak from step 1, and records which items each rank trained on.
COMMON = ("--set", "steps.micro_batch_size=2", "--set", "optim.warmup_steps=0", "--set", "data.max_train_items=32",
          "--set", "metrics.sample_digests=true")
STEPS, GLOBAL, SEQ = 4, 8, 64


def _sanity(backend: str, model, data, name: str, *extra: str, world: int = 2) -> dict:
    train_cli(backend, *tiny_sets(model, data), *COMMON, *extra, "--run-name", name,
              launcher="scripts/train/sanity.sh", timeout=900)
    s = read_json(runs_dir() / name / "train_summary.json")
    assert s["outcome"] == "ok" and s["backend"] == backend and s["world_size"] == world
    assert s["steps"] == STEPS and s["tokens"] == STEPS * GLOBAL * SEQ
    assert s["global_batch"] == GLOBAL and (runs_dir() / name / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (runs_dir() / name).glob("checkpoint-*")) == ["checkpoint-4"]
    return s


def _samples(name: str) -> dict[int, list[list[str]]]:
    """step -> the item digests of each rank, from samples/rank<r>.jsonl."""
    files = sorted((runs_dir() / name / "samples").glob("rank*.jsonl"))
    out: dict[int, list[list[str]]] = {}
    for f in files:
        for rec in map(json.loads, f.read_text().splitlines()):
            out.setdefault(rec["step"], []).append(rec["items"])
    return out


def _params(name: str) -> dict:
    from safetensors.torch import load_file
    return load_file(runs_dir() / name / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def single_ref(tiny_model_dir, cpt_dir):
    """The reference: one process, the same global batch of 8 as 2 ranks x 2 rows x 2 micro-batches."""
    s = _sanity("single", tiny_model_dir, cpt_dir, "t-single-ref", "--set", "steps.grad_accum=4", world=1)
    assert s["grad_accum"] == 4
    return s


def assert_same_as_single(name: str, *, loss_rel: float, grad_rel: float, param_atol: float) -> None:
    """Step by step against the one-process run: which items made each step's global batch
    (disjoint over the ranks), learning rate (non-zero from step 1), tokens counted from the
    batches seen, loss and grad norm; then every parameter after the last step."""
    ref, got = metrics(runs_dir() / "t-single-ref"), metrics(runs_dir() / name)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert ref[0]["lr"] > 0
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref], rel=1e-9)
    ref_items, got_items = _samples("t-single-ref"), _samples(name)
    for step in range(1, STEPS + 1):
        ranks = got_items[step]
        assert len(ranks) == 2 and not set(ranks[0]) & set(ranks[1]), f"step {step}: ranks share items"
        assert sorted(ranks[0] + ranks[1]) == sorted(ref_items[step][0]), f"step {step}: another global batch"
    assert [r["step_tokens"] for r in got] == [r["step_tokens"] for r in ref] == [GLOBAL * SEQ] * STEPS
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=loss_rel)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=grad_rel)
    want, have = _params("t-single-ref"), _params(name)
    # DeepSpeed's save writes the tied LM head out as its own tensor: it must be the embedding
    if "lm_head.weight" in have.keys() - want.keys():
        assert have["lm_head.weight"].equal(have["model.embed_tokens.weight"])
        have.pop("lm_head.weight")
    assert want.keys() == have.keys()
    worst = max(float((want[k] - have[k]).abs().max()) for k in want)
    assert worst <= param_atol, f"parameters after {STEPS} steps differ by up to {worst:.3g}"


def test_single_reference_reads_the_epoch_once_in_order_of_its_steps(single_ref, cpt_dir):
    from forgelab.train.data import item_digest
    blocks = np.load(cpt_dir / "blocks.npy")[:32]
    epoch = {item_digest({"input_ids": b}) for b in blocks}
    seen = [d for step in sorted(_samples("t-single-ref")) for d in _samples("t-single-ref")[step][0]]
    assert len(seen) == STEPS * GLOBAL and set(seen) == epoch  # every item once: the epoch is covered


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, cpt_dir, single_ref):
    s = _sanity("ddp", tiny_model_dir, cpt_dir, "t-ddp")
    ck = runs_dir() / "t-ddp" / "checkpoint-4"
    assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file()  # one RNG state per rank
    return s


def test_ddp_two_gloo_ranks_equal_one_process(ddp_run):
    assert ddp_run["nodes"] == 1 and ddp_run["device"]["type"] == "cpu"
    assert ddp_run["peak_memory_measure"].endswith("(max over ranks)")
    assert_same_as_single("t-ddp", loss_rel=1e-5, grad_rel=1e-5, param_atol=1e-6)


@pytest.mark.parametrize("backend", ["fsdp", "zero1", "zero2", "zero3", "zero3_offload"])
def test_backend_equals_one_process(backend, tiny_model_dir, cpt_dir, single_ref):
    """Same data, seed and global batch: sharding must not change the arithmetic beyond rounding.
    fsdp runs as DDP on CPU (accelerate's FSDP needs GPUs; the run says so in its notices)."""
    _sanity(backend, tiny_model_dir, cpt_dir, f"t-{backend}")
    # DeepSpeed sums the squared gradient norm partition by partition: the norm it reports is
    # 4e-5 off (relative) in fp32, the updates it makes are not (parameters within 2e-7)
    grad_rel = 1e-4 if backend.startswith("zero") else 1e-5
    assert_same_as_single(f"t-{backend}", loss_rel=1e-5, grad_rel=grad_rel, param_atol=1e-6)
    if backend.startswith("zero"):
        assert (runs_dir() / f"t-{backend}" / "checkpoint-4" / "latest").is_file()  # the engine's partitions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_simulated_with_two_torchrun_agents(tiny_model_dir, cpt_dir, single_ref):
    base = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHON=PY, NNODES="2", NPROC="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cmd = ["bash", str(PROJECT_ROOT / "scripts/train/sanity.sh"), "ddp", *tiny_sets(tiny_model_dir, cpt_dir),
           *COMMON, "--run-name", "t-2nodes"]
    nodes = [subprocess.Popen(cmd, env=dict(base, NODE_RANK=str(r)), cwd=PROJECT_ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (1, 0)]
    outs = [p.communicate(timeout=900)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "--nnodes=2 --node_rank=1" in outs[0] and "--nnodes=2 --node_rank=0" in outs[1]
    s = read_json(runs_dir() / "t-2nodes" / "train_summary.json")
    assert (s["world_size"], s["nodes"], s["steps"]) == (2, 2, 4)
    # two 1-rank nodes are the same data-parallel job as one process with accumulation
    assert_same_as_single("t-2nodes", loss_rel=1e-5, grad_rel=1e-5, param_atol=1e-6)


def test_profile_track_ddp_records_the_gradient_all_reduce(tiny_model_dir, cpt_dir):
    train_cli("ddp", *tiny_sets(tiny_model_dir, cpt_dir), "--set", "steps.micro_batch_size=2",
              "--run-name", "t-prof-ddp", launcher="scripts/train/profile.sh", timeout=900)
    run = runs_dir() / "t-prof-ddp"
    p = read_json(run / "profile_summary.json")
    s = read_json(run / "train_summary.json")
    ar = {c["op"]: c for c in p["comms"]}["all_reduce"]
    # DDP reduces every gradient once per optimizer step (no_sync on the other micro-batches): fp32
    # bytes, and the step's token count (one int64) summed over the ranks
    assert ar["bytes_per_step"] == 4 * s["model"]["trainable_params"] + 8
    assert ar["calls_per_step"] >= 2 and ar["ms_per_step"] > 0
    assert p["trace_files"] == ["profile/trace_rank0.json", "profile/trace_rank1.json"]
    # matmul FLOPs counted by the profiler agree with the formula (embedding lookups are not matmuls)
    assert p["flops_per_step_profiler_per_rank"] == pytest.approx(p["flops_per_step_per_rank"], rel=0.05)


@pytest.mark.parametrize("backend", ["fsdp", "zero2", "zero3"])
def test_checkpoint_to_model_gives_the_trained_weights(backend, tiny_model_dir, cpt_dir, tmp_path):
    """checkpoint-4 of a 2-rank run (the last step) as a plain model: its logits equal those of the
    run's final model, bit for bit. zero2/zero3: the fp32 master weights from the ranks' ZeRO
    partitions; fsdp runs as DDP on CPU, so its checkpoint holds plain model files."""
    import torch
    from transformers import AutoModelForCausalLM

    run = runs_dir() / f"t-{backend}"
    if not (run / "final").is_dir():
        _sanity(backend, tiny_model_dir, cpt_dir, f"t-{backend}")
    out = tmp_path / "model"
    p = subprocess.run([PY, "scripts/checkpoint_to_model.py", str(run / "checkpoint-4"), str(out)], cwd=PROJECT_ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    src = read_json(out / "forgelab_source.json")
    assert src["step"] == 4 and src["checkpoint_manifest"] == "ok"
    assert src["source"] == ("deepspeed" if backend.startswith("zero") else "model_files")
    if backend.startswith("zero"):
        assert "2 rank(s)" in src["how"]
    ids = torch.tensor([np.load(cpt_dir / "blocks.npy")[0][:32].astype(np.int64)])
    got, want = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (out, run / "final"))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    # a damaged checkpoint is refused before anything is written
    bad = tmp_path / "bad"
    shutil.copytree(run / "checkpoint-4", bad)
    with open(bad / "config.json", "a") as f:
        f.write(" ")
    p = subprocess.run([PY, "scripts/checkpoint_to_model.py", str(bad), str(tmp_path / "never")], cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "does not match its" in p.stderr and not (tmp_path / "never").exists()


def test_profile_track_runs_deepspeeds_profilers_beside_the_labs(tiny_model_dir, cpt_dir, tmp_path):
    """profile.deepspeed on zero2 (2 gloo ranks, accumulation 2): DeepSpeed's flops profiler
    gives the lab's FLOPs formula's count, its communication logger the all-reduce bytes the lab
    parses from the trace; the profile report sets them side by side."""
    train_cli("zero2", *tiny_sets(tiny_model_dir, cpt_dir), "--set", "steps.micro_batch_size=2",
              "--set", "steps.grad_accum=2", "--set", "profile.deepspeed=true", "--run-name", "t-prof-ds",
              launcher="scripts/train/profile.sh", timeout=900)
    run = runs_dir() / "t-prof-ds"
    ds = read_json(run / "profile_summary.json")["deepspeed"]
    assert ds["flops_profile"]["world_size"] == 2 and ds["flops_profile"]["batch_size_per_gpu"] == 2
    assert (run / ds["flops_profile_file"]).is_file()
    # DeepSpeed rounds its printout to 4 digits; the lab's formula adds the attention term SDPA hides
    assert ds["flops_ratio_deepspeed_to_lab"] == pytest.approx(1.0, abs=2e-3)
    by = {c["op"]: c for c in ds["comms_beside_trace"]}
    assert by["all_reduce"]["bytes_per_step_deepspeed"] == by["all_reduce"]["bytes_per_step_trace"] > 0
    assert by["all_gather"]["ratio"] == pytest.approx(1.0, abs=1e-4)
    out = tmp_path / "reports"
    p = subprocess.run([PY, "scripts/12_report.py", "profile", "--runs-root", str(runs_dir()), "--runs", "t-prof-ds",
                        "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    md = next(out.glob("*_profile.md")).read_text()
    assert "DeepSpeed's own profilers" in md and "all_reduce" in md


def test_a_ddp_checkpoint_continues_on_one_process(tiny_model_dir, cpt_dir, single_ref):
    """ddp with 2 ranks stopped at step 2, continued by one process with the same global batch
    (accumulation 4): steps 3-4 are the uninterrupted one-process run's, and the resume log says
    what moved. Another global batch, or a ZeRO checkpoint under another world size, is refused
    with the key to set."""
    train_cli("ddp", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", "steps.stop_after_steps=2",
              "--run-name", "t-ddp-stop2", launcher="scripts/train/sanity.sh", timeout=900)
    ck = runs_dir() / "t-ddp-stop2" / "checkpoint-2"
    base = ("single", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", f"checkpoint.resume={ck}")
    r = train_cli(*base, "--set", "steps.grad_accum=2", "--run-name", "t-ddp-to-single-bad",
                  launcher="scripts/train/sanity.sh", check=False)
    assert r.returncode == 2 and "global batch of 8" in r.stderr and "steps.grad_accum=4" in r.stderr
    r = train_cli(*base, "--set", "steps.grad_accum=4", "--run-name", "t-ddp-to-single",
                  launcher="scripts/train/sanity.sh")
    assert "written by ddp with 2 rank(s); this run is single with 1" in r.stderr + r.stdout
    ref, got = metrics(runs_dir() / "t-single-ref"), metrics(runs_dir() / "t-ddp-to-single")
    assert [x["step"] for x in got] == [3, 4]
    assert [x["loss"] for x in got] == pytest.approx([x["loss"] for x in ref[2:]], rel=1e-5)
    assert [x["grad_norm"] for x in got] == pytest.approx([x["grad_norm"] for x in ref[2:]], rel=1e-5)
    s = read_json(runs_dir() / "t-ddp-to-single" / "train_summary.json")
    assert s["world_size"] == 1 and s["steps"] == 4
    z = runs_dir() / "t-zero2" / "checkpoint-4"
    if not z.is_dir():
        _sanity("zero2", tiny_model_dir, cpt_dir, "t-zero2")
    r = train_cli("single", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", "steps.grad_accum=4",
                  "--set", f"checkpoint.resume={z}", "--run-name", "t-zero2-to-single",
                  launcher="scripts/train/sanity.sh", check=False)
    assert r.returncode == 2 and "DeepSpeed ZeRO partitions continue only under a zero backend" in r.stderr
    assert "forgelab checkpoint-to-model" in r.stderr


def _continued(name: str) -> list[dict]:
    got = metrics(runs_dir() / name)
    assert [x["step"] for x in got] == [3, 4]
    return got


def test_zero_checkpoints_continue_under_another_world_size_and_stage(tiny_model_dir, cpt_dir):
    """Through DeepSpeed's universal checkpoint: zero2 with 2 ranks stopped at step 2 continues as
    zero2 with 1 rank (accumulation 4: the same global batch), and zero3 with 2 ranks continues as
    zero2; steps 3-4 match the uninterrupted 2-rank runs within 1e-6 relative (measured bit for
    bit on CPU fp32; equality is not promised, one rank sums the micro-batches in another order
    than two). A zero3 target across a change is refused with DeepSpeed's reason."""
    for backend in ("zero2", "zero3"):
        if not (runs_dir() / f"t-{backend}" / "final").is_dir():
            _sanity(backend, tiny_model_dir, cpt_dir, f"t-{backend}")
        train_cli(backend, *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", "steps.stop_after_steps=2",
                  "--run-name", f"t-{backend}-stop2", launcher="scripts/train/sanity.sh", timeout=900)
    z2, z3 = (runs_dir() / f"t-{b}-stop2" / "checkpoint-2" for b in ("zero2", "zero3"))
    r = train_cli("zero2", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", "steps.grad_accum=4",
                  "--set", "dist.nproc_per_node=1", "--set", f"checkpoint.resume={z2}", "--run-name", "t-zero2-to-1",
                  launcher="scripts/train/sanity.sh", timeout=900)
    log = r.stderr + r.stdout
    assert "written by zero2 with 2 rank(s); this run is zero2 with 1" in log
    assert "converted to a DeepSpeed universal checkpoint" in log and "ds_to_universal" in log
    ref, got = metrics(runs_dir() / "t-zero2"), _continued("t-zero2-to-1")
    assert [x["loss"] for x in got] == pytest.approx([x["loss"] for x in ref[2:]], rel=1e-6)
    assert [x["grad_norm"] for x in got] == pytest.approx([x["grad_norm"] for x in ref[2:]], rel=1e-6)
    s = read_json(runs_dir() / "t-zero2-to-1" / "train_summary.json")
    assert s["world_size"] == 1 and s["steps"] == 4 and s["resume"]["converted_from"] == str(z2.resolve())
    conv = runs_dir() / "t-zero2-to-1" / "converted" / "checkpoint-2"
    assert read_json(conv / "forgelab_source.json")["checkpoint"] == str(z2.resolve())
    assert (conv / "latest_universal").read_text() == "global_step2_universal"

    train_cli("zero2", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", f"checkpoint.resume={z3}",
              "--run-name", "t-zero3-to-zero2", launcher="scripts/train/sanity.sh", timeout=900)
    ref, got = metrics(runs_dir() / "t-zero3"), _continued("t-zero3-to-zero2")
    assert [x["loss"] for x in got] == pytest.approx([x["loss"] for x in ref[2:]], rel=1e-6)
    # ZeRO-3 sums its partitions' squared norms in another order: 4e-5 as in the backend test
    assert [x["grad_norm"] for x in got] == pytest.approx([x["grad_norm"] for x in ref[2:]], rel=1e-4)
    # the continued run's weights are the uninterrupted run's
    want, have = _params("t-zero3"), _params("t-zero3-to-zero2")
    assert max(float((want[k] - have[k]).abs().max()) for k in want.keys() & have.keys()) <= 1e-6

    r = train_cli("zero3", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", f"checkpoint.resume={z2}",
                  "--run-name", "t-zero2-to-zero3", launcher="scripts/train/sanity.sh", check=False)
    assert r.returncode == 2 and "continues under zero1 or zero2" in r.stderr


def test_an_fsdp_sharded_checkpoint_continues_on_one_process(tiny_model_dir, cpt_dir, single_ref, tmp_path):
    """FSDP's sharded checkpoint (model and optimizer through torch.distributed.checkpoint, keyed by
    parameter name, one RNG state per rank) continues under single: merged into full files first.
    accelerate runs FSDP on GPUs only, so the sharded checkpoint is written by torch's FSDP2
    (fully_shard, 2 gloo ranks) from a one-process run stopped at step 2, with the calls
    accelerate's save makes (tests/fsdp2_sharded_writer.py). Steps 3-4 match the uninterrupted
    run within 1e-6 relative (measured bit for bit: the merge moves tensors, no arithmetic)."""
    import yaml
    from forgelab import manifest
    train_cli("single", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", "steps.grad_accum=4",
              "--set", "steps.stop_after_steps=2", "--run-name", "t-single-stop2", launcher="scripts/train/sanity.sh")
    src = runs_dir() / "t-single-stop2"
    fsdp_run = tmp_path / "t-fsdp-2ranks"
    (fsdp_run / "checkpoint-2").mkdir(parents=True)
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        "tests/fsdp2_sharded_writer.py", str(src / "checkpoint-2"), str(fsdp_run / "checkpoint-2")],
                       cwd=PROJECT_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = fsdp_run / "checkpoint-2"
    assert (ck / "pytorch_model_fsdp_0" / ".metadata").is_file() and (ck / "optimizer_0" / ".metadata").is_file()
    assert not (ck / "model.safetensors").exists() and sorted(x.name for x in ck.glob("rng_state_*")) == [
        "rng_state_0.pth", "rng_state_1.pth"]
    conf = yaml.safe_load((src / "config.yaml").read_text())
    conf["backend"], conf["steps"]["grad_accum"] = "fsdp", 2  # what 2 fsdp ranks with the same global batch ran
    (fsdp_run / "config.yaml").write_text(yaml.safe_dump(conf))
    manifest.write_manifest(ck)
    base = ("single", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", "steps.grad_accum=4",
            "--set", f"checkpoint.resume={ck}")
    r = train_cli(*base, "--run-name", "t-fsdp-to-single", launcher="scripts/train/sanity.sh")
    log = r.stderr + r.stdout
    assert "written by fsdp with 2 rank(s); this run is single with 1" in log and "merged into full copies" in log
    ref, got = metrics(runs_dir() / "t-single-ref"), _continued("t-fsdp-to-single")
    assert [x["loss"] for x in got] == pytest.approx([x["loss"] for x in ref[2:]], rel=1e-6)
    assert [x["grad_norm"] for x in got] == pytest.approx([x["grad_norm"] for x in ref[2:]], rel=1e-6)
    conv = runs_dir() / "t-fsdp-to-single" / "converted" / "checkpoint-2"
    assert read_json(conv / "forgelab_source.json")["to"] == "full" and (conv / "optimizer.pt").is_file()
    s = read_json(runs_dir() / "t-fsdp-to-single" / "train_summary.json")
    assert s["resume"]["converted_from"] == str(ck.resolve())
    r = train_cli("zero2", *tiny_sets(tiny_model_dir, cpt_dir), *COMMON, "--set", f"checkpoint.resume={ck}",
                  "--run-name", "t-fsdp-to-zero2", launcher="scripts/train/sanity.sh", check=False)
    assert r.returncode == 2 and "moves to single or ddp" in r.stderr
