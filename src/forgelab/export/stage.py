"""Stage 13: export a trained model to its deliverables, gate each one against the model as
trained under every server that can run it, and publish only those within tolerance.

Deliverables are written into a staging directory beside output_root (each one a directory
with its files and a forgelab_manifest.json), gated there, and moved into
<output_root>/<name>/ by a rename only when every row of theirs passes: a refused or
half-written deliverable is never where a user would pick it up."""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .. import config as cfg
from ..config import RunError
from ..manifest import require_intact, write_manifest
from ..runs import display_path, project_path
from . import gate as G
from .config import ExportConfig, servers_of, tolerance_class

GGUF_NATIVE = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


# ----------------------------------------------------------------------------- reference + probe

def eos_ids(model_dir: Path, tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gc = model_dir / "generation_config.json"
    if gc.is_file():
        e = json.loads(gc.read_text(encoding="utf-8")).get("eos_token_id")
        ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    return ids


def load_reference(conf: ExportConfig, log):
    """The model as trained: base + adapter through PEFT (unmerged) when there is an adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = project_path(conf.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if conf.adapter:
        from peft import PeftModel

        from ..train.merge import load_base, resolve_base, trained_on_nf4
        adapter = project_path(conf.adapter)
        base = resolve_base(adapter, conf.base_model)
        require_intact(adapter, "adapter")
        nf4 = trained_on_nf4(adapter)  # QLoRA: the base it trained against is the NF4-rounded one
        model = PeftModel.from_pretrained(load_base(base, torch.float32, nf4), adapter, is_trainable=False)
        label = (f"{display_path(base)}{' (NF4-rounded)' if nf4 else ''} + adapter {display_path(adapter)} "
                 "(PEFT, float32)")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        label = f"{display_path(model_dir)} (float32)"
    log.info("reference: %s", label)
    return model.eval(), tok, label


def build_probe(g, tok) -> G.Probe:
    from ..eval.data import load_math, load_texts, normalize_text, seeded_order, training_texts
    chats = [[{"role": "user", "content": p}] for p in g.prompts]
    stream: list[int] = []
    src = project_path(g.perplexity.path)
    if not src.is_file():
        src = project_path(g.perplexity.fallback_path)
    if g.perplexity.max_tokens:
        if not src.is_file():
            raise RunError(f"gate.perplexity: neither {g.perplexity.path} nor {g.perplexity.fallback_path} exists")
        texts, _ = load_texts(src, g.perplexity.text_key)
        for t in texts:
            stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(stream) >= g.perplexity.max_tokens:
                break
        stream = stream[:g.perplexity.max_tokens]
    problems = []
    if g.math.limit:
        if not project_path(g.math.path).is_file():
            raise RunError(f"gate.math.path: {g.math.path} not found")
        pool, _ = load_math(g.math.path, g.math.format)
        seen, _ = training_texts(g.math.exclude_paths)
        pool = [p for p in pool if normalize_text(p["question"]) not in seen]
        problems = [pool[i] for i in seeded_order(len(pool), g.math.seed)[:g.math.limit]]
    probe = G.Probe(chats, g.max_new_tokens, stream, g.perplexity.max_length, g.perplexity.stride,
                    problems, g.math.max_new_tokens, decode=lambda ids: tok.decode(ids, skip_special_tokens=True))
    probe.source = {"perplexity": display_path(src) if stream else None, "perplexity_tokens": len(stream),
                    "math": display_path(project_path(g.math.path)) if problems else None,
                    "math_problems": len(problems), "prompts": len(chats)}
    return probe


# ----------------------------------------------------------------------------- exports

def gguf_name(d) -> str:
    return f"model.{d.qtype.upper()}.gguf"


def export_one(d, model_dir: Path, staging: Path, conf: ExportConfig, tok, log) -> tuple[Path, dict]:
    """Write one deliverable into staging; (its path, its stats)."""
    t0 = time.perf_counter()
    if d.format == "hf":
        return model_dir, {"bytes": _dir_bytes(model_dir, (".safetensors",)), "seconds": 0.0,
                           "path": display_path(model_dir)}
    out = staging / d.name
    if d.format == "mixed":
        from .mixed import export_mixed
        stats = export_mixed(model_dir, out, policy=d.qtype, group_size=d.group_size or conf.mixed_group_size,
                             clip_search=conf.mixed_clip_search, log=log)
        stats = {"bytes": _dir_bytes(out, (".safetensors",)), **_plain(stats)}
    else:
        from .gguf_write import export_gguf
        out.mkdir(parents=True, exist_ok=True)
        q = d.qtype.upper()
        target = out / gguf_name(d)
        if q in GGUF_NATIVE:
            stats = _plain(export_gguf(model_dir, target, q, log=log))
        else:  # K-quants: llama.cpp's own quantizer, from an F16 file
            from .llamacpp import K_QUANTS, quantize
            if q not in K_QUANTS:
                raise cfg.ConfigError(f"deliverable {d.name}: unknown GGUF type {d.qtype!r} "
                                      f"(known: {', '.join(GGUF_NATIVE + tuple(K_QUANTS))})")
            f16 = staging / f".{d.name}.F16.gguf"
            export_gguf(model_dir, f16, "F16", log=log)
            try:
                stats = _plain(quantize(f16, target, q, log=log))
            finally:
                f16.unlink(missing_ok=True)
        if conf.modelfile:
            from ..runs import atomic_write_text
            from .modelfile import modelfile
            atomic_write_text(out / "Modelfile", modelfile(target.name, tok))
        write_manifest(out)
        stats = {"bytes": target.stat().st_size, **stats}
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    stats["path"] = display_path(out)
    return out, stats


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def _dir_bytes(d: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.suffix in suffixes)


# ----------------------------------------------------------------------------- runners per server

def server_available(server: str) -> str:
    """'' when the server can run here, else why not."""
    if server == "vllm" and not project_path(".venv-vllm/bin/python").exists():
        return ".venv-vllm is not installed (bash scripts/setup_vllm_cpu.sh)"
    if server == "llamacpp":
        from .llamacpp import llamacpp_bin
        try:
            llamacpp_bin("llama-server")
        except RunError as e:
            return str(e)
    return ""


def _serve_conf(server: str, model: str, name: str, conf: ExportConfig, label: str = ""):
    from ..serve import server as srv
    from ..serve.config import ServeConfig
    threads = conf.gate.server_threads or os.cpu_count() or 1
    sets = [f"model={model}", f"port={srv.free_port()}", f"name={name}", f"threads={threads}"]
    if server == "transformers":
        sets.append("transformers.prompt_log=true")
    if server == "llamacpp" and label:
        sets.append(f"llamacpp.alias={label}")
    return cfg.load(ServeConfig, [project_path(f"configs/serve/{server}.yaml")],
                    sets + list(conf.gate.serve_overrides.get(server, [])))


@contextmanager
def open_runner(d, path: Path, server: str, conf: ExportConfig, eos: set[int]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if server == "inprocess":
        if d.format == "hf":
            require_intact(path, "model")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path)
        elif d.format == "gguf":
            from .gguf_write import check_gguf
            require_intact(path, "GGUF export")
            check_gguf(path / gguf_name(d))
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_name(d), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_name(d))
        else:
            from .mixed import load_mixed
            model = load_mixed(path)
            tok = AutoTokenizer.from_pretrained(path)
        try:
            yield G.InProcess(model, tok, eos)
        finally:
            del model
        return
    from ..serve import server as srv
    name = f"export-{d.name}-{server}-{os.getpid()}"
    model = str(path / gguf_name(d)) if d.format == "gguf" else str(path)
    sconf = _serve_conf(server, model, name, conf, d.name)
    with srv.running(sconf) as state:
        ep = srv.endpoint_from_state(state, sconf.resolved_api_key())
        if server == "vllm":
            yield G.VLLM(ep, eos)
        elif server == "transformers":
            yield G.TransformersServe(ep, srv.server_dir(name) / "prompt_ids.jsonl", eos)
        else:
            yield G.LlamaCpp(ep, eos)


def check_served_adapters(conf: ExportConfig, log) -> list[dict]:
    """gate.adapters: every adapter served at once on its base by vLLM (chosen per request by
    name), each compared with PEFT; the base under its own name too."""
    g = conf.gate
    if not g.adapters:
        return []
    why_not = server_available("vllm")
    if why_not:
        if g.require_servers:
            raise RunError(f"gate.adapters needs vLLM: {why_not}")
        log.warning("served adapters not checked: %s", why_not)
        return [{"model": "-", "passed": None, "why": f"not run: {why_not}"}]
    from ..serve import server as srv
    from ..serve.adapter_check import check_adapters
    from ..train.merge import resolve_base
    first = project_path(next(iter(g.adapters.values())))
    base = resolve_base(first, conf.base_model)
    name = f"export-adapters-{os.getpid()}"
    sconf = _serve_conf("vllm", str(base), name, conf)
    sconf.vllm.runtime_lora = {n: str(project_path(d)) for n, d in g.adapters.items()}
    sconf.vllm.served_model_name = "base"
    log.info("served adapters: %s on %s", ", ".join(g.adapters), display_path(base))
    with srv.running(sconf) as state:
        ep = srv.endpoint_from_state(state, sconf.resolved_api_key())
        rows = check_adapters(ep, base, {"base": None, **sconf.vllm.runtime_lora}, g.prompts, g.max_new_tokens)
    for r in rows:
        r.pop("outputs", None)
        diff = r.get("max_abs_logprob_diff")
        r["passed"] = r["agree"] == r["prompts"] and (diff is None or diff <= g.adapter_max_logprob_diff)
        r["why"] = (f"{r['agree']}/{r['prompts']} greedy identical, max |log p diff| "
                    f"{'–' if diff is None else f'{diff:.1e}'}")
        log.info("  served adapter %s: %s (%s)", r["model"], "pass" if r["passed"] else "FAIL", r["why"])
    return rows


# ----------------------------------------------------------------------------- the stage

def _publish(src: Path, dest: Path) -> None:
    """Move a gated deliverable into place by renames; an older one is replaced whole."""
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


def run_export(conf: ExportConfig, run) -> dict:
    import torch
    log = run.log
    if conf.threads:
        torch.set_num_threads(conf.threads)
    model_dir = project_path(conf.model)
    if not (model_dir / "config.json").is_file():
        raise RunError(f"key 'model': {display_path(model_dir)} is not a model directory (no config.json)")
    require_intact(model_dir, "model")
    out_root = project_path(conf.output_root)
    staging = out_root.parent / f".{out_root.name}.staging{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        return _run(conf, run, model_dir, out_root, staging, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(conf, run, model_dir, out_root, staging, log) -> dict:
    ref_model, tok, ref_label = load_reference(conf, log)  # tok: the exported model dir's tokenizer
    eos = eos_ids(model_dir, tok)
    probe = build_probe(conf.gate, tok)
    log.info("gate probe: %s", probe.source)
    ref_runner = G.InProcess(ref_model, tok, eos)
    ref = G.measure(ref_runner, probe, lambda s: log.info("reference: %s", s))
    probe.ref_sequences = [(p + g.ids, len(g.ids)) for p, g in zip(ref["prompt_ids"], ref["greedy"])]
    ref["cont_scores"] = [ref_runner.score(ids)[len(ids) - 1 - k:] if k else [] for ids, k in probe.ref_sequences]
    del ref_model, ref_runner
    source_bytes = _dir_bytes(model_dir, (".safetensors",))
    deliverables, any_refused = [], False
    for d in conf.deliverables:
        cls = tolerance_class(d)
        log.info("export %s (%s %s)", d.name, d.format, d.qtype)
        path, stats = export_one(d, model_dir, staging, conf, tok, log)
        stats["ratio_vs_source"] = source_bytes / stats["bytes"] if stats.get("bytes") else None
        rows = []
        for server in servers_of(d, conf.gate.servers):
            why_not = server_available(server)
            if why_not:
                if conf.gate.require_servers:
                    raise RunError(f"gate server {server} is required (gate.require_servers) but: {why_not}")
                rows.append({"server": server, "passed": None, "why": f"not run: {why_not}"})
                log.warning("%s under %s not run: %s", d.name, server, why_not)
                continue
            log.info("gate %s under %s", d.name, server)
            with open_runner(d, path, server, conf, eos) as runner:
                m = G.measure(runner, probe, lambda s: log.info("  %s / %s: %s", d.name, server, s))
            c = G.compare(m, ref)
            passed, why = G.verdict(cls, c, conf.gate.tolerances)
            rows.append({"server": server, "passed": passed, "why": why, "seconds": m["seconds"],
                         "no_score": m.get("no_score"), **c})
            log.info("  %s / %s: %s (%s)", d.name, server, "pass" if passed else "FAIL", why)
        ran = [r for r in rows if r["passed"] is not None]
        ok = bool(ran) and all(r["passed"] for r in ran)
        stage = G.diverging_stage(rows)
        qtype = f"{d.qtype} g{d.group_size or conf.mixed_group_size}" if d.format == "mixed" else d.qtype
        entry = {"name": d.name, "format": d.format, "qtype": qtype, "tolerance": cls, "stats": stats,
                 "rows": rows, "passed": ok, "diverged_at": stage}
        if ok and d.format != "hf":
            _publish(path, out_root / d.name)
            entry["published"] = display_path(out_root / d.name)
        elif not ok:
            any_refused = True
            entry["published"] = None
            log.error("%s refused: %s", d.name, stage or "no server could run it")
        else:
            entry["published"] = display_path(model_dir)
        deliverables.append(entry)
    adapter_rows = check_served_adapters(conf, log)
    if adapter_rows and not all(r["passed"] for r in adapter_rows):
        any_refused = True
    summary = {"model": display_path(model_dir), "reference": ref_label, "probe": probe.source,
               "served_adapters": adapter_rows,
               "tolerances": cfg.to_dict(conf.gate.tolerances),
               "reference_measure": {"ppl": ref["ppl"], "math_acc": (sum(a["correct"] for a in ref["math"]) /
                                                                     len(ref["math"])) if ref["math"] else None,
                                     "seconds": ref["seconds"]},
               "source_bytes": source_bytes, "deliverables": deliverables,
               "refused": [e["name"] for e in deliverables if not e["passed"]]}
    from .report import write_report
    write_report(summary, project_path(conf.report), run)
    summary["report"] = display_path(project_path(conf.report))
    summary["any_refused"] = any_refused
    return summary
