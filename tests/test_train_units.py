"""Training building blocks without a training run: the FLOP formula against the model's own
parameters, AdamW groups, checkpoint selection, plans, launch commands and the launchers'
config composition (--dry-run)."""
from __future__ import annotations

import json

import pytest

from forgelab import config as cfg
from forgelab.train import checkpoint as ckpt
from forgelab.train.config import TrainConfig
from forgelab.train.entry import launch_command, make_plan, preflight
from helpers import tiny_sets, train_cli


def _conf(*sets: str, files=("configs/train/cpt.yaml",)) -> TrainConfig:
    from forgelab.runs import project_path
    return cfg.load(TrainConfig, [project_path(f) for f in files], list(sets))


def test_flops_formula_counts_from_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from forgelab.train.flops import count_model, flops_per_token, mfu, peak_flops
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    c = count_model(model)
    emb = model.model.embed_tokens.weight.numel()
    assert c.params == sum(p.numel() for p in model.parameters())  # tied head counted once
    assert c.head_params == emb and c.non_embedding_params == c.params - emb
    assert (c.layers, c.attention_width) == (2, 2 * 32)
    want = 6 * (c.non_embedding_params + emb) + 12 * 2 * 64 * 64
    assert flops_per_token(c, span=64) == want
    assert mfu(1000.0, want, 1e12, 2) == pytest.approx(1000.0 * want / 2e12)
    assert peak_flops(None, "NVIDIA H100 80GB HBM3", "bf16")[0] == 989e12
    assert peak_flops(None, None, "fp32")[0] is None and peak_flops(5e11, None, "fp32")[0] == 5e11


def test_lora_flops_count_frozen_weights_without_weight_gradients(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from forgelab.train.flops import count_model, flops_per_token
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    c = count_model(model, lora=True)
    # 7 adapted linears per layer, each r * (in + out)
    assert c.lora_params == c.trainable_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = c.non_embedding_params + c.head_params
    assert flops_per_token(c, 64, lora=True) == 4 * base + 6 * c.lora_params + 12 * 2 * 64 * 64


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgelab.train.optim import decay_parameter_names
    m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                     tie_word_embeddings=False))
    names = set(decay_parameter_names(m))
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert not any("norm" in n or n.endswith("bias") or "embed_tokens" in n for n in names)
    assert all(p.ndim == 2 for n, p in m.named_parameters() if n in names)


def test_checkpoint_selection_ignores_unfinished_saves(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / ckpt.MARKER).write_text("{}")
    (tmp_path / ".staging-checkpoint-8" / "checkpoint-8").mkdir(parents=True)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 4]
    path, msg = ckpt.resolve_resume("auto", tmp_path, lambda p: tmp_path / p)
    assert path == tmp_path / "checkpoint-4" and "latest complete" in msg
    assert ckpt.resolve_resume("none", tmp_path, lambda p: p)[0] is None
    assert ckpt.resolve_resume("auto", tmp_path / "nothing", lambda p: p)[0] is None
    assert ckpt.resolve_resume(str(tmp_path), tmp_path, lambda p: tmp_path)[0] == tmp_path / "checkpoint-4"
    with pytest.raises(cfg.ConfigError, match="neither a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path, lambda p: tmp_path / "checkpoint-6")
    assert ckpt.clean_staging(tmp_path) == [".staging-checkpoint-8"]
    assert ckpt.rotate(tmp_path, 1) == ["checkpoint-2"] and (tmp_path / "checkpoint-6").exists()


def test_plans_resume_track_and_sweep():
    kind, steps = make_plan(_conf("resume_check.stop_at=5", "steps.max_steps=10", "run_name=r"))
    assert kind == "resume" and [s.run_name for s in steps] == ["r-uninterrupted", "r-resumed", "r-resumed"]
    assert 'steps.stop_after_steps=5' in steps[1].overrides and 'checkpoint.resume="auto"' in steps[2].overrides
    with pytest.raises(cfg.ConfigError, match="stop_at"):
        make_plan(_conf("resume_check.stop_at=10", "steps.max_steps=10"))
    conf = _conf(files=("configs/train/cpt.yaml", "configs/train/tracks/optimize.yaml"))
    kind, steps = make_plan(conf)
    assert kind == "sweep" and len(steps) == len(conf.sweep.runs) == 5
    assert steps[3].run_name == "cpt-optimize-single--03" and "runtime.torch_compile=true" in steps[3].overrides
    # every variant is a valid config
    for st in steps:
        cfg.load(TrainConfig, [], st.overrides + ["model.path=m"])


def test_launch_commands_for_backends_and_nodes(tiny_model_dir, cpt_dir, monkeypatch):
    for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC"):
        monkeypatch.delenv(k, raising=False)
    base = tiny_sets(tiny_model_dir, cpt_dir)
    sets = [base[i + 1] for i in range(0, len(base), 2)]
    single = preflight(_conf(*sets), check_run_dir=False)
    assert launch_command(single, ["--x"])[1:4] == ["-m", "forgelab.train.entry", "--worker"]
    ddp = preflight(_conf(*sets, "backend=ddp"), check_run_dir=False)
    cmd = launch_command(ddp, [])
    assert "torch.distributed.run" in cmd and "--nproc_per_node=2" in cmd and "--standalone" in cmd
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("NPROC", "4")
    ddp = preflight(_conf(*sets, "backend=ddp"), check_run_dir=False)
    cmd = launch_command(ddp, [])
    assert {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1"} <= set(cmd)
    z = preflight(_conf(*sets, "backend=zero2", "dist.deepspeed=configs/ds/zero2.json", "dist.launcher=deepspeed"),
                  check_run_dir=False)
    cmd = launch_command(z, [])
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"] and "--num_nodes" in cmd and "--module" in cmd
    with pytest.raises(cfg.ConfigError, match="backend single runs one process"):
        preflight(_conf(*sets), check_run_dir=False)


def test_launchers_compose_task_track_and_backend(tiny_model_dir, cpt_dir, sft_dir):
    r = train_cli("ddp", *tiny_sets(tiny_model_dir, cpt_dir), "--dry-run", launcher="scripts/06_train_cpt.sh")
    assert "plan: single, 1 run(s)" in r.stdout and "- cpt:" in r.stdout
    assert "configs/train/cpt.yaml" in r.stdout and "backends/ddp.yaml" in r.stdout
    assert "torch.distributed.run" in r.stdout
    r = train_cli(*tiny_sets(tiny_model_dir, sft_dir), "--dry-run", launcher="scripts/07_train_sft.sh")
    assert "- sft_lora:" in r.stdout and "configs/train/sft_lora.yaml" in r.stdout
    r = train_cli("zero3_offload", *tiny_sets(tiny_model_dir, cpt_dir), "--dry-run",
                  launcher="scripts/train/optimize.sh")
    assert "plan: sweep, 5 run(s)" in r.stdout and "cpt-optimize-zero3_offload--04" in r.stdout
    r = train_cli("fsdp", "--task", "sft_full", *tiny_sets(tiny_model_dir, sft_dir), "--dry-run",
                  launcher="scripts/train/resume.sh")
    assert "plan: resume, 3 run(s)" in r.stdout and "sft-resume-fsdp-resumed" in r.stdout
    r = train_cli("nope", launcher="scripts/train/bench.sh", check=False)
    assert r.returncode == 2 and "unknown backend 'nope'" in r.stderr
    r = train_cli("single", *tiny_sets(tiny_model_dir, cpt_dir), "--dry-run", launcher="scripts/train/bench.sh")
    assert "tracks/bench.cpt.yaml" in r.stdout  # the track's task-specific overlay (fixed bench slice)


def test_every_config_file_composes():
    from forgelab.runs import project_path
    root = project_path("configs/train")
    for task in ("cpt", "pretrain", "sft_lora", "sft_full"):
        for track in sorted(p.name for p in (root / "tracks").glob("*.yaml") if p.name.count(".") == 1):
            for backend in sorted(p.name for p in (root / "backends").glob("*.yaml")):
                files = [root / f"{task}.yaml", root / "tracks" / track, root / "backends" / backend]
                name = backend[:-5]
                # a model-parallel overlay is its ZeRO backend plus one key (docs/parallelism.md),
                # measured for cpt/pretrain only: SFT is refused, naming the key
                mp = {"_autotp": ("tensor_parallel", 2), "_ulysses": ("sequence_parallel", 2)}
                suffix = next((x for x in mp if name.endswith(x)), None)
                if suffix and task.startswith("sft"):
                    with pytest.raises(cfg.ConfigError, match=f"'dist.{mp[suffix][0]}' = 2 runs with task cpt"):
                        cfg.load(TrainConfig, files)
                    continue
                c = cfg.load(TrainConfig, files)
                if suffix:
                    key, n = mp[suffix]
                    assert c.backend == name[:-len(suffix)] and getattr(c.dist, key) == n
                else:
                    assert c.backend == name and c.dist.tensor_parallel == c.dist.sequence_parallel == 1
                assert c.track == track[:-5]
    for f in (project_path("configs/ds")).glob("*.json"):
        assert "optimizer" not in json.loads(f.read_text())  # the Trainer's AdamW (param groups) is used


def test_sft_from_a_preset_is_a_random_init_benchmark_shape():
    conf = _conf("model.path=null", "model.preset=tiny", "model.tokenizer=model/smollm2-135m-instruct",
                 files=("configs/train/sft_lora.yaml",))
    conf.validate()
    assert conf.random_init and not _conf().random_init
    with pytest.raises(cfg.ConfigError, match="model.tokenizer"):
        _conf("model.path=null", "model.preset=tiny", files=("configs/train/sft_lora.yaml",)).validate()
    with pytest.raises(cfg.ConfigError, match="needs model.path"):
        _conf("model.path=null", files=("configs/train/sft_lora.yaml",)).validate()


def test_cuda_speed_knobs_degrade_on_cpu_with_a_notice():
    from forgelab.train.runtime import apply_sdpa_backend, choose_attn as _choose_attn
    notices: list[str] = []
    assert apply_sdpa_backend("cudnn", on_cuda=False, notices=notices) == "auto"
    assert apply_sdpa_backend("auto", on_cuda=False, notices=notices) == "auto"
    assert _choose_attn("flex_attention", on_cuda=False, notices=notices) == "sdpa"
    assert len(notices) == 2 and "CUDA" in notices[0] and "flex_attention" in notices[1]


def test_regional_compile_finds_the_blocks_and_keeps_the_outputs(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from forgelab.train.runtime import compile_blocks, decoder_blocks
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert decoder_blocks(model) is model.model.layers
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids)
        notices: list[str] = []
        assert compile_blocks(model, None, notices) == 2 and not notices
        got = model(input_ids=ids, labels=ids)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    # state-dict names are unchanged, so checkpoints and final/ load without the compile
    assert set(model.state_dict()) == set(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())


def test_collators_count_real_tokens_and_padded_slots():
    import torch

    from forgelab.train.data import SLOTS_KEY, TOKENS_KEY, SFTCollator
    rows = [{"input_ids": torch.arange(5), "labels": torch.arange(5), "position_ids": torch.arange(5)},
            {"input_ids": torch.arange(3), "labels": torch.arange(3), "position_ids": torch.arange(3)}]
    b = SFTCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    assert (b[TOKENS_KEY], b[SLOTS_KEY]) == (8, 16)


def test_compile_on_cuda_only_runs_eager_on_cpu():
    from forgelab.train.runtime import choose_compile as _choose_compile
    notices: list[str] = []
    assert _choose_compile("cuda", on_cuda=False, notices=notices) is False and notices
    assert _choose_compile("cuda", on_cuda=True, notices=[]) is True
    from forgelab.train.runtime import choose_memory_cap
    notices = []
    assert choose_memory_cap(79.6, on_cuda=False, notices=notices) is None and "not capped" in notices[0]
    assert choose_memory_cap(None, on_cuda=True, notices=notices) is None and len(notices) == 1
    from forgelab.train.runtime import apply_alloc_conf
    apply_alloc_conf("expandable_segments:True", on_cuda=False, notices=notices)
    assert "not used on CPU" in notices[-1] and len(notices) == 2
    assert _choose_compile(True, on_cuda=False, notices=[]) is True
    assert _conf("runtime.torch_compile=cuda").runtime.torch_compile == "cuda"
    with pytest.raises(cfg.ConfigError, match="torch_compile"):
        _conf("runtime.torch_compile=gpu")


def test_memory_warning_when_the_estimate_exceeds_the_gpu():
    from forgelab.model.presets import build_config
    from forgelab.estimate.estimator import estimate_run
    from forgelab.train.memory_check import memory_warning
    h200, h100 = 143771 * 2**20, 81559 * 2**20
    shape = {"seq_len": 2048, "precision": "bf16", "model_dtype": "float32", "torch_compile": True,
             "micro_batch_size": 16}
    e = estimate_run(shape, build_config("qwen3-1.7b"), 100, 1)  # measured 115.8 GiB on an H200
    assert memory_warning(e, h200) is None
    warn = memory_warning(e, h100)
    assert warn and "micro_batch_size" in warn and "GiB needed" in warn


def test_cuda_graphs_with_regional_compile_are_refused():
    ok = _conf("runtime.torch_compile=true", "runtime.compile_scope=blocks",
               "runtime.compile_mode=max-autotune-no-cudagraphs")
    assert ok.runtime.compile_mode == "max-autotune-no-cudagraphs"
    assert _conf("runtime.torch_compile=true", "runtime.compile_mode=reduce-overhead").runtime.compile_scope == "model"
    with pytest.raises(cfg.ConfigError, match="reduce-overhead .*compile_scope blocks"):
        _conf("runtime.torch_compile=true", "runtime.compile_scope=blocks", "runtime.compile_mode=reduce-overhead")


@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_head_and_loss_match_the_models_own(tiny_model_dir, chunk):
    """Same loss and same gradients (head/embedding included) as the model's logits + loss, on a
    packed batch with ignored labels, with and without the Trainer's num_items_in_batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from forgelab.train.chunked_loss import causal_lm_loss
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    ids = torch.randint(0, 1000, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 15:] = -100
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    for n_items in (None, torch.tensor(40)):
        grads = []
        for fn in (lambda: model(**batch, num_items_in_batch=n_items).loss,
                   lambda: causal_lm_loss(model, batch, chunk, n_items)):
            model.zero_grad()
            loss = fn()
            loss.backward()
            grads.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        (la, ga), (lb, gb) = grads
        assert lb == pytest.approx(la, rel=1e-5)
        for k in ga:
            assert torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-4), k


def test_chunked_loss_is_refused_where_it_cannot_run(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from forgelab.train.runtime import choose_loss_chunk as _choose_loss_chunk
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    notes: list[str] = []
    assert _choose_loss_chunk(_conf("runtime.loss_chunk_tokens=512"), model, 1, notes) == 512 and not notes
    assert _choose_loss_chunk(_conf("runtime.loss_chunk_tokens=512"), model, 2, notes) == 0
    assert _choose_loss_chunk(_conf("runtime.loss_chunk_tokens=512", "runtime.torch_compile=true"), model, 1,
                              notes) == 0
    assert len(notes) == 2 and "one rank" in notes[0] and "compile_scope=blocks" in notes[1]


def test_fp8_key_is_validated_and_degrades_with_a_notice(monkeypatch):
    import importlib.util

    import torch

    from forgelab.train.runtime import choose_fp8
    assert _conf().runtime.fp8 is None and _conf("runtime.fp8=rowwise").runtime.fp8 == "rowwise"
    with pytest.raises(cfg.ConfigError, match="runtime.fp8"):
        _conf("runtime.fp8=tensorwse")
    with pytest.raises(cfg.ConfigError, match="fp8_lm_head"):
        _conf("runtime.fp8_lm_head=true").validate()
    _conf("runtime.fp8=tensorwise", "runtime.fp8_lm_head=true").validate()
    notes: list[str] = []
    assert choose_fp8(_conf(), on_cuda=True, notices=notes) is None and not notes
    fp8 = _conf("runtime.fp8=tensorwise", "runtime.torch_compile=true")
    assert choose_fp8(fp8, on_cuda=False, notices=notes) is None
    assert "runtime.fp8 tensorwise is off" in notes[-1] and "CUDA" in notes[-1]
    # GPU paths, the device and the package faked: too old a GPU, no torchao, LoRA, a sharding backend
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert choose_fp8(fp8, on_cuda=True, notices=notes) is None and "8.0" in notes[-1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    real_find, ao = importlib.util.find_spec, {"spec": None}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: ao["spec"] if name == "torchao" else
                        real_find(name, *a))
    assert choose_fp8(fp8, on_cuda=True, notices=notes) is None and "torchao is not installed" in notes[-1]
    ao["spec"] = object()
    lora = _conf("runtime.fp8=tensorwise", files=("configs/train/sft_lora.yaml",))
    assert choose_fp8(lora, on_cuda=True, notices=notes) is None and "LoRA" in notes[-1]
    assert choose_fp8(_conf("runtime.fp8=tensorwise", "backend=fsdp"), on_cuda=True, notices=notes) is None
    assert "backend fsdp" in notes[-1]
    n = len(notes)
    assert choose_fp8(fp8, on_cuda=True, notices=notes) == "tensorwise" and len(notes) == n
    assert choose_fp8(_conf("runtime.fp8=rowwise"), on_cuda=True, notices=notes) == "rowwise"
    assert "unfused" in notes[-1]  # eager FP8 runs, with a word that it is slow


def test_fp8_filter_skips_the_lm_head_and_odd_dims():
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgelab.train.runtime import fp8_filter
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=120, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    keep = fp8_filter(model)
    kept = {n.split(".")[-1] for n, m in model.named_modules() if keep(m, n)}
    assert kept == {"q_proj", "k_proj", "v_proj", "o_proj"}  # MLP: 120 is no multiple of 16; head skipped
    assert not keep(model.lm_head, "lm_head") and not keep(model.model.embed_tokens, "model.embed_tokens")
    assert fp8_filter(model, lm_head=True)(model.lm_head, "lm_head")  # the opt-in lever


def test_item_digests_name_items_by_content_whatever_their_container():
    """samples/rank<r>.jsonl compares what ranks trained on across runs and backends: a digest
    must depend on the tokens only (tensor or array, int32 or int64), and on every field of a
    TRL record; DigestCollator adds one per item and leaves the batch otherwise alone."""
    import numpy as np
    import torch

    from forgelab.train.data import DIGESTS_KEY, TOKENS_KEY, CPTCollator, DigestCollator, item_digest
    ids = [5, 17, 99, 3]
    same = {item_digest({"input_ids": v, "labels": v}) for v in
            (torch.tensor(ids), np.asarray(ids, dtype=np.int32), ids)}
    assert len(same) == 1 and len(next(iter(same))) == 16
    assert item_digest({"input_ids": [5, 17, 99, 4]}) not in same
    pair = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}]}
    assert item_digest(pair) != item_digest(dict(pair, rejected=[{"role": "assistant", "content": "6"}]))
    feats = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)},
             {"input_ids": torch.tensor(ids[::-1]), "labels": torch.tensor(ids[::-1])}]
    batch = DigestCollator(CPTCollator())(feats)
    assert batch[DIGESTS_KEY] == [item_digest(f) for f in feats] and batch[TOKENS_KEY] == 8
    assert batch["input_ids"].shape == (2, 4)


def test_a_tensor_parallel_checkpoint_does_not_move(tmp_path):
    """portable.check: DeepSpeed's universal conversion knows ZeRO partitions, not AutoTP shards, so
    a checkpoint written with dist.tensor_parallel > 1 resumes only with the sizes that wrote it."""
    import yaml
    from forgelab import config as cfg
    from forgelab.train import portable
    from forgelab.train.config import TrainConfig
    run = tmp_path / "run"
    ck = run / "checkpoint-2"
    (ck / "global_step2").mkdir(parents=True)
    for r in (0, 1):
        (ck / f"rng_state_{r}.pth").write_bytes(b"")
    (run / "config.yaml").write_text(yaml.safe_dump({"backend": "zero2", "dist": {"tensor_parallel": 2},
                                                     "steps": {"micro_batch_size": 2, "grad_accum": 4}}))
    base = ["backend=zero2", "model.path=m", "dist.deepspeed=configs/ds/zero2.json", "steps.micro_batch_size=2",
            "steps.grad_accum=4"]
    conf = cfg.load(TrainConfig, [], base)
    with pytest.raises(cfg.ConfigError, match=r"tensor/sequence parallel \(2, 1\), this run has \(1, 1\)"):
        portable.check(ck, conf, 2)
    same = cfg.load(TrainConfig, [], base + ["dist.tensor_parallel=2"])
    assert portable.check(ck, same, 2) == portable.ResumePlan()
