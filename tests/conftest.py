"""Shared fixtures: real data and the real SmolLM2 model from the default manifest (fetched
once into data/raw and model/, exactly as stage 01 does), a tiny random model that uses
SmolLM2's tokenizer and chat template for fast training/serving tests, and small training
datasets built with it (cpt_dir, sft_dir; builders in tests/helpers.py). Under CI=true a
skip that is not in ALLOWED_SKIPS fails the session (tests/test_ci_skips.py)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from forgelab import config as cfg
from forgelab.data.download import ManifestConfig, run_manifest
from forgelab.runs import PROJECT_ROOT, project_path

SHARED_GSM8K = PROJECT_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
MANIFEST = PROJECT_ROOT / "configs" / "data" / "manifest.yaml"
GSM8K_SAMPLE = PROJECT_ROOT / "tests" / "data" / "gsm8k_train_sample.jsonl"  # first 40 lines, MIT


# --- no silent skips in CI ------------------------------------------------------------------
# With CI=true in the environment, a skipped test fails the session unless its node id (or the
# id without its [params]) is listed here, each with a comment saying why it may skip. Empty:
# every test runs in CI's layout (shared data present, .venv-vllm/.venv-lmeval built by fixtures).
ALLOWED_SKIPS: tuple[str, ...] = ()
_skipped: list[tuple[str, str]] = []  # (node id, reason) of the skips this session saw


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _skip_allowed(nodeid: str) -> bool:
    return any(nodeid == a or nodeid.startswith(a + "[") for a in ALLOWED_SKIPS)


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and not _skip_allowed(report.nodeid):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    if _in_ci():
        _note_skip(report)


def pytest_collectreport(report):  # module-level pytest.skip / importorskip
    if _in_ci():
        _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.section("skipped tests under CI=true", sep="=", red=True, bold=True)
        terminalreporter.line(f"{len(_skipped)} test(s) skipped and not in tests/conftest.py ALLOWED_SKIPS; "
                              "a skip in CI fails the run:", red=True)
        for nodeid, reason in _skipped:
            terminalreporter.line(f"SKIPPED (not allowed) {nodeid}: {reason}", red=True)


@pytest.fixture(autouse=True, scope="session")
def _records_in_tmp(tmp_path_factory):
    """Run records of tests go to a temp dir, not the project's runs/ and logs/."""
    base = tmp_path_factory.mktemp("records")
    os.environ["FORGELAB_RUNS_DIR"] = str(base / "runs")
    os.environ["FORGELAB_LOGS_DIR"] = str(base / "logs")
    yield


class _Run:  # the minimal run object run_manifest needs
    def __init__(self):
        self.log = logging.getLogger("forgelab.tests")
        self.summary: dict = {}


@pytest.fixture(scope="session")
def raw_data() -> dict[str, Path]:
    """name -> path of every default manifest entry (downloaded once, verified)."""
    conf = cfg.load(ManifestConfig, [MANIFEST])
    run_manifest(conf, MANIFEST, _Run())
    root = project_path(conf.root)
    return {e.name: root / e.name / e.target_name() for e in conf.entries}


@pytest.fixture(scope="session")
def smollm2_dir(raw_data) -> Path:
    return project_path("model/smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gsm8k_train() -> Path:
    """GSM8K's train split: the shared full file where present, else the 40-line sample in
    tests/data (a fresh clone). $FORGELAB_TEST_GSM8K=<path> picks a file (e.g. the sample)."""
    if os.environ.get("FORGELAB_TEST_GSM8K"):
        return project_path(os.environ["FORGELAB_TEST_GSM8K"])
    return SHARED_GSM8K if SHARED_GSM8K.exists() else GSM8K_SAMPLE


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64, head_dim 32) with SmolLM2's tokenizer."""
    from helpers import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def cpt_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """CPT blocks (stage 04 format) of KJV verses: 160 x 64 tokens."""
    from helpers import build_cpt
    return build_cpt(tmp_path_factory.mktemp("cpt") / "train", tiny_model_dir)


@pytest.fixture(scope="session")
def sft_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A packed SFT store (stage 05 format) of 'continue the verse' chats."""
    from helpers import build_sft
    return build_sft(tmp_path_factory.mktemp("sft") / "train", tiny_model_dir)


@pytest.fixture(scope="session")
def vllm_setup(tmp_path_factory):
    """The project's own setup script for .venv-vllm (real vLLM), started in the background so a
    first-time install overlaps the transformers half of this module; instant when ready."""
    log = tmp_path_factory.mktemp("vllm-setup") / "setup.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", "scripts/setup_vllm_cpu.sh"], cwd=PROJECT_ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
    yield proc, log
    if proc.poll() is None:  # the session ended first: do not leave pip running
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="session")
def vllm_python(vllm_setup):
    proc, log = vllm_setup
    rc = proc.wait(timeout=1500)
    assert rc == 0, f"scripts/setup_vllm_cpu.sh failed:\n{log.read_text()[-4000:]}"
    return PROJECT_ROOT / ".venv-vllm" / "bin" / "python"


LLAMACPP_TESTS = ("tests/test_llamacpp.py", "tests/test_export_gate.py", "tests/test_export_gguf.py")


@pytest.fixture(scope="session")
def llamacpp_setup(tmp_path_factory):
    """scripts/setup_llamacpp.sh (builds llama.cpp once per machine, ~5 min on 2 cores; instant
    when built) in the background, niced so the tests running meanwhile keep their cores.
    Started at session start by _llamacpp_setup_early when llama.cpp tests are selected; its
    outcome only matters to tests that ask for llamacpp_bin_dir."""
    log = tmp_path_factory.mktemp("llamacpp-setup") / "setup.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["nice", "-n", "10", "bash", "scripts/setup_llamacpp.sh"], cwd=PROJECT_ROOT,
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    yield proc, log
    if proc.poll() is None:  # the session ended first: stop the build (the script removes its scratch dir)
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


@pytest.fixture(scope="session", autouse=True)
def _llamacpp_setup_early(request):
    """Start the llama.cpp build with the session's first test, so a fresh machine builds while
    the other tests run; nothing when no llama.cpp test is selected."""
    if any(item.nodeid.startswith(LLAMACPP_TESTS) for item in request.session.items):
        request.getfixturevalue("llamacpp_setup")
    yield


@pytest.fixture(scope="session")
def llamacpp_bin_dir(llamacpp_setup) -> Path:
    """The bin dir of the built llama.cpp tools (waits for the background build)."""
    from forgelab.export.llamacpp import llamacpp_bin_dir as bin_dir
    proc, log = llamacpp_setup
    rc = proc.wait(timeout=2400)
    assert rc == 0, f"scripts/setup_llamacpp.sh failed:\n{log.read_text()[-4000:]}"
    return bin_dir()


def _problems(raw_data, n: int) -> list[tuple[str, str, int]]:
    """(question, gold answer text, gold number) of the first n one-number ASDiv problems."""
    from forgelab.eval.answers import asdiv_gold
    out = []
    for line in Path(raw_data["asdiv"]).read_text().splitlines():
        r = json.loads(line)
        gold = asdiv_gold(r["answer"])
        if gold is not None and "/" not in gold and "." not in gold:
            out.append((f"{r['passage']} {r['question']}", r["answer"], int(gold)))
        if len(out) == n:
            break
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def align_data(raw_data, tmp_path_factory) -> dict[str, Path]:
    """Alignment data in TRL's schemas from 32 real ASDiv problems: pairs (gold answer vs a wrong
    number), KTO labels, GRPO prompts with the gold number (tests/test_align_*.py)."""
    d = tmp_path_factory.mktemp("align-data")
    probs = _problems(raw_data, 32)
    user = [[{"role": "user", "content": q}] for q, _, _ in probs]
    say = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    pairs = [{"prompt": u, "chosen": say(a), "rejected": say(str(g + 1 + i % 3))}
             for i, (u, (_, a, g)) in enumerate(zip(user, probs))]
    kto = [{"prompt": u, "completion": say(a if i % 2 == 0 else str(g + 2)), "label": i % 2 == 0}
           for i, (u, (_, a, g)) in enumerate(zip(user, probs))]
    prompts = [{"prompt": u, "answer": str(g)} for u, (_, _, g) in zip(user, probs)]
    return {"pref": _write(d / "pairs.jsonl", pairs), "kto": _write(d / "kto.jsonl", kto),
            "prompts": _write(d / "prompts.jsonl", prompts)}
