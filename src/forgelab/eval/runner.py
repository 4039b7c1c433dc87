"""The eval stage: every configured model through the same tasks on the same data, one model
in memory at a time. Results go to the run directory (summary.json and one predictions file
per model and task) and, when configured, to the side-by-side report."""
from __future__ import annotations

import contextlib
import gc
import json
import random
import time
from pathlib import Path

from ..components import component_fingerprints, component_name
from ..model.tokenizer_info import tokenizer_fingerprint
from ..runs import atomic_write_text, fingerprint_paths, project_path
from . import choice, code, gsm, lm_eval_backend, mmlu
from . import perplexity as ppl
from .config import EvalConfig
from .data import load_texts
from .generation import Generators
from .runtime import load_model

GENERATION_TASKS = ("math", "code")


def _jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _fp(paths: list[str]) -> str:
    """Content fingerprint of a task's data: runs over changed files are not merged."""
    return fingerprint_paths([project_path(p) for p in paths])


def prepare(conf: EvalConfig, log) -> dict:
    """Model-independent inputs of every task, and the protocol that describes them."""
    prep: dict = {"protocol": {}, "files": []}
    if "perplexity" in conf.tasks:
        pc = conf.perplexity
        src = pc.path
        if not project_path(src).is_file():
            if not pc.fallback_path:
                raise FileNotFoundError(f"perplexity.path {src} does not exist (and no perplexity.fallback_path)")
            log.warning("perplexity.path %s does not exist: using perplexity.fallback_path %s", src, pc.fallback_path)
            src = pc.fallback_path
        texts, groups = load_texts(src, pc.text_key, pc.group_key)
        if pc.shuffle_seed is not None:
            order = list(range(len(texts)))
            random.Random(pc.shuffle_seed).shuffle(order)
            texts = [texts[i] for i in order]
            groups = [groups[i] for i in order] if groups else None
        prep["perplexity"] = {"texts": texts, "groups": groups}
        prep["files"].append(src)
        prep["protocol"]["perplexity"] = {
            "source": src, "fell_back": src != pc.path, "documents": len(texts),
            "group_key": pc.group_key if groups else None, "max_length": pc.max_length,
            "stride": pc.stride, "max_tokens": pc.max_tokens, "doc_separator": pc.doc_separator,
            "shuffle_seed": pc.shuffle_seed, "data_fingerprint": _fp([src])}
    if "math" in conf.tasks:
        prep["math"] = {}
        prep["protocol"]["math"] = {"shots": conf.math.shots, "max_new_tokens": conf.math.max_new_tokens,
                                    "seed": conf.math.seed, "system_prompt": conf.math.system_prompt,
                                    "datasets": {}}
        for what, specs in (("metrics", conf.math.metrics), ("rewards", conf.math.rewards)):
            if specs:  # plug-ins: name -> path and the sha256 of the code that computed them
                digests = component_fingerprints(specs)
                prep["protocol"]["math"][what] = {component_name(s): {"path": s, "sha256": digests[s]}
                                                  for s in specs}
        for ds in conf.math.datasets:
            p = gsm.prepare(conf.math, ds)
            prep["math"][ds.name] = p
            prep["files"].append(ds.path)
            for miss in p["exclude_paths_missing"]:
                log.warning("math.exclude_paths: %s does not exist; %s is not checked against it", miss, ds.name)
            prep["files"].extend(f for f in conf.math.exclude_paths if f not in p["exclude_paths_missing"])
            if p["fewshot_file"]:
                prep["files"].append(p["fewshot_file"])
            prep["protocol"]["math"]["datasets"][ds.name] = {
                "path": ds.path, "format": ds.format, "scored": len(p["problems"]),
                "numeric_problems": p["pool_size"], "non_numeric_left_out": p["non_numeric_skipped"],
                "excluded_as_training_data": p["excluded_as_training_data"], "exclude_paths": conf.math.exclude_paths,
                "exclude_paths_missing": p["exclude_paths_missing"],
                "exemplar_source": p["exemplar_source"], "exemplar_rows": [e["row"] for e in p["exemplars"]],
                "scored_rows": [q["row"] for q in p["problems"]],
                "data_fingerprint": _fp([ds.path] + ([p["fewshot_file"]] if p["fewshot_file"] else []))}
    if "mmlu" in conf.tasks:
        sel = mmlu.select(conf.mmlu, max(conf.mmlu.shots))
        prep["mmlu"] = sel
        prep["files"].append(conf.mmlu.path)
        if conf.mmlu.dev_path:
            prep["files"].append(conf.mmlu.dev_path)
        prep["protocol"]["mmlu"] = {
            "path": conf.mmlu.path, "dev_path": conf.mmlu.dev_path, "shots": conf.mmlu.shots,
            "subjects": {s: len(q) for s, q in sel["scored"].items()},
            "questions": sum(len(q) for q in sel["scored"].values()),
            "per_subject_limit": conf.mmlu.per_subject_limit, "exemplar_source": sel["exemplar_source"],
            "data_fingerprint": _fp([conf.mmlu.path] + ([conf.mmlu.dev_path] if conf.mmlu.dev_path else [])),
            "header_rows_dropped": sel["dropped_rows"]}
    if "lm_eval" in conf.tasks:
        prep["protocol"]["lm_eval"] = lm_eval_protocol(conf)
        if conf.lm_eval.include_path:  # custom tasks: their YAML and data files
            prep["files"].append(conf.lm_eval.include_path)
    if "choice" in conf.tasks:
        prep["choice"] = {}
        prep["protocol"]["choice"] = {"shots": conf.choice.shots, "seed": conf.choice.seed, "datasets": {}}
        for ds in conf.choice.datasets:
            p = choice.prepare(conf.choice, ds)
            prep["choice"][ds.name] = p
            prep["files"].append(ds.path)
            for why, d in p["dropped"].items():
                log.warning("choice %s: %d records left out (%s; first rows %s)", ds.name, d["count"], why,
                            d["first_rows"])
            prep["protocol"]["choice"]["datasets"][ds.name] = {
                "path": ds.path, "format": ds.format, "scored": len(p["questions"]), "rows": p["rows"],
                "labelled": p["labelled"], "labels_dropped": p["dropped"],
                "choices": sorted({len(q["choices"]) for q in p["questions"]}),
                "scored_rows": [q["row"] for q in p["questions"]],
                "exemplar_rows": [e["row"] for e in p["exemplars"]], "data_fingerprint": _fp([ds.path])}
    if "code" in conf.tasks:  # HumanEval; the sandbox's isolation is detected here, once
        prep["code"] = code.prepare(conf.code)
        prep["files"].append(conf.code.path)
        prep["protocol"]["code"] = prep["code"]["protocol"] | {"data_fingerprint": _fp([conf.code.path])}
        log.info("code: %d HumanEval problems; test programs sandboxed by %s",
                 prep["code"]["protocol"]["scored"], prep["code"]["protocol"]["sandbox"]["isolation"]["mode"])
    return prep


def lm_eval_protocol(conf: EvalConfig) -> dict:
    """What the lm_eval numbers depend on; a missing lm-eval venv fails here, before any model loads."""
    le = conf.lm_eval
    python = lm_eval_backend.lm_eval_python(le.python)
    prot = {"tasks": le.tasks, "num_fewshot": le.num_fewshot, "limit": le.limit, "model": le.model,
            "apply_chat_template": le.apply_chat_template, "system_instruction": le.system_instruction,
            "model_args": le.model_args, "extra_args": le.extra_args,
            "lm_eval_version": lm_eval_backend.lm_eval_version(python, le.model), "include_path": le.include_path}
    if le.include_path:
        prot["data_fingerprint"] = _fp([le.include_path])
    if le.model != "hf":
        prot["serve_config"] = le.serve_config
    return prot


@contextlib.contextmanager
def _off_gpu(lm):
    """lm-eval loads its own copy of the model: ours waits in RAM meanwhile, not on the GPU."""
    if not lm.device.startswith("cuda"):
        yield
        return
    import torch
    lm.model.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        lm.model.to(lm.device)


def evaluate_model(conf: EvalConfig, spec, prep: dict, out_dir: Path, log) -> dict:
    with contextlib.ExitStack() as stack:  # a server started for this model stops with it
        return _evaluate_model(conf, spec, prep, out_dir, log, stack)


def _evaluate_model(conf: EvalConfig, spec, prep: dict, out_dir: Path, log, stack) -> dict:
    t0 = time.time()
    lm = load_model(spec.name, spec.path, conf.runtime)
    gens = Generators(conf.generation, conf.runtime, spec, lm, stack, log)
    info = {"path": spec.path, "device": lm.device, "dtype": lm.dtype,
            "params": sum(t.numel() for t in lm.model.parameters()),
            "tokenizer_fingerprint": tokenizer_fingerprint(lm.path),
            "load_seconds": round(time.time() - t0, 2), "seconds": {}, "results": {}}
    res = info["results"]
    order = list(conf.tasks)
    if gens.serves:  # generation last: the server runs (and busy-waits between requests) only then
        order = [t for t in order if t not in GENERATION_TASKS] + [t for t in order if t in GENERATION_TASKS]
    for task in order:
        t = time.time()
        if task == "perplexity":
            r, rows = ppl.evaluate(lm, prep["perplexity"]["texts"], prep["perplexity"]["groups"],
                                   conf.perplexity, conf.runtime, desc=f"{spec.name} perplexity")
            _jsonl(out_dir / f"{spec.name}.perplexity.jsonl", rows)
            res["perplexity"] = r
            log.info("%s perplexity %.3f over %d tokens (%d windows)", spec.name, r["perplexity"],
                     r["tokens_scored"], r["windows"])
        elif task == "math":
            res["math"] = {}
            for ds in conf.math.datasets:
                r = gsm.evaluate(lm, conf.math, ds, conf.runtime, prep["math"][ds.name], gens.get())
                _jsonl(out_dir / f"{spec.name}.math_{ds.name}.jsonl", r.pop("records"))
                res["math"][ds.name] = r
                log.info("%s math %s: %d/%d exact match", spec.name, ds.name, r["correct"], r["n"])
                for what in ("metrics", "rewards"):
                    for cname, v in r.get(what, {}).items():
                        log.info("%s math %s: %s %s mean %s over %d", spec.name, ds.name, what[:-1], cname,
                                 "-" if v["mean"] is None else f"{v['mean']:.4f}", v["n"])
        elif task == "mmlu":
            res["mmlu"] = {}
            for shots in conf.mmlu.shots:
                r = mmlu.evaluate(lm, conf.mmlu, conf.runtime, shots, prep["mmlu"])
                _jsonl(out_dir / f"{spec.name}.mmlu_{shots}shot.jsonl", r.pop("records"))
                res["mmlu"][f"{shots}-shot"] = r
                log.info("%s mmlu %d-shot: macro accuracy %.4f over %d questions", spec.name, shots,
                         r["macro_accuracy"], r["n"])
        elif task == "lm_eval":  # lm-evaluation-harness in its own venv and process
            with _off_gpu(lm):
                r = lm_eval_backend.evaluate(conf.lm_eval, spec.name, lm.path, lm.device, lm.dtype,
                                             out_dir / f"{spec.name}.lm_eval", log, conf.runtime.threads)
            res["lm_eval"] = r
            for name, metrics in r["tasks"].items():
                log.info("%s lm-eval %s: %s over %s samples", spec.name, name,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n"), metrics["n"])
        elif task == "choice":
            res["choice"] = {}
            for ds in conf.choice.datasets:
                r = choice.evaluate(lm, conf.choice, ds, conf.runtime, prep["choice"][ds.name])
                _jsonl(out_dir / f"{spec.name}.choice_{ds.name}.jsonl", r.pop("records"))
                res["choice"][ds.name] = r
                log.info("%s choice %s: acc %.4f, acc_norm %.4f over %d questions", spec.name, ds.name,
                         r["acc"], r["acc_norm"], r["n"])
        elif task == "code":
            r = code.evaluate(lm, conf.code, conf.runtime, prep["code"], gens.get())
            _jsonl(out_dir / f"{spec.name}.code_humaneval.jsonl", r.pop("records"))
            res["code"] = {"humaneval": r}
            log.info("%s code humaneval: pass@1 %.4f (%d/%d passed; %s)", spec.name, r["pass_at_1"], r["passed"],
                     r["n"], ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items())))
        info["seconds"][task] = round(time.time() - t, 2)
    info["total_seconds"] = round(time.time() - t0, 2)
    if any(t in GENERATION_TASKS for t in conf.tasks):
        info["generation"] = gens.info
    device = lm.device
    del lm  # one model in memory at a time
    gc.collect()
    if device.startswith("cuda"):
        import torch
        torch.cuda.empty_cache()
    return info


def run_eval(conf: EvalConfig, run, command: str) -> dict:
    """Evaluate every model; fills run.summary and returns it."""
    import torch

    for i, spec in enumerate(conf.models):  # fail before hours of work, not after
        d = project_path(spec.path)
        if not (d / "config.json").is_file():
            hint = " (a LoRA adapter: merge it first, scripts/08_merge_lora.py)" \
                if (d / "adapter_config.json").is_file() else ""
            raise FileNotFoundError(f"models[{i}] '{spec.name}': no Hugging Face model at {d}{hint} "
                                    f"(key models[{i}].path)")
    prep = prepare(conf, run.log)
    run.data_fingerprint = fingerprint_paths([project_path(f) for f in dict.fromkeys(prep["files"])])
    run.summary.update(command=command, torch_threads=torch.get_num_threads(),
                       protocol=prep["protocol"], models={})
    out_dir = run.dir / "predictions"
    for spec in conf.models:
        run.summary["models"][spec.name] = evaluate_model(conf, spec, prep, out_dir, run.log)
    fps = {m["tokenizer_fingerprint"] for m in run.summary["models"].values()}
    run.tokenizer_fingerprint = fps.pop() if len(fps) == 1 else "mixed"
    return run.summary
