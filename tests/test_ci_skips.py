"""tests/conftest.py's CI guard: with CI=true a skip that is not in ALLOWED_SKIPS fails the
session and is listed; allowed skips, xfails and runs outside CI pass as before."""
import os
import subprocess
import sys

from forgelab.runs import PROJECT_ROOT

SKIPS = '''
import pytest
import conftest

conftest.ALLOWED_SKIPS = ("test_skips.py::test_allowed", "test_skips.py::test_allowed_param")


def test_ok():
    pass


def test_skipped_in_the_body():
    pytest.skip("no such thing here")


@pytest.mark.skipif(True, reason="a marker skip")
def test_skipped_by_a_marker():
    pass


def test_allowed():
    pytest.skip("allowed")


@pytest.mark.parametrize("x", [1, 2])
def test_allowed_param(x):
    pytest.skip("allowed too")


@pytest.mark.xfail(reason="expected", strict=True)
def test_xfail():
    assert False
'''
MODULE_SKIP = 'import pytest\npytest.skip("whole module", allow_module_level=True)\n'


def pytest_in(tmp_path, *files, ci: bool) -> subprocess.CompletedProcess:
    """pytest on files of tmp_path with this repo's tests/conftest.py as a plugin."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "tests"), env.get("PYTHONPATH")]))
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "conftest", "-rs",
                           f"--basetemp={tmp_path / 'basetemp'}", *files],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_unlisted_skips_fail_the_session_under_ci(tmp_path):
    (tmp_path / "test_skips.py").write_text(SKIPS)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    files = ("test_skips.py", "test_module_skip.py")

    outside = pytest_in(tmp_path, *files, ci=False)
    assert outside.returncode == 0, outside.stdout + outside.stderr
    assert "skipped tests under CI=true" not in outside.stdout

    ci = pytest_in(tmp_path, *files, ci=True)
    out = ci.stdout
    assert ci.returncode == 1, out + ci.stderr
    assert "skipped tests under CI=true" in out and "3 test(s) skipped" in out
    listed = {line.split(": ", 1)[0].removeprefix("SKIPPED (not allowed) ")
              for line in out.splitlines() if line.startswith("SKIPPED (not allowed) ")}
    assert listed == {"test_skips.py::test_skipped_in_the_body", "test_skips.py::test_skipped_by_a_marker",
                      "test_module_skip.py"}
    assert "no such thing here" in out and "a marker skip" in out and "whole module" in out

    (tmp_path / "test_module_skip.py").unlink()
    allowed = tmp_path / "test_skips.py"
    allowed.write_text(SKIPS.replace('pytest.skip("no such thing here")', "pass")
                       .replace("skipif(True", "skipif(False"))
    ok = pytest_in(tmp_path, "test_skips.py", ci=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "3 skipped" in ok.stdout and "1 xfailed" in ok.stdout
    assert "skipped tests under CI=true" not in ok.stdout
