"""The alignment methods on the distributed backends (2 gloo ranks on CPU through the launcher):
DPO on ddp and ZeRO-2 and GRPO on ddp each finish the sanity track, and every step's token count
is the sum over both ranks: with the same seed the two ranks see the micro-batches a single-rank
run takes in two steps, so step k of the 2-rank run counts exactly the tokens of the single-rank
run's steps 2k-1 and 2k, and it agrees with TRL's own gathered ``num_tokens`` where TRL logs one.
ORPO on ddp too: its batches carry the prompt's mask beside the chosen/rejected ones (which hold
the prompt already), and it counts the same pairs as DPO does, not a third prompt per pair."""
from __future__ import annotations

import pytest

from forgelab.runs import read_json
from helpers import metrics, runs_dir, tiny_sets, train_cli

pytestmark = pytest.mark.slow

GRPO_SETS = ("--set", "align.max_completion_length=8")


def _sanity(backend: str, task: str, model, data, *sets: str) -> list[dict]:
    name = f"t-dist-{task}-{backend}"
    train_cli(backend, "--task", task, *tiny_sets(model, data), *sets, "--run-name", name,
              launcher="scripts/train/sanity.sh")
    run = runs_dir() / name
    s = read_json(run / "train_summary.json")
    assert s["backend"] == backend and s["world_size"] == (1 if backend == "single" else 2)
    recs = metrics(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["tokens"] == sum(r["step_tokens"] for r in recs) == s["tokens"]
    assert (run / "checkpoint-4").is_dir() and (run / "final").is_dir()
    return recs


def _summed_over_ranks(single: list[dict], dist: list[dict]) -> None:
    one = [r["step_tokens"] for r in single]
    # steps 1 and 2 of the 2-rank run are the single-rank run's micro-batches 1+2 and 3+4
    assert [r["step_tokens"] for r in dist[:2]] == [one[0] + one[1], one[2] + one[3]]
    # TRL gathers its own count over the ranks (DPO, KTO, GRPO): the lab's agrees at every step
    assert all(r["tokens"] == r.get("num_tokens", r["tokens"]) for r in dist), [
        (r["tokens"], r.get("num_tokens")) for r in dist]


@pytest.fixture(scope="module")
def dpo_single(tiny_model_dir, align_data):  # noqa: F811
    return _sanity("single", "dpo", tiny_model_dir, align_data["pref"])


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_dpo_on_distributed_backends_sums_tokens_over_ranks(tiny_model_dir, align_data, dpo_single,  # noqa: F811
                                                            backend):
    recs = _sanity(backend, "dpo", tiny_model_dir, align_data["pref"])
    _summed_over_ranks(dpo_single, recs)
    assert all(isinstance(r.get("rewards/margins"), float) for r in recs)


def test_grpo_on_ddp_sums_generated_tokens_over_ranks(tiny_model_dir, align_data):  # noqa: F811
    single = _sanity("single", "grpo", tiny_model_dir, align_data["prompts"], *GRPO_SETS)
    recs = _sanity("ddp", "grpo", tiny_model_dir, align_data["prompts"], *GRPO_SETS)
    _summed_over_ranks(single, recs)
    assert all(r["completions/mean_length"] > 0 for r in recs)


def test_orpo_on_ddp_counts_each_pair_once_summed_over_ranks(tiny_model_dir, align_data, dpo_single):  # noqa: F811
    single = _sanity("single", "orpo", tiny_model_dir, align_data["pref"])
    recs = _sanity("ddp", "orpo", tiny_model_dir, align_data["pref"])
    _summed_over_ranks(single, recs)
    # the same pairs in the same order as DPO: prompt + answer per sequence (ORPO adds one EOS to
    # each answer), not the prompt a third time
    for o, d in zip(single, dpo_single):
        assert 0 <= o["step_tokens"] - d["step_tokens"] <= 0.05 * d["step_tokens"], (o, d)
