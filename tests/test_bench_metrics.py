"""Benchmark building blocks without a server: metric definitions, arrival process, workloads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from forgelab import config as cfg
from forgelab.serve.bench import (BenchError, RequestResult, arrival_offsets, build_requests,
                                  request_extras, summarize, to_messages)
from forgelab.serve.bench_config import BenchServingConfig


def conf(**kw) -> BenchServingConfig:
    return cfg.build(BenchServingConfig, kw)


def test_metric_definitions():
    # Request 0: sent at 0, text chunks at 0.10, 0.15, 0.25, 0.30 s, stream over at 0.30 s,
    # usage says 5 output tokens (one chunk carried two).
    r0 = RequestResult(0, ok=True, start=0.0, ttft=0.10, latency=0.30, itl=[0.05, 0.10, 0.05],
                       prompt_tokens=20, output_tokens=5)
    # Request 1: one output token: TTFT and E2EL, no TPOT, no ITL.
    r1 = RequestResult(1, ok=True, start=0.05, ttft=0.40, latency=0.45, prompt_tokens=10, output_tokens=1)
    r2 = RequestResult(2, ok=False, error_kind="http_500", error="boom", start=0.1, latency=0.01)
    r3 = RequestResult(3, ok=False, error_kind="connection", error="refused", start=0.2, latency=0.001)
    s = summarize([r0, r1, r2, r3], duration=2.0, conf=conf(slo={"ttft": 200, "tpot": 60},
                                                           percentiles=[50, 90]))
    assert (s["completed"], s["failed"]) == (2, 2)
    assert s["failures_by_kind"] == {"http_500": 1, "connection": 1}
    assert s["first_errors"] == {"http_500": "boom", "connection": "refused"}
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 6
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.0)
    assert s["total_token_throughput"] == pytest.approx(18.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(250.0) and s["ttft_ms"]["count"] == 2
    assert s["tpot_ms"]["count"] == 1 and s["tpot_ms"]["mean"] == pytest.approx((300 - 100) / 4)
    assert s["itl_ms"]["count"] == 3 and s["itl_ms"]["median"] == pytest.approx(50.0)
    assert s["e2el_ms"]["max"] == pytest.approx(450.0)
    assert s["ttft_ms"]["p90"] == pytest.approx(np.percentile([100, 400], 90))
    # r0: ttft 100 <= 200, tpot 50 <= 60 -> good; r1: ttft 400 > 200 -> not good.
    assert s["good_requests"] == 1 and s["goodput"] == pytest.approx(0.5)
    assert s["peak_concurrency"] == 3  # r0, r1 and r2 overlap at t=0.1


@pytest.mark.parametrize("burstiness,cv", [(1.0, 1.0), (4.0, 0.5), (0.25, 2.0)])
def test_gamma_arrivals(burstiness, cv):
    off = arrival_offsets(40_000, rate=20.0, burstiness=burstiness, rng=np.random.default_rng(0))
    gaps = np.diff(off)
    assert off[0] == 0.0
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.03)           # the asked-for rate
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)    # 1/sqrt(shape)
    assert not arrival_offsets(5, float("inf"), 1.0, np.random.default_rng(0)).any()


def test_request_profiles_send_only_accepted_fields():
    c = conf()
    assert request_extras("transformers", c) == {}
    assert request_extras("vllm", c) == {"stream_options": {"include_usage": True}, "ignore_eos": True}
    assert request_extras("openai", c) == {"stream_options": {"include_usage": True}}


def test_config_validation():
    with pytest.raises(cfg.ConfigError, match="request_rate"):
        conf(request_rate="fast")
    with pytest.raises(cfg.ConfigError, match="slo.itl"):
        conf(slo={"itl": 5})
    with pytest.raises(cfg.ConfigError, match="conversations.path"):
        conf(workload="conversations")
    assert conf(request_rate=4).rate() == 4.0 and conf().unlimited_rate


def test_random_workload_uses_real_tokens(smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    c = conf(random={"input_len": 100, "output_len": 20, "range_ratio": 0.5}, num_prompts=30,
             warmup_requests=2, seed=3)
    reqs = build_requests(tok, c)
    assert len(reqs) == 32
    lens = [len(tok.encode(r.messages[0]["content"], add_special_tokens=False)) for r in reqs]
    assert all(50 <= n <= 150 for n in lens), lens
    assert abs(np.mean(lens) - 100) < 10 and max(lens) - min(lens) > 40  # uniform in [50, 150]
    assert all(10 <= r.max_tokens <= 30 for r in reqs) and len({r.max_tokens for r in reqs}) > 3
    special = set(tok.all_special_ids)
    assert not any(set(tok.encode(r.messages[0]["content"], add_special_tokens=False)) & special
                   for r in reqs)
    # prompt_len is what the chat template makes of it (SmolLM2 adds its default system turn)
    assert all(r.prompt_len > n for r, n in zip(reqs, lens))
    assert [r.messages for r in build_requests(tok, c)] == [r.messages for r in reqs]  # seeded


def test_conversation_workload_from_gsm8k_and_sharegpt(smollm2_dir, gsm8k_train, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [json.loads(line) for line in gsm8k_train.read_text().splitlines()[:40]]
    msgs = tmp_path / "sft.jsonl"
    msgs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                                     {"role": "assistant", "content": r["answer"]}]}) + "\n"
                            for r in rows) + "not json\n")
    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": r["question"]},
                                                    {"from": "gpt", "value": r["answer"]}]} for r in rows]))
    for path in (msgs, share):
        c = conf(workload="conversations", conversations={"path": str(path), "max_output_tokens": 64},
                 num_prompts=10, warmup_requests=0)
        reqs = build_requests(tok, c)
        assert len(reqs) == 10
        by_q = {r["question"]: r["answer"] for r in rows}
        for r in reqs:
            assert [m["role"] for m in r.messages] == ["user"]
            ref = len(tok.encode(by_q[r.messages[0]["content"]], add_special_tokens=False))
            assert r.max_tokens == min(ref, 64)
    fixed = build_requests(tok, conf(workload="conversations", num_prompts=5, warmup_requests=0,
                                     conversations={"path": str(msgs), "fixed_output_tokens": 16}))
    assert [r.max_tokens for r in fixed] == [16] * 5
    assert to_messages({"conversations": [{"from": "function", "value": "x"}]}) is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no conversation"}\n')
    with pytest.raises(BenchError, match="no usable conversation"):
        build_requests(tok, conf(workload="conversations", conversations={"path": str(empty)}))


def test_report_files_plots_and_comparison_without_a_server(tmp_path):
    """The report writer on recorded results: report.md/.json with bench_*.png beside them in a
    run directory, <stem>.md/.json/<stem>_*.png elsewhere, and the comparison of two runs."""
    from forgelab.serve.bench_report import compare, markdown, plots, write_report
    c = conf(num_prompts=3, warmup_requests=0, slo={"ttft": 200})
    results = [RequestResult(i, ok=True, start=0.1 * i, ttft=0.1, latency=0.3, itl=[0.05, 0.1],
                             prompt_tokens=8, output_tokens=3, tokens_from="usage",
                             chunk_times=[0.1 * i + 0.1, 0.1 * i + 0.2, 0.1 * i + 0.3]) for i in range(3)]
    summary = summarize(results, duration=1.0, conf=c) | {
        "notes": [], "server_alive_after_run": True, "request_profile": "openai", "request_extras": {},
        "concurrency_limit": 3, "not_sent": 0}
    context = {"title": "unit", "date": "2025-01-01T00:00:00", "command": "python x.py",
               "server": {"url": "http://127.0.0.1:1", "backend": "vllm"}, "device": {"cpu_count": 2},
               "load_average_1m": {"before": 0.1, "after": 0.2}}
    report = {"context": context, "config": cfg.to_dict(c), "summary": summary}
    pngs = plots(results, summary)
    assert set(pngs) == {"latency", "throughput"} and all(p.startswith(b"\x89PNG") for p in pngs.values())
    assert plots([RequestResult(0, ok=False)], summary) == {}
    runs = []
    for name in ("a", "b"):
        d = tmp_path / name
        md = write_report(report, pngs, d, "report", img_prefix="bench")
        assert md == d / "report.md"
        assert md.read_text() == markdown(report, ["bench_latency.png", "bench_throughput.png"])
        assert "![bench_latency.png](bench_latency.png)" in md.read_text()
        assert json.loads((d / "report.json").read_text()) == json.loads(json.dumps(report))
        assert (d / "bench_latency.png").stat().st_size > 10_000 and (d / "bench_throughput.png").exists()
        (d / "bench_summary.json").write_text(json.dumps({"fingerprint": {"tokenizer_fingerprint": "t"}}))
        runs.append(d)
    assert write_report(report, pngs, tmp_path / "reports", "bench") == tmp_path / "reports" / "bench.md"
    assert (tmp_path / "reports" / "bench_throughput.png").exists()
    assert (tmp_path / "reports" / "bench.json").exists()
    md = compare(runs, tmp_path / "reports" / "cmp")
    assert (tmp_path / "reports" / "cmp.md").read_text() == md and "| vllm |" in md
    assert len(json.loads((tmp_path / "reports" / "cmp.json").read_text())["runs"]) == 2
