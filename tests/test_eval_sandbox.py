"""The sandbox of model-written code (forgelab.eval.sandbox), with real programs in real child
processes: they cannot write outside their directory, reach the network, outlive the time
limit or take the eval down with them; correct programs pass and wrong ones fail. Each
guarantee is checked with this machine's strongest isolation and with the audit hook alone
(what a machine without namespaces gets)."""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from forgelab.eval import sandbox
from forgelab.runs import PROJECT_ROOT

ISO = sandbox.isolation()
MODES = pytest.mark.parametrize("iso", [ISO, sandbox.hook_only()], ids=["strongest", "hook_only"])


def run(program: str, iso=ISO, **limits) -> dict:
    return sandbox.run(program, sandbox.Limits(**limits), iso)


@pytest.fixture
def shared_dir():
    """A directory every uid may write (the sandboxed program may run as nobody)."""
    d = tempfile.mkdtemp(prefix="forgelab-sandbox-test-")
    os.chmod(d, 0o777)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_isolation_is_detected_and_recorded():
    rec = sandbox.describe(sandbox.Limits(timeout_s=3, memory_mb=256))
    iso, lim = rec["isolation"], rec["limits"]
    assert iso["audit_hook"] and iso["mode"] and iso["python_version"].startswith("3.")
    assert iso["network_namespace"] == ("--net" in iso["command"])
    assert iso["pid_namespace"] == ("--pid" in iso["command"])
    assert lim == {"timeout_s": 3, "memory_mb": 256, "file_mb": 16, "processes": False, "hash_seed": 0, "cpu_s": 4}
    assert sandbox.isolation() == iso  # detected once


# ----------------------------------------------------------------------------- (d) outcomes

@MODES
def test_correct_program_passes_and_wrong_one_fails(iso):
    ok = run("import json, typing, collections, tempfile\nopen('notes.txt', 'w').write('x')\n"
             "assert open('notes.txt').read() == 'x'\ntempfile.TemporaryFile().write(b'x')\n"
             "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", iso)
    assert ok["status"] == "passed" and ok["detail"] == "" and ok["seconds"] < 5
    bad = run("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", iso)
    assert bad["status"] == "failed" and bad["detail"].startswith("AssertionError (program.py line 4)")
    syntax = run("def add(a, b)\n    return a\n", iso)
    assert syntax["status"] == "failed" and "SyntaxError" in syntax["detail"]


@MODES
def test_a_result_cannot_be_faked_by_exiting_or_printing(iso):
    assert run("import sys\nsys.exit(0)\n", iso)["status"] == "failed"
    assert run("import os\nos._exit(0)\n", iso)["status"] == "error"  # no report: not passed
    # the result channel is the descriptor in argv; without the run's token a PASS line is ignored
    assert run("import os, sys\nos.write(1, b'PASS 0\\n'); os.write(int(sys.argv[2]), b'PASS forged\\n')\n"
               "assert False\n", iso)["status"] == "failed"


@MODES
def test_memory_and_output_over_the_limits_are_errors(iso):
    mem = run("x = bytearray(512 << 20)\n", iso, memory_mb=128)
    assert mem["status"] == "error" and "memory limit (128 MB)" in mem["detail"]
    big = run("import sys\nfor _ in range(64):\n    sys.stdout.write('x' * (1 << 20))\n", iso, file_mb=1)
    assert big["status"] == "error" and "file size limit (1 MB)" in big["detail"]


def test_programs_run_concurrently_in_order():
    progs = [f"assert {i} % 2 == 0\n" for i in range(6)]
    t = time.time()
    res = sandbox.run_many(progs + ["import time\ntime.sleep(60)\n"], sandbox.Limits(timeout_s=1.5), workers=2)
    assert [r["status"] for r in res] == ["passed", "failed"] * 3 + ["timeout"]
    assert time.time() - t < 10


# ----------------------------------------------------------------------------- (a) files

ESCAPES = {
    "open": "open(TARGET, 'w').write('escaped')",
    "os.open": "os.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
    "pathlib": "pathlib.Path(TARGET).write_text('escaped')",
    "rename": "open('inside', 'w').write('x'); os.rename('inside', TARGET)",
    "symlink": "os.symlink(os.path.dirname(TARGET), 'link'); open(os.path.join('link', NAME), 'w')",
    "relative": "open('../' * 40 + TARGET.lstrip('/'), 'w')",
    "copy": "open('inside', 'w').write('x'); shutil.copy('inside', TARGET)",
    "dir_fd": "d = os.open(os.path.dirname(TARGET), os.O_RDONLY); os.open(NAME, os.O_WRONLY | os.O_CREAT, dir_fd=d)",
}


@MODES
@pytest.mark.parametrize("where", ["parent", "tmp", "repo"])
@pytest.mark.parametrize("how", list(ESCAPES))
def test_cannot_write_outside_its_directory(iso, where, how):
    name = f"sandbox-escape-{uuid.uuid4().hex}"
    folder = {"parent": "os.path.dirname(os.getcwd())", "tmp": repr(tempfile.gettempdir()),
              "repo": repr(str(PROJECT_ROOT))}[where]
    prog = (f"import os, pathlib, shutil\nNAME = {name!r}\nTARGET = os.path.join({folder}, NAME)\n"
            f"{ESCAPES[how]}\n")
    r = run(prog, iso)
    assert r["status"] == "error" and "refused by the sandbox" in r["detail"], r
    for d in {Path(tempfile.gettempdir()), PROJECT_ROOT}:
        assert not (d / name).exists()


# ----------------------------------------------------------------------------- (b) network

@pytest.fixture
def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def no_connection(listener) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\ns.sendall(b'hi')\n"


@MODES
def test_cannot_open_a_network_connection(iso, listener):
    port = listener.getsockname()[1]
    r = run(CONNECT.format(port=port), iso)
    assert r["status"] == "error" and "refused by the sandbox: socket." in r["detail"]
    # catching the refusal does not make it a pass
    guarded = "try:\n    " + CONNECT.format(port=port).replace("\n", "\n    ") + "\nexcept OSError:\n    pass\n"
    caught = run(guarded, iso)
    assert caught["status"] == "error"
    assert no_connection(listener)


@pytest.mark.skipif(not ISO["network_namespace"], reason="no network namespace on this machine")
def test_network_namespace_alone_has_no_route(listener):
    """Without the audit hook, the namespace by itself keeps the program off the network."""
    port = listener.getsockname()[1]
    r = subprocess.run([*ISO["command"], ISO["python"], "-c", CONNECT.format(port=port)],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode != 0 and ("Network is unreachable" in r.stderr or "Connection refused" in r.stderr)
    assert no_connection(listener)


# ----------------------------------------------------------------------------- (c) time

@MODES
@pytest.mark.parametrize("body", ["import time\ntime.sleep(3600)\n", "while True:\n    pass\n"])
def test_time_limit_ends_a_program_that_never_stops(iso, body):
    r = run(body, iso, timeout_s=1.0)
    assert r["status"] == "timeout" and 1.0 <= r["seconds"] < 2.5, r


@MODES
def test_processes_are_refused_by_default(iso, shared_dir):
    marker = shared_dir / "marker"
    for spawn in ("os.fork()", "os.system('touch " + str(marker) + "')",
                  "import subprocess; subprocess.run(['touch', " + repr(str(marker)) + "])",
                  "os.posix_spawn('/bin/touch', ['touch', " + repr(str(marker)) + "], {})"):
        r = run(f"import os\n{spawn}\n", iso)
        assert r["status"] == "error" and "refused by the sandbox" in r["detail"], (spawn, r)
    assert not marker.exists()


CHILD = """import os, time
pid = os.fork()
if pid == 0:
    os.setsid()  # leaves the process group
    os.execv('/bin/sh', ['sh', '-c', 'sleep {delay}; echo alive > {marker}'])
{then}
"""


def alive_writing(marker: Path) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if str(marker) in " ".join(p.info["cmdline"] or [])]


def check_no_survivor(iso, program: str, marker: Path, status: str) -> None:
    t = time.time()
    r = run(program, iso, timeout_s=1.0, processes=True)
    assert r["status"] == status and time.time() - t < 2.5, r
    assert not alive_writing(marker)  # nothing of the run is left ...
    time.sleep(2.5)
    assert not marker.exists()        # ... to write the marker later


@pytest.mark.skipif(not ISO["pid_namespace"], reason="no PID namespace on this machine")
@pytest.mark.parametrize("then, status", [("time.sleep(3600)", "timeout"), ("pass", "passed")])
def test_children_that_leave_the_group_do_not_outlive_the_run(shared_dir, then, status):
    """In a PID namespace the kernel ends every process of the run, setsid() or not, at the
    time limit and also when the program ends first."""
    quick = shared_dir / "quick"  # control: a child that finishes in time writes its marker, as the run's uid
    assert run(CHILD.format(delay=0, marker=quick, then="os.waitpid(pid, 0)"), processes=True)["status"] == "passed"
    assert quick.read_text() == "alive\n"
    check_no_survivor(ISO, CHILD.format(delay=2, marker=shared_dir / "late", then=then), shared_dir / "late", status)


@MODES
def test_group_kill_ends_children_at_the_time_limit(iso, shared_dir):
    """Without a PID namespace too: every process left in the run's group is killed."""
    prog = CHILD.replace("    os.setsid()  # leaves the process group\n", "")
    quick = shared_dir / "quick"
    assert run(prog.format(delay=0, marker=quick, then="os.waitpid(pid, 0)"), iso, processes=True)["status"] == "passed"
    assert quick.read_text() == "alive\n"
    check_no_survivor(iso, prog.format(delay=2, marker=shared_dir / "late", then="time.sleep(3600)"),
                      shared_dir / "late", "timeout")
