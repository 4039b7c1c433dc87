"""Math-eval throughput: the same problems, prompts and greedy settings through each generation
path (in-process at N threads, a vLLM server, a `transformers serve` server), one after another
in one run, with each path's answers checked against the first in-process path."""
from __future__ import annotations

import dataclasses
import os
import platform
import time

from . import gsm
from .config import EvalConfig
from .generation import InProcessGenerator, ServedGenerator, serve_config
from .runtime import load_model

PATHS = ("inprocess:1", "inprocess:2", "vllm", "transformers")


def parse_path(p: str) -> tuple[str, int]:
    """'inprocess:2' -> ('inprocess', 2); 'vllm' -> ('vllm', 0: every core)."""
    kind, _, threads = p.partition(":")
    if kind not in ("inprocess", "vllm", "transformers"):
        raise ValueError(f"unknown generation path {p!r} (inprocess:N, vllm, transformers)")
    return kind, int(threads or 0)


def _served(conf: EvalConfig, spec, kind: str, threads: int, prep: dict, ds, lm, log) -> tuple[dict, dict]:
    from ..serve import server
    sconf = serve_config(dataclasses.replace(conf.generation, backend=kind, server_threads=threads), spec)
    t0 = time.time()
    with server.running(sconf, progress=False) as state:
        startup = time.time() - t0
        gen = ServedGenerator(server.endpoint_from_state(state, sconf.resolved_api_key()), kind,
                              conf.generation.concurrency, conf.generation.timeout_s)
        t = time.time()
        r = gsm.evaluate(lm, conf.math, ds, conf.runtime, prep, gen)
        seconds = time.time() - t
    log.info("%s: %d problems in %.1f s after a %.1f s start", kind, r["n"], seconds, startup)
    return r, {"seconds": seconds, "startup_seconds": startup, "threads": sconf.threads,
               "server_command": state["command"]}


def measure(conf: EvalConfig, paths: list[str], log) -> dict:
    """One row per path; the first path is the reference the others' answers are compared with."""
    import torch

    spec = conf.models[0]
    ds = conf.math.datasets[0]
    prep = gsm.prepare(conf.math, ds)
    lm = load_model(spec.name, spec.path, conf.runtime)
    default_threads = torch.get_num_threads()
    rows, ref = [], None
    for p in paths:
        kind, threads = parse_path(p)
        if kind == "inprocess":
            torch.set_num_threads(threads or os.cpu_count() or 1)
            t = time.time()
            r = gsm.evaluate(lm, conf.math, ds, conf.runtime, prep, InProcessGenerator(lm, conf.runtime))
            extra = {"seconds": time.time() - t, "startup_seconds": 0.0, "threads": torch.get_num_threads()}
            torch.set_num_threads(default_threads)
            log.info("%s: %d problems in %.1f s", p, r["n"], extra["seconds"])
        else:
            r, extra = _served(conf, spec, kind, threads, prep, ds, lm, log)
        recs = r.pop("records")
        ref = ref or recs
        rows.append({"path": p, "backend": kind, **extra, "problems": r["n"],
                     "problems_per_s": r["n"] / extra["seconds"],
                     "problems_per_s_with_startup": r["n"] / (extra["seconds"] + extra["startup_seconds"]),
                     "generated_tokens": sum(x["new_tokens"] for x in recs),
                     "tokens_per_s": sum(x["new_tokens"] for x in recs) / extra["seconds"],
                     "exact_match": r["exact_match"], "batch_size": r["batch_size"],
                     "same_text_as_reference": sum(a["response"] == b["response"] for a, b in zip(recs, ref)),
                     "same_answer_as_reference": sum(a["pred"] == b["pred"] for a, b in zip(recs, ref))})
    inproc = [r for r in rows if r["backend"] == "inprocess"]
    best = max(inproc, key=lambda r: r["problems_per_s"]) if inproc else None
    for r in rows:
        r["speedup_vs_best_inprocess"] = r["problems_per_s"] / best["problems_per_s"] if best else None
    return {"model": spec.path, "dataset": ds.name, "problems": len(prep["problems"]),
            "max_new_tokens": conf.math.max_new_tokens, "shots": conf.math.shots,
            "concurrency": conf.generation.concurrency, "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "reference": paths[0], "best_inprocess": best["path"] if best else None, "rows": rows}


def markdown(res: dict, command: str) -> str:
    from ..report.render import num, table
    rows = [[r["path"], r["threads"], r["problems"], num(r["seconds"]), num(r["startup_seconds"]),
             num(r["problems_per_s"], 2), num(r["problems_per_s_with_startup"], 2), num(r["tokens_per_s"]),
             f"{100 * r['exact_match']:.1f}%", f"{r['same_text_as_reference']}/{r['problems']}",
             f"{r['same_answer_as_reference']}/{r['problems']}",
             "-" if r["speedup_vs_best_inprocess"] is None else f"{r['speedup_vs_best_inprocess']:.2f}x"]
            for r in res["rows"]]
    served = [r for r in res["rows"] if r["backend"] != "inprocess"]
    fastest = max(served, key=lambda r: r["problems_per_s"]) if served else None
    L = ["# Math-eval throughput: in-process vs served generation", "",
         f"The same {res['problems']} `{res['dataset']}` problems ({res['shots']}-shot through the chat "
         f"template, greedy, at most {res['max_new_tokens']} new tokens) of `{res['model']}`, through each "
         f"path one after another in one run on {res['cpu_count']} CPU cores (torch {res['torch']}). "
         f"Served paths get {res['concurrency']} requests in flight; their start-up is timed apart. "
         f"Answers are compared with the `{res['reference']}` path's, problem by problem.", "",
         "Produced by:", "", f"    {command}", "",
         table(["path", "threads", "problems", "seconds", "start-up s", "problems/s",
                "problems/s incl. start-up", "new tokens/s", "exact match", "same text", "same answer",
                "vs best in-process"], rows), ""]
    if fastest and fastest["speedup_vs_best_inprocess"] is not None:
        L.append(f"Fastest served path: `{fastest['path']}` at {fastest['speedup_vs_best_inprocess']:.2f}x "
                 f"the best in-process path (`{res['best_inprocess']}`) once started "
                 f"({fastest['problems_per_s_with_startup'] / fastest['problems_per_s'] * fastest['speedup_vs_best_inprocess']:.2f}x "
                 f"counting its {fastest['startup_seconds']:.0f} s start-up).")
        L.append("")
    return "\n".join(L)
