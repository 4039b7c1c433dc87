"""The board in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): over a fixture set of real run records, every page opened and its content checked,
a sanity run launched from the page and followed to completion on the live page, a streamed
chat answer from the embedded server, the cross-protocol refusal and the token check.
Screenshots go to test-artifacts/board/."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgelab.runs import PROJECT_ROOT, read_json
from helpers import tiny_sets, train_inproc

pytestmark = pytest.mark.slow

ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "board"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BASE, SAME, OTHER = "bench-a", "bench-b", "bench-accum2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def records(tiny_model_dir, cpt_dir, tmp_path_factory) -> Path:
    """A runs root of real records: three bench-track training runs (two of one protocol, one
    with twice the tokens per step) and an environment check."""
    root = tmp_path_factory.mktemp("board-runs")
    old = os.environ["FORGELAB_RUNS_DIR"]
    os.environ["FORGELAB_RUNS_DIR"] = str(root)
    try:
        for name, accum, seed in ((BASE, 1, 1), (SAME, 1, 2), (OTHER, 2, 1)):
            train_inproc("--config", "configs/train/cpt.yaml", "--config", "configs/train/tracks/bench.yaml",
                         *tiny_sets(tiny_model_dir, cpt_dir), "--set", "steps.max_steps=3",
                         "--set", "steps.micro_batch_size=1", "--set", f"steps.grad_accum={accum}",
                         "--set", f"seed={seed}", "--set", "metrics.steady_skip_steps=1", "--run-name", name)
    finally:
        os.environ["FORGELAB_RUNS_DIR"] = old
    env = dict(os.environ, FORGELAB_RUNS_DIR=str(root), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "scripts/00_check_env.py", "--run-name", "env-check"], cwd=PROJECT_ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert (root / "env" / "env-check" / "summary.json").is_file(), p.stderr[-2000:]
    return root


class Board:
    def __init__(self, runs_root: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = ARTIFACTS / f"board-{self.port}.log"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, FORGELAB_RUNS_DIR=str(runs_root), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "forgelab", "board", "--port", str(self.port), *args],
                                     cwd=PROJECT_ROOT, env=env, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        import urllib.request
        t0 = time.time()
        while time.time() - t0 < 120:
            if self.proc.poll() is not None:
                raise AssertionError(f"board exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"board did not answer: {self.log.read_text()[-2000:]}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def board(records):
    b = Board(records)
    yield b
    b.close()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromium-driver are needed (scripts/test.sh installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield d
    d.quit()


# ----------------------------------------------------------------------------- page helpers

def _by():
    from selenium.webdriver.common.by import By
    return By


def wait_for(fn, timeout=60.0, what="condition"):
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the page is still rendering
            last = e
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def text_of(d, elem_id: str) -> str:
    return d.find_element(_by().ID, elem_id).text


def open_board(d, url: str):
    d.get(url)
    wait_for(lambda: d.find_elements(_by().CSS_SELECTOR, "button[role=tab]"), what="the board's tabs")


def tab(d, name: str):
    btn = wait_for(lambda: [b for b in d.find_elements(_by().CSS_SELECTOR, "button[role=tab]")
                            if b.text.strip() == name], what=f"tab {name}")[0]
    btn.click()
    time.sleep(0.5)


def shot(d, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p = ARTIFACTS / f"{name}.png"
    d.save_screenshot(str(p))
    return p


def field(d, elem_id: str):
    """The input or textarea inside a Gradio component."""
    return d.find_element(_by().CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")


def set_text(d, elem_id: str, value: str):
    from selenium.webdriver.common.keys import Keys
    el = field(d, elem_id)
    el.send_keys(Keys.CONTROL, "a")  # typed over (clear() bypasses the page's input events)
    el.send_keys(Keys.DELETE)
    if value:
        el.send_keys(value)


def choose(d, elem_id: str, value: str):
    """Pick a dropdown option by its text (typing filters the options)."""
    set_text(d, elem_id, value)
    opt = wait_for(lambda: [o for o in d.find_elements(_by().CSS_SELECTOR, "[role=option]")
                            if o.text.replace("✓", "").strip() == value], what=f"option {value} in #{elem_id}")[0]
    opt.click()
    from selenium.webdriver.common.keys import Keys
    field(d, elem_id).send_keys(Keys.ESCAPE)  # a multiselect keeps its list open
    time.sleep(0.3)


def click(d, elem_id: str):
    d.find_element(_by().ID, elem_id).click()


def image_loaded(d, css: str) -> bool:
    imgs = d.find_elements(_by().CSS_SELECTOR, css)
    return bool(imgs) and all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                              for i in imgs)


# ----------------------------------------------------------------------------- the pages

def test_runs_page_lists_every_record_and_filters(board, browser, records):
    d = browser
    open_board(d, board.url)
    table = wait_for(lambda: text_of(d, "runs-table") if BASE in text_of(d, "runs-table") else None,
                     what="the runs table")
    for name in (BASE, SAME, OTHER, "env-check"):
        assert name in table
    s = read_json(records / "train" / BASE / "train_summary.json")
    assert s["fingerprint"]["config_hash"] in table and s["fingerprint"]["data_fingerprint"] in table
    assert "4 runs" in text_of(d, "runs-count")
    shot(d, "runs")
    set_text(d, "runs-text", "accum2")
    from selenium.webdriver.common.keys import Keys
    field(d, "runs-text").send_keys(Keys.ENTER)
    wait_for(lambda: "1 runs" in text_of(d, "runs-count"), what="the filtered count")
    # whole cells: BASE is a prefix of OTHER's name
    wait_for(lambda: (lambda names: OTHER in names and BASE not in names)(
        {c.text.strip() for c in d.find_elements(_by().CSS_SELECTOR, "#runs-table [role=gridcell]")}),
        what="the filtered table")
    set_text(d, "runs-text", "")
    field(d, "runs-text").send_keys(Keys.ENTER)
    wait_for(lambda: "4 runs" in text_of(d, "runs-count"), what="the unfiltered count")


def test_run_detail_shows_config_summary_log_and_curves(board, browser, records):
    d = browser
    open_board(d, board.url)
    wait_for(lambda: BASE in text_of(d, "runs-table"), what="the runs table")
    cell = wait_for(lambda: [c for c in d.find_elements(_by().CSS_SELECTOR, "#runs-table [role=gridcell]")
                             if c.text.strip() == BASE], what="the run's row")[0]
    cell.click()  # a row opens the run on the detail page
    wait_for(lambda: f"train/{BASE}" in text_of(d, "detail-header"), what="the detail header")
    s = read_json(records / "train" / BASE / "train_summary.json")
    assert s["fingerprint"]["config_hash"] in text_of(d, "detail-header")
    wait_for(lambda: f"run_name: {BASE}" in text_of(d, "detail-config"), what="the resolved config")
    assert '"track": "bench"' in text_of(d, "detail-summary")
    assert "run train/" in text_of(d, "detail-log")
    wait_for(lambda: image_loaded(d, "#detail-plot img"), what="the curves")
    shot(d, "detail")


def test_compare_refuses_mixed_protocols_unless_asked(board, browser):
    d = browser
    open_board(d, board.url)
    tab(d, "Compare")
    choose(d, "compare-runs", f"train/{BASE}")
    choose(d, "compare-runs", f"train/{SAME}")
    click(d, "compare-go")
    wait_for(lambda: "2 runs, one protocol" in text_of(d, "compare-message"), what="a same-protocol comparison")
    wait_for(lambda: image_loaded(d, "#compare-plot img"), what="the overlaid curves")
    choose(d, "compare-runs", f"train/{OTHER}")
    click(d, "compare-go")
    msg = wait_for(lambda: text_of(d, "compare-message") if "Refused" in text_of(d, "compare-message") else None,
                   what="the refusal")
    assert "tokens_per_step differs" in msg and OTHER in msg
    assert not d.find_elements(_by().CSS_SELECTOR, "#compare-plot img")
    shot(d, "compare-refused")
    click(d, "compare-mixed")
    click(d, "compare-go")
    wait_for(lambda: "compared as asked" in text_of(d, "compare-message"), what="the allowed comparison")
    assert "tokens_per_step differs" in text_of(d, "compare-message")
    wait_for(lambda: image_loaded(d, "#compare-plot img"), what="the overlaid curves")
    shot(d, "compare")


def test_reports_render_with_their_images(board, browser):
    d = browser
    open_board(d, board.url)
    tab(d, "Reports")
    choose(d, "reports-pick", "serving_benchmark.md")
    wait_for(lambda: "serving" in text_of(d, "report-body").lower(), what="the report text")
    wait_for(lambda: len(d.find_elements(_by().CSS_SELECTOR, "#report-body img")) >= 2 and
             image_loaded(d, "#report-body img"), what="the report's images")
    assert d.find_elements(_by().CSS_SELECTOR, "#report-body table")
    shot(d, "reports")


def test_launch_checks_then_runs_a_sanity_run_followed_live(board, browser, records, tiny_model_dir, cpt_dir):
    d = browser
    open_board(d, board.url)
    tab(d, "Launch")
    sets = tiny_sets(tiny_model_dir, cpt_dir)
    over = [sets[i + 1] for i in range(0, len(sets), 2)] + ["steps.max_steps=4", "steps.micro_batch_size=1"]
    set_text(d, "launch-overrides", "\n".join(over + ["steps.max_stpes=4"]))
    set_text(d, "launch-name", "from-board")
    click(d, "launch-check")
    err = wait_for(lambda: text_of(d, "launch-status") if "Not started" in text_of(d, "launch-status") else None,
                   what="the config error")
    assert "unknown key 'steps.max_stpes'" in err and "did you mean" in err
    shot(d, "launch-error")
    click(d, "launch-start")  # refused too: nothing starts
    time.sleep(2)
    assert not (records / "train" / "from-board").exists()
    set_text(d, "launch-overrides", "\n".join(over))
    click(d, "launch-check")
    wait_for(lambda: "Config OK" in text_of(d, "launch-status"), what="the check")
    click(d, "launch-start")
    wait_for(lambda: "Started" in text_of(d, "launch-status"), what="the start")
    wait_for(lambda: "train/from-board" in text_of(d, "launch-log"), what="the launch's output")
    tab(d, "Live")
    status = wait_for(lambda: text_of(d, "live-status") if "ok" in text_of(d, "live-status").split("·")[0] else None,
                      timeout=240, what="the run to finish on the live page")
    assert "train/from-board" in status and "step 4 of 4" in status
    wait_for(lambda: image_loaded(d, "#live-plot img"), what="the live curves")
    shot(d, "live")
    s = read_json(records / "train" / "from-board" / "train_summary.json")
    assert s["outcome"] == "ok" and s["steps"] == 4
    assert "started from the board" in s["command"]
    launches = list((records / ".board" / "launches").glob("*-train-from-board/launch.json"))
    assert len(launches) == 1 and read_json(launches[0])["run"] == "train/from-board"


def test_chat_streams_from_the_embedded_server(board, browser, records):
    d = browser
    open_board(d, board.url)
    tab(d, "Chat")
    click(d, "chat-start")
    wait_for(lambda: "started" in text_of(d, "chat-info") and "board-chat" in text_of(d, "chat-info"),
             timeout=400, what="the embedded server")
    try:
        wait_for(lambda: "default system prompt" in text_of(d, "chat-info") or
                 "no default system prompt" in text_of(d, "chat-info"), timeout=60, what="the template info")
        assert "SmolLM" in text_of(d, "chat-info")  # SmolLM2's template names itself in its default prompt
        set_text(d, "chat-message", "Name three colors.")
        click(d, "chat-send")
        seen = set()
        t0 = time.time()
        while time.time() - t0 < 180:
            bots = d.find_elements(_by().CSS_SELECTOR, "#chat-bot .bot, #chat-bot [data-testid=bot]")
            if bots:
                seen.add(bots[-1].text.strip())
            if len(seen) > 2 and time.time() - t0 > 3 and bots and bots[-1].text.strip() == max(seen, key=len):
                break
            time.sleep(0.1)
        final = bots[-1].text.strip() if bots else ""
        assert final, "no answer appeared"
        partial = [s for s in seen if s and s != final and final.startswith(s)]
        assert partial, f"the answer did not stream: only {sorted(seen)} seen"  # shown growing, not at once
        d.find_element(_by().CSS_SELECTOR, "#chat-template-box button").click()  # open the accordion
        prompt = wait_for(lambda: d.find_element(_by().ID, "chat-prompt").get_attribute("textContent"),
                          what="the rendered prompt")
        assert "{%" in d.find_element(_by().ID, "chat-template").get_attribute("textContent")
        # what the model saw (the code view's lines, joined): the default system turn, then ours
        assert "You are a helpful AI assistant named SmolLM" in prompt
        assert "<|im_start|>userName three colors.<|im_end|><|im_start|>assistant" in prompt
        shot(d, "chat")
    finally:
        from forgelab.serve import server
        os.environ["FORGELAB_RUNS_DIR"], old = str(records), os.environ["FORGELAB_RUNS_DIR"]
        try:
            server.stop("board-chat")
        finally:
            os.environ["FORGELAB_RUNS_DIR"] = old


def test_non_loopback_needs_a_token_and_the_login_checks_it(records, browser):
    p = subprocess.run([sys.executable, "-m", "forgelab", "board", "--host", "0.0.0.0", "--port", str(_free_port())],
                       cwd=PROJECT_ROOT, env=dict(os.environ, FORGELAB_BOARD_TOKEN=""), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "no token is set" in p.stderr
    b = Board(records, "--host", "0.0.0.0", "--token", "s3cret")
    try:
        d = browser
        d.get(b.url)
        wait_for(lambda: d.find_elements(_by().CSS_SELECTOR, "input[type=password]"), what="the login form")
        assert not d.find_elements(_by().CSS_SELECTOR, "#runs-table")

        def login(token):
            user = d.find_element(_by().CSS_SELECTOR, "input[type=text], input:not([type])")
            user.clear()
            user.send_keys("forgelab")
            pw = d.find_element(_by().CSS_SELECTOR, "input[type=password]")
            pw.clear()
            pw.send_keys(token)
            d.find_element(_by().CSS_SELECTOR, "button").click()
        login("wrong")
        wait_for(lambda: "incorrect" in d.page_source.lower() or "error" in d.page_source.lower(),
                 what="the refusal of a wrong token")
        assert not d.find_elements(_by().CSS_SELECTOR, "#runs-table")
        shot(d, "login-refused")
        d.get(b.url)
        wait_for(lambda: d.find_elements(_by().CSS_SELECTOR, "input[type=password]"), what="the login form")
        login("s3cret")
        wait_for(lambda: BASE in text_of(d, "runs-table"), what="the board after login")
    finally:
        b.close()


def test_a_launch_outlives_the_board_and_stops_with_a_checkpoint(records, browser, tiny_model_dir, cpt_dir):
    """Started from one board, the run keeps training when that board is killed; a new board
    finds the launch again, and Stop ends it through SIGTERM with a checkpoint saved."""
    d = browser
    first = Board(records)
    try:
        open_board(d, first.url)
        tab(d, "Launch")
        sets = tiny_sets(tiny_model_dir, cpt_dir)
        over = [sets[i + 1] for i in range(0, len(sets), 2)] + [
            "steps.max_steps=100000", "steps.micro_batch_size=1", "checkpoint.every_steps=0"]
        set_text(d, "launch-overrides", "\n".join(over))
        set_text(d, "launch-name", "outlives")
        click(d, "launch-start")
        wait_for(lambda: "Started" in text_of(d, "launch-status"), what="the start")
    finally:
        os.killpg(first.proc.pid, 9)  # the board dies hard; its launch must not
        first.proc.wait(10)
    run = records / "train" / "outlives"
    (rec_path,) = (records / ".board" / "launches").glob("*-train-outlives/launch.json")
    pid = read_json(rec_path)["pid"]
    n0 = len(metrics_lines(run))
    wait_for(lambda: len(metrics_lines(run)) > n0 + 3, timeout=120, what="training to go on without the board")
    os.kill(pid, 0)  # still there
    second = Board(records)
    try:
        open_board(d, second.url)
        tab(d, "Launch")
        choose(d, "launch-pick", rec_path.parent.name)
        wait_for(lambda: "[running] train/outlives" in text_of(d, "launch-log"), what="the launch found again")
        click(d, "launch-stop")
        wait_for(lambda: "SIGTERM sent" in text_of(d, "launch-status"), what="the stop")
        wait_for(lambda: "[ended] train/outlives" in text_of(d, "launch-log"), timeout=180, what="the run to end")
        shot(d, "launch-stopped")
    finally:
        second.close()
    s = read_json(run / "train_summary.json")
    assert s["outcome"] == "interrupted" and s["stopped_early"]
    assert s["checkpoints"], "the stop saved no checkpoint"
    assert any((run / c).is_dir() for c in os.listdir(run) if c.startswith("checkpoint-"))


def metrics_lines(run: Path) -> list[str]:
    p = run / "metrics.jsonl"
    return p.read_text().splitlines() if p.is_file() else []
