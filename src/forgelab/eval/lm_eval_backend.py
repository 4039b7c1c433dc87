"""lm-evaluation-harness as a task of the eval stage (`lm_eval`): for one model, the lm-eval
command run from its own venv (.venv-lmeval) as a subprocess, offline, its output inside the
run directory, its results JSON read back as {task: {metric: value, "n": samples}}, and the
exact command line kept with the numbers.

With lm_eval.model = hf, lm-eval loads the model directory itself. With local-completions or
local-chat-completions the model is served here (forgelab.serve, from lm_eval.serve_config) for
the length of the lm-eval run, and lm-eval calls the server's OpenAI-compatible endpoint with
the model directory as its tokenizer.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..config import RunError
from ..runs import PROJECT_ROOT, display_path, project_path
from .config import LM_EVAL_SETUP, LmEvalConfig

# lm-eval must not reach for the hub: models and custom data are local, built-in tasks come
# from the local Hugging Face cache
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
ENDPOINTS = {"local-completions": "completions", "local-chat-completions": "chat/completions"}


class LmEvalMissing(RunError):
    """The lm-eval venv (or lm-eval inside it) is not there; the message says how to make it."""


class LmEvalFailed(RuntimeError):
    """lm-eval exited with an error; the message has the tail of its log."""




def lm_eval_python(python: str) -> Path:
    py = project_path(python)
    if not py.is_file():
        raise LmEvalMissing(f"lm-eval venv interpreter {python} (key lm_eval.python) not found: run "
                            f"`{LM_EVAL_SETUP}` to create .venv-lmeval, or point lm_eval.python at one")
    return py


# what lm-eval's API models (local-completions, local-chat-completions) import: lm-eval[api]
API_PACKAGES = ("aiohttp", "tenacity", "requests", "tqdm")
_PROBE = ("import importlib.metadata as m, importlib.util as u, json, sys\n"
          "print(json.dumps({'version': m.version('lm_eval'), "
          "'missing': [p for p in sys.argv[1:] if u.find_spec(p) is None]}))")


def lm_eval_version(python: Path, model: str = "hf") -> str:
    """lm-eval's version in the venv; fails now, before any model loads or server starts, when
    lm-eval or the packages the chosen lm_eval.model needs are missing there."""
    proc = subprocess.run([str(python), "-c", _PROBE, *(API_PACKAGES if model != "hf" else ())],
                          capture_output=True, text=True)
    if proc.returncode:
        raise LmEvalMissing(f"{display_path(python)} (key lm_eval.python) has no lm-eval installed: run "
                            f"`{LM_EVAL_SETUP}`")
    info = json.loads(proc.stdout)
    if info["missing"]:
        raise LmEvalMissing(f"lm_eval.model {model} needs lm-eval's API extras, missing in {display_path(python)}: "
                            f"{', '.join(info['missing'])}; install them with `{display_path(python)} -m pip install "
                            f"'lm-eval[api]=={info['version']}'`")
    return info["version"]


def model_args(conf: LmEvalConfig, model_dir: Path, dtype: str, server: dict | None = None) -> str:
    """--model_args: the model (or the server serving it) set here, lm_eval.model_args on top."""
    if server is None:
        args = {"pretrained": display_path(model_dir), "dtype": dtype}
    else:
        args = {"model": server["request_model"], "base_url": f"{server['url']}/{ENDPOINTS[conf.model]}",
                "tokenizer": display_path(model_dir), "tokenizer_backend": "huggingface"}
        if conf.model == "local-chat-completions":
            args["tokenized_requests"] = "False"  # chat endpoints take messages, not token ids
    args.update(conf.model_args)
    return ",".join(f"{k}={v}" for k, v in args.items())


def build_command(conf: LmEvalConfig, python: Path, margs: str, out_dir: Path, device: str | None) -> list[str]:
    """The lm-eval command line; paths relative to the project root, where it runs."""
    cmd = [display_path(python), "-m", "lm_eval", "run", "--model", conf.model, "--model_args", margs,
           "--tasks", ",".join(conf.tasks), "--batch_size", str(conf.batch_size or "auto"),
           "--output_path", display_path(out_dir), "--log_samples"]
    if conf.include_path:
        cmd += ["--include_path", display_path(project_path(conf.include_path))]
    if conf.num_fewshot is not None:
        cmd += ["--num_fewshot", str(conf.num_fewshot)]
    if conf.limit:
        cmd += ["--limit", str(conf.limit)]
    if device:
        cmd += ["--device", device]
    if conf.apply_chat_template:
        cmd.append("--apply_chat_template")
    if conf.system_instruction:
        cmd += ["--system_instruction", conf.system_instruction]
    return cmd + list(conf.extra_args)


def command_line(cmd: list[str], env: dict[str, str]) -> str:
    """The command as it can be pasted into a shell at the project root (secrets left out)."""
    shown = {k: v for k, v in env.items() if "KEY" not in k}
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()) + " " + shlex.join(cmd)


def run_command(cmd: list[str], env: dict[str, str], log_path: Path, echo: bool = True) -> float:
    """Run lm-eval from the project root; its output goes to log_path and, as it comes, to
    stderr (lm-eval's own progress bars). Returns the wall seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end mid-character
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                env=dict(os.environ, **env), stdin=subprocess.DEVNULL)
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            log.write(chunk)
            if echo:
                sys.stderr.write(text.decode(chunk))
                sys.stderr.flush()
        proc.wait()
    if proc.returncode:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise LmEvalFailed(f"lm-eval failed (exit {proc.returncode}); full log {log_path}:\n{tail}")
    return time.time() - t0


def _metric_name(key: str) -> str:
    """lm-eval's 'acc,none' -> 'acc'; a filtered one keeps its filter: 'exact_match,flexible-extract'."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else key


def newest_output(out_dir: Path, pattern: str) -> Path:
    """The newest file lm-eval wrote under out_dir matching pattern (results_*.json,
    samples_<task>_*.jsonl: it nests them in a folder named after the model)."""
    files = sorted(out_dir.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"lm-eval wrote no {pattern} under {out_dir}")
    return files[-1]


def read_results(out_dir: Path) -> dict:
    """{tasks: {task: {metric: value, "n": samples}}, higher_is_better, results_file} from the
    newest results_*.json lm-eval wrote under out_dir."""
    results_file = newest_output(out_dir, "results_*.json")
    res = json.loads(results_file.read_text(encoding="utf-8"))
    n_samples = {t: v.get("effective", v.get("original")) for t, v in res.get("n-samples", {}).items()}
    tasks, better = {}, {}
    for task, metrics in res["results"].items():
        # metrics are the 'metric,filter' keys (others: alias, name, sample_len); 'N/A' stderrs dropped
        vals = {_metric_name(k): v for k, v in metrics.items()
                if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        # a group has no sample count of its own: the sum of its subtasks'
        n = n_samples.get(task) or sum(n_samples.get(t, 0) for t in res.get("group_subtasks", {}).get(task, []))
        tasks[task] = {**vals, "n": n}
        better[task] = {_metric_name(k): v for k, v in res.get("higher_is_better", {}).get(task, {}).items()}
    return {"tasks": tasks, "higher_is_better": better, "results_file": results_file}


@contextmanager
def serving(conf: LmEvalConfig, model_dir: Path, label: str, log):
    """The model served for lm-eval (lm_eval.serve_config) on a free port; stopped afterwards."""
    from .. import config as cfg
    from ..serve import server
    from ..serve.config import ServeConfig

    sc = cfg.load(ServeConfig, [project_path(conf.serve_config)], list(conf.serve_overrides))
    sc = dataclasses.replace(sc, model=str(model_dir), port=server.free_port(sc.host),
                             name=f"lm-eval-{label}-{os.getpid()}")
    log.info("lm-eval %s: serving %s with %s (%s) for lm-eval", label, display_path(model_dir), sc.backend,
             conf.serve_config)
    with server.running(sc, progress=True) as state:
        yield state, sc.resolved_api_key()


def evaluate(conf: LmEvalConfig, label: str, model_dir: Path, device: str, dtype: str,
             out_dir: Path, log, threads: int = 0) -> dict:
    """One model through the configured lm-eval tasks; out_dir receives lm-eval's results and
    per-sample logs and lm_eval.log."""
    python = lm_eval_python(conf.python)
    env = dict(OFFLINE_ENV)
    omp = str(threads) if threads else os.environ.get("OMP_NUM_THREADS")
    if omp:  # in the recorded command too: CPU timings depend on it
        env["OMP_NUM_THREADS"] = omp
    served = conf.model != "hf"
    with serving(conf, model_dir, label, log) if served else nullcontext((None, "")) as (state, key):
        margs = model_args(conf, model_dir, dtype, state)
        cmd = build_command(conf, python, margs, out_dir, None if served else device)
        shown = command_line(cmd, env)
        if key:
            env["OPENAI_API_KEY"] = key  # lm-eval's API models send it as the bearer token
        log.info("lm-eval %s: %s (log %s)", label, shown, display_path(out_dir / "lm_eval.log"))
        seconds = run_command(cmd, env, out_dir / "lm_eval.log")
    got = read_results(out_dir)
    out = {"tasks": got["tasks"], "higher_is_better": got["higher_is_better"], "command": shown,
           "output_dir": display_path(out_dir), "results_file": display_path(got["results_file"]), "seconds": round(seconds, 1)}
    if state:
        out["server"] = {k: state.get(k) for k in ("name", "backend", "url", "request_model", "startup_seconds")}
    return out
