"""Run untrusted Python programs (model-written code and its tests) in a child process.

Never in the eval process: every program runs in a fresh interpreter (`-P -s -S -B`: no site
packages, no bytecode writes, a clean environment) with

- a throw-away directory as its cwd, HOME and TMPDIR, removed afterwards;
- a wall-clock limit: the child starts its own session and, at the limit or when the program
  ends, the whole process group is killed (SIGKILL), so nothing it started outlives the run;
  inside a PID namespace the kernel also kills every process of the namespace, even one that
  left the group;
- resource limits set before the program runs: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE,
  RLIMIT_CORE 0, and RLIMIT_NPROC when the program runs under a uid of its own;
- no network: a new network namespace (only a loopback that is down) when this machine allows
  one (detected once, see isolation()), and always an audit hook (sys.addaudithook, which no
  Python code can remove) installed before the program runs. The hook refuses sockets, writes
  outside the sandbox directory (open for writing, remove, rename, chmod, links, ...),
  directory descriptors, process creation (fork, exec, spawn, system, subprocess), ctypes,
  rlimit changes and a few modules that open files or interpreters behind Python's back.

As root the program also runs as nobody (uid 65534) when an interpreter of the same Python
version is readable by that uid: the kernel then refuses writes to everything but
world-writable places, which the hook covers.

The audit hook alone is not a security boundary against a determined attacker (threads can
race its checks, and code that digs through interpreter internals can forge a result); the
namespaces, the uid and the rlimits are kernel-enforced. A refused operation makes the run's
status "error", whether or not the program caught the PermissionError.

Result of a run: {status: passed|failed|timeout|error, detail, seconds}. "passed" needs the
program to run to its end and the bootstrap to report it with a one-time token the parent
sent, so os._exit(0) or printing "PASS" from the program does not count.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

NOBODY = 65534
# the interpreter flags of every sandboxed program: no cwd/script dir on sys.path, no user or
# site packages, no .pyc writes (which the hook would have to refuse)
PY_FLAGS = ("-P", "-s", "-S", "-B")
# PID 1 of a PID namespace ignores signals it has no handler for (SIGXCPU, SIGXFSZ): a shell
# is PID 1 and the program its child, so the rlimits' signals work as usual
PID1 = ("/bin/sh", "-c", '"$@"; exit $?', "sh")
UNSHARE_NET_PID = ("unshare", "--net", "--pid", "--fork", "--kill-child")
USERNS = ("--user", "--map-root-user")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0    # wall clock, the whole run
    memory_mb: int = 1024      # RLIMIT_AS of the program
    file_mb: int = 16          # RLIMIT_FSIZE: the largest file (and stdout/stderr) it may write
    processes: bool = False    # allow fork/exec/spawn (the time limit still ends every process)
    hash_seed: int = 0         # PYTHONHASHSEED: set and dict orders are the same every run

    @property
    def cpu_s(self) -> int:
        """RLIMIT_CPU: a backstop one second beyond the wall-clock limit."""
        return int(-(-self.timeout_s // 1)) + 1

    def record(self) -> dict:
        return asdict(self) | {"cpu_s": self.cpu_s}


# ----------------------------------------------------------------------------- the child

# Runs in the child interpreter: rlimits, the program from stdin, the audit hook, the program.
# Arguments: root, channel fd, memory MB, CPU s, file MB, nproc (0 = not set), processes 0/1.
BOOTSTRAP = r'''
import os, sys, resource, pathlib

def _limits(mem_mb, cpu_s, file_mb, nproc):
    R = resource
    wanted = [(R.RLIMIT_CORE, 0, 0), (R.RLIMIT_CPU, cpu_s, cpu_s + 1), (R.RLIMIT_AS, mem_mb << 20, mem_mb << 20),
              (R.RLIMIT_FSIZE, file_mb << 20, file_mb << 20)]
    if nproc:
        wanted.append((R.RLIMIT_NPROC, nproc, nproc))
    for what, soft, hard in wanted:
        cur = R.getrlimit(what)[1]
        if cur != R.RLIM_INFINITY:  # never above what this process was given
            soft, hard = min(soft, cur), min(hard, cur)
        R.setrlimit(what, (soft, hard))

def _guard(root, chan, processes):
    """Install the audit hook. Everything it calls is bound here, before the program runs, to
    C functions and builtins the program cannot swap (it can replace os.lstat or
    builtins.type, not these references)."""
    lstat, stat, readlink, getcwd, getpid, write = os.lstat, os.stat, os.readlink, os.getcwd, os.getpid, os.write
    _type, _repr, _str, _bytes, _int, _float, _bool = type, repr, str, bytes, int, float, bool
    _tuple, _any, _all = tuple, any, all
    _PermissionError, item, name_of = PermissionError, tuple.__getitem__, type.__dict__["__name__"].__get__
    path_types = (pathlib.PosixPath, pathlib.PurePosixPath)
    fspath_fn, str_fn = pathlib.PurePath.__fspath__, pathlib.PurePath.__str__
    prefix = root.rstrip("/") + "/"
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    TMPFILE = getattr(os, "O_TMPFILE", 0)  # opens a directory, returns an unnamed file in it
    WRITABLE = {"/dev/null"}
    # event -> (positions of path arguments, positions of dir_fd arguments)
    PATHS = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
             "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
             "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
             "os.truncate": ((0,), ()), "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
             "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.chflags": ((0,), ())}
    PREFIXES = ("socket.", "ctypes.", "fcntl.", "syslog.", "sqlite3.")
    BLOCKED = {"resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
               "gc.get_referents", "os.killpg", "signal.pthread_kill"}
    # modules that open files, interpreters or libraries without an audit event of their own
    MODULES = {"ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_testcapi",
               "_testinternalcapi", "_testmultiphase", "_posixshmem", "_dbm", "_gdbm", "_sqlite3",
               "readline", "_tkinter", "_curses"}
    if not processes:
        MODULES |= {"_posixsubprocess", "_multiprocessing"}  # fork_exec has no audit event
        BLOCKED |= {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                    "subprocess.Popen", "pty.spawn"}

    def show(a, depth=0):  # never the object's own repr: that would run its code
        t = _type(a)
        if t is _str or t is _bytes or t is _int or t is _float or t is _bool or a is None:
            return _repr(a)[:160]
        if t is _tuple and depth < 2:
            return "(" + ", ".join([show(x, depth + 1) for x in a[:5]]) + ")"
        return "<" + name_of(t) + ">"

    def refuse(event, args):
        write(chan, ("REFUSED " + event + show(_tuple(args)) + "\n").encode("utf-8", "replace"))
        raise _PermissionError("sandbox: " + event + " is not allowed here")

    def mode_of(p, follow):
        try:
            return item(stat(p) if follow else lstat(p), 0) & 0o170000
        except OSError:
            return None

    def resolve(p):
        """realpath: symlinks resolved, relative to the cwd; None on a symlink loop."""
        if p[:1] != "/":
            p = getcwd() + "/" + p
        todo, done, links = p.split("/")[::-1], "", 0
        while todo:
            x = todo.pop()
            if x in ("", "."):
                continue
            if x == "..":
                done = done.rpartition("/")[0]
                continue
            cand = done + "/" + x
            if mode_of(cand, False) == 0o120000:
                links += 1
                if links > 40:
                    return None
                target = readlink(cand)
                if target[:1] == "/":
                    done = ""
                todo.extend(target.split("/")[::-1])
                continue
            done = cand
        return done or "/"

    def where(p):
        """The real path a path argument names, or None when it cannot be told without running
        the program's own code (a custom os.PathLike)."""
        t = _type(p)
        if t is _int:  # a file descriptor: what it is open on
            try:
                return readlink("/proc/self/fd/%d" % p)
            except OSError:
                return None
        if t in path_types and t.__fspath__ is fspath_fn and t.__str__ is str_fn:
            p = str_fn(p)
        elif t is _bytes:
            p = p.decode("utf-8", "surrogateescape")
        elif t is not _str:
            return None
        return resolve(p)

    def inside(p):
        rp = where(p)
        return rp is not None and (rp + "/").startswith(prefix)

    def hook(event, args):
        if event == "open":
            p, flags = args[0], args[2]
            if _type(p) is _int:
                return  # wraps a descriptor already open: decided when it was opened
            rp = where(p)
            if rp is None:
                refuse(event, args)
            ours = (rp + "/").startswith(prefix)
            # os.open (mode None) of a directory: its descriptor would let dir_fd= paths escape the
            # checks below. open() refuses directories itself; an opener= raises its own event.
            if args[1] is None and mode_of(rp, True) == 0o040000 and not (
                    TMPFILE and flags & TMPFILE == TMPFILE and ours):
                refuse(event, args)
            if flags & WRITE and not ours and rp not in WRITABLE:
                refuse(event, args)
        elif event in PATHS:
            paths, dirfds = PATHS[event]
            if _any([args[i] not in (None, -1) for i in dirfds]) or not _all([inside(args[i]) for i in paths]):
                refuse(event, args)
        elif event in BLOCKED or event.startswith(PREFIXES):
            refuse(event, args)
        elif event == "import" and _type(args[0]) is _str and args[0].partition(".")[0] in MODULES:
            refuse(event, args)
        elif event == "os.kill" and not processes and args[0] != getpid():
            refuse(event, args)

    sys.addaudithook(hook)

def _describe(e):
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "program.py":
            line = tb.tb_lineno
        tb = tb.tb_next
    try:
        msg = str(e)[:300]
    except BaseException:
        msg = "?"
    where = " (program.py line %d)" % line if line else ""
    return type(e).__name__ + where + (": " + msg if msg else "")

def _main():
    root, chan = sys.argv[1], int(sys.argv[2])
    mem_mb, cpu_s, file_mb, nproc, processes = (int(x) for x in sys.argv[3:8])
    _limits(mem_mb, cpu_s, file_mb, nproc)
    token, _, source = sys.stdin.buffer.read().partition(b"\n")
    token = token.decode()
    _guard(root, chan, processes == 1)
    write = os.write  # the program may replace os.write; not this

    def report(kind, text):
        write(chan, (kind + " " + text.replace("\n", "\\n") + "\n").encode("utf-8", "replace"))

    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except MemoryError:
        report("MEMORY", "")
    except OSError as e:  # EFBIG: Python ignores SIGXFSZ, so RLIMIT_FSIZE shows up as this error
        report("FSIZE" if e.errno == 27 else "FAIL", _describe(e))
    except BaseException as e:  # SystemExit too: a program that exits did not finish its test
        report("FAIL", _describe(e))
    else:
        report("PASS", token)
    os._exit(0)  # no atexit handlers or finalizers of the program

_main()
'''


# ----------------------------------------------------------------------------- isolation

_PROBE = ("import os,sys;n=[l.split(':')[0].strip() for l in open('/proc/self/net/dev').read().splitlines()[2:]];"
          "print(os.getuid(),'%d.%d.%d'%sys.version_info[:3],','.join(n))")
_iso_lock = threading.Lock()
_iso: dict | None = None


def _interpreters() -> list[str]:
    """This interpreter, then same-version ones in /usr/bin and /usr/local/bin (nobody may not be
    able to read a venv's interpreter under a home directory)."""
    v = f"{sys.version_info[0]}.{sys.version_info[1]}"
    out = [sys.executable]
    for p in (f"/usr/bin/python{v}", f"/usr/local/bin/python{v}"):
        if os.path.isfile(p) and os.path.realpath(p) != os.path.realpath(sys.executable):
            out.append(p)
    return out


def _candidates() -> list[dict]:
    """Isolation modes, strongest first; the first whose probe succeeds is used."""
    root = os.geteuid() == 0
    out = []
    if root:  # namespaces and a uid of its own: the kernel refuses writes to the machine's files
        ids = ("--setuid", str(NOBODY), "--setgid", str(NOBODY))
        out += [{"mode": "network + PID namespaces, uid 65534", "command": [*UNSHARE_NET_PID, *ids, *PID1],
                 "python": py, "uid": NOBODY, "net": True, "pid": True, "user": False} for py in _interpreters()]
    out.append({"mode": "user + network + PID namespaces", "command": [*UNSHARE_NET_PID[:1], *USERNS,
                *UNSHARE_NET_PID[1:], *PID1], "python": sys.executable, "uid": 0, "net": True, "pid": True,
                "user": True})
    if root:
        out.append({"mode": "network + PID namespaces", "command": [*UNSHARE_NET_PID, *PID1],
                    "python": sys.executable, "uid": 0, "net": True, "pid": True, "user": False})
    out.append({"mode": "user + network namespaces", "command": ["unshare", *USERNS, "--net"],
                "python": sys.executable, "uid": 0, "net": True, "pid": False, "user": True})
    return out


def _probe(c: dict) -> str | None:
    """None when the mode works here (right uid, same Python, no interface but loopback), else why not."""
    if not shutil.which(c["command"][0]):
        return f"{c['command'][0]} not found"
    try:
        r = subprocess.run([*c["command"], c["python"], *PY_FLAGS, "-c", _PROBE], capture_output=True,
                           text=True, timeout=20, cwd="/", env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1][:200]
    parts = r.stdout.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return f"unexpected probe output {r.stdout[:100]!r}"
    uid, version, nics = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
    ours = "%d.%d" % sys.version_info[:2]
    if version.rsplit(".", 1)[0] != ours:
        return f"{c['python']} is Python {version}, not {ours}"
    if int(uid) != c["uid"]:
        return f"runs as uid {uid}, not {c['uid']}"
    if c["net"] and set(filter(None, nics.split(","))) - {"lo"}:
        return f"network interfaces {nics} visible"
    c["python_version"] = version
    return None


def isolation() -> dict:
    """How programs are isolated on this machine: detected once per process, strongest first."""
    global _iso
    with _iso_lock:
        if _iso is None:
            rejected = []
            for c in _candidates():
                why = _probe(c)
                if why is None:
                    _iso = _record(c, rejected)
                    break
                rejected.append({"mode": c["mode"], "python": c["python"], "reason": why})
            else:
                _iso = hook_only(rejected)
        return dict(_iso)


def hook_only(rejected: list[dict] | None = None) -> dict:
    """The weakest mode, the audit hook alone (and the rlimits): where no namespace can be made."""
    return _record({"mode": "audit hook only", "command": [], "python": sys.executable,
                    "python_version": "%d.%d.%d" % sys.version_info[:3], "uid": os.geteuid(),
                    "net": False, "pid": False, "user": False}, rejected or [])


def _record(c: dict, rejected: list[dict]) -> dict:
    return {"mode": c["mode"], "command": c["command"], "python": c["python"],
            "python_version": c["python_version"], "uid": c["uid"], "network_namespace": c["net"],
            "pid_namespace": c["pid"], "user_namespace": c["user"], "audit_hook": True,
            # a uid of its own (nobody, set by unshare as root): its directory is chowned to it,
            # and RLIMIT_NPROC counts only the runs' processes
            "own_uid": bool(c["command"]) and c["uid"] == NOBODY and not c["user"], "rejected": rejected}


def describe(limits: Limits) -> dict:
    """The sandbox part of a task's protocol."""
    return {"isolation": isolation(), "limits": limits.record()}


# ----------------------------------------------------------------------------- one run

def _wait(pid: int, timeout: float) -> bool:
    """Wait for the child to end without reaping it (its pid, the group id, stays taken until
    the group is killed); False at the time limit."""
    end, delay = time.monotonic() + timeout, 0.002
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signal_of(rc: int, wrapped: bool) -> int | None:
    if rc < 0:
        return -rc
    return rc - 128 if wrapped and rc > 128 else None


def _tail(path: Path, n: int = 600) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode("utf-8", "replace").strip()


def _verdict(channel: str, token: str, rc: int, timed_out: bool, limits: Limits, wrapped: bool,
             stderr: str) -> tuple[str, str]:
    lines = channel.splitlines()
    refused = [x[len("REFUSED "):] for x in lines if x.startswith("REFUSED ")]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        return "error", f"refused by the sandbox: {refused[0]}{more}"
    if f"PASS {token}" in lines:
        return "passed", ""
    if timed_out:
        return "timeout", (f"still running after {limits.timeout_s:g} s (wall clock); every process of the "
                           f"run was killed")
    sig = _signal_of(rc, wrapped)
    if sig == signal.SIGXCPU:
        return "timeout", f"CPU time limit ({limits.cpu_s} s) exceeded"
    if "MEMORY " in lines:
        return "error", f"memory limit ({limits.memory_mb} MB) exceeded: MemoryError"
    if any(x.startswith("FSIZE ") for x in lines) or sig == signal.SIGXFSZ:
        return "error", f"file size limit ({limits.file_mb} MB) exceeded"
    fails = [x[len("FAIL "):] for x in lines if x.startswith("FAIL ")]
    if fails:
        return "failed", fails[-1]
    what = f"killed by {signal.Signals(sig).name}" if sig in signal.valid_signals() else f"exit code {rc}"
    return "error", f"ended ({what}) before reporting a result" + (f"; stderr: {stderr[-300:]}" if stderr else "")


def run(program: str, limits: Limits = Limits(), iso: dict | None = None) -> dict:
    """Run one program (Python source) in the sandbox: {status, detail, seconds}. `iso`: an
    isolation record (default: this machine's strongest, isolation())."""
    iso = iso or isolation()
    wrapped = iso["pid_namespace"]
    t0 = time.monotonic()
    box = tempfile.mkdtemp(prefix="forgelab-sandbox-")       # the program's cwd, HOME and TMPDIR
    private = tempfile.mkdtemp(prefix="forgelab-sandbox-io-")  # its output files: never its to open
    try:
        if iso["own_uid"]:
            os.chown(box, iso["uid"], iso["uid"])
        chan = os.open(os.path.join(private, "channel"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        token = secrets.token_hex(16)
        nproc = (64 if limits.processes else 1) if iso["own_uid"] else 0
        cmd = [*iso["command"], iso["python"], *PY_FLAGS, "-c", BOOTSTRAP, box, str(chan), str(limits.memory_mb),
               str(limits.cpu_s), str(limits.file_mb), str(nproc), str(int(limits.processes))]
        env = {"PATH": "/usr/bin:/bin", "HOME": box, "TMPDIR": box, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": str(limits.hash_seed), "PYTHONIOENCODING": "utf-8"}
        with open(os.path.join(private, "stdout"), "wb") as out, open(os.path.join(private, "stderr"), "wb") as err:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=box, env=env,
                                        start_new_session=True, pass_fds=(chan,))
            finally:
                os.close(chan)
            try:
                try:
                    proc.stdin.write(token.encode() + b"\n" + program.encode("utf-8", "surrogatepass"))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                finished = _wait(proc.pid, limits.timeout_s)
            finally:  # whatever happened: nothing of the run survives it
                _kill_group(proc.pid)
                proc.wait()
        channel = Path(private, "channel").read_text("utf-8", "replace")
        status, detail = _verdict(channel, token, proc.returncode, not finished, limits, wrapped,
                                  _tail(Path(private, "stderr")))
    finally:
        shutil.rmtree(box, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    return {"status": status, "detail": detail, "seconds": round(time.monotonic() - t0, 3)}


def run_many(programs: list[str], limits: Limits = Limits(), workers: int = 2, desc: str = "sandbox") -> list[dict]:
    """Run programs a few at a time (each in its own sandbox); results in the programs' order."""
    isolation()  # detect once, before the pool
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(programs), desc=desc, unit="program") as bar:
        futures = {pool.submit(run, p, limits): i for i, p in enumerate(programs)}
        out: list[dict] = [{}] * len(programs)
        for f in as_completed(futures):
            out[futures[f]] = f.result()
            bar.update(1)
    return out
