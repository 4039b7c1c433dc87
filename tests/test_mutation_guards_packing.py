"""Packing and position ids on a real store and a tiny real model: the store round-trips and
refuses inconsistent arrays, the collator pads with restarting positions, best-fit packing
places samples deterministically, and packed samples get the logits they get alone
(scripts/mutation.py, area packing)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forgelab.data.sft_store import IGNORE_INDEX, SFTDataset, check_packed_forward, collate_sft, write_store
from forgelab.data.tokenize_sft import pack_best_fit, padding_waste
from forgelab.train.packing_check import _alone, packed_vs_alone, sample_spans

META = {"n_rows": 2, "note": "Grüße"}


def store_arrays():
    """Two rows: samples of 3 and 2 tokens packed, then one sample of 4 tokens."""
    ids = np.array([5, 6, 7, 8, 9, 10, 11, 12, 13], dtype=np.int64)
    labels = np.array([IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, 11, 12, 13])
    pos = np.array([0, 1, 2, 0, 1, 0, 1, 2, 3])
    return ids, labels, pos, np.array([0, 5, 9])


def test_a_store_round_trips_rows_as_long_tensors(tmp_path):
    d = tmp_path / "data" / "sft" / "train"
    write_store(str(d), *store_arrays(), META)
    assert (d / "meta.json").read_text(encoding="utf-8") == json.dumps(META, indent=2, ensure_ascii=False) + "\n"
    for name, dtype in (("input_ids", np.int32), ("labels", np.int32), ("position_ids", np.int32),
                        ("row_offsets", np.int64)):
        assert np.load(d / f"{name}.npy").dtype == dtype
    ds = SFTDataset(str(d))
    assert len(ds) == 2 and ds.meta == META and ds.row_length(0) == 5 and ds.row_length(1) == 4
    row = ds[0]
    assert set(row) == {"input_ids", "labels", "position_ids"} and all(v.dtype == torch.long for v in row.values())
    assert row["input_ids"].tolist() == [5, 6, 7, 8, 9] and row["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert row["labels"].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert ds[-1]["input_ids"].tolist() == [10, 11, 12, 13] and ds[-2]["input_ids"].tolist() == [5, 6, 7, 8, 9]
    for i in (2, -3):
        with pytest.raises(IndexError) as e:
            ds[i]
        assert e.value.args == (i if i >= 0 else i + 2,)
    assert isinstance(ds.arrays["input_ids"], np.memmap)  # read from disk as rows are asked for


def test_rewriting_a_store_replaces_it_and_leaves_no_temporary_dirs(tmp_path):
    d = tmp_path / "train"
    write_store(d, *store_arrays(), META)
    (d / "stale.npy").write_bytes(b"from an older layout")
    stale = tmp_path / f".train.tmp{os.getpid()}"  # left by a killed write of this process id
    stale.mkdir()
    (stale / "junk.npy").write_bytes(b"x")
    ids, labels, pos, _ = store_arrays()
    write_store(d, ids[:5], labels[:5], pos[:5], np.array([0, 5]), {"n_rows": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
    assert "stale.npy" not in {p.name for p in d.iterdir()} and len(SFTDataset(d)) == 1


def test_a_store_with_disagreeing_arrays_is_not_written(tmp_path):
    ids, labels, pos, off = store_arrays()
    with pytest.raises(ValueError) as e:
        write_store(tmp_path / "s", ids, labels[:-1], pos, off, META)
    assert str(e.value) == "store arrays disagree: 9, 8, 9 vs 9"
    with pytest.raises(ValueError):
        write_store(tmp_path / "s", ids, labels, pos[:-1], off, META)
    with pytest.raises(ValueError):
        write_store(tmp_path / "s", ids[:-1], labels, pos, off, META)
    assert not (tmp_path / "s").exists()


def test_an_incomplete_or_inconsistent_store_is_refused(tmp_path):
    d = tmp_path / "s"
    with pytest.raises(FileNotFoundError) as e:
        SFTDataset(d)
    assert str(e.value) == f"{d / 'meta.json'} not found: run scripts/05_tokenize_sft.py first"
    write_store(d, *store_arrays(), META)
    (d / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError) as e:
        SFTDataset(d)
    assert str(e.value) == f"{d / 'labels.npy'} missing: the store at {d} is incomplete"
    write_store(d, *store_arrays(), META)
    np.save(d / "position_ids.npy", np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError) as e:
        SFTDataset(d)
    assert str(e.value) == f"{d}/position_ids.npy: expected int32 [9], got int64 [9]"
    np.save(d / "position_ids.npy", np.zeros((9, 1), dtype=np.int32))
    with pytest.raises(ValueError, match=r"expected int32 \[9\], got int32 \[9, 1\]"):
        SFTDataset(d)
    np.save(d / "position_ids.npy", np.zeros(8, dtype=np.int32))
    with pytest.raises(ValueError, match=r"expected int32 \[9\], got int32 \[8\]"):
        SFTDataset(d)
    write_store(d, *store_arrays(), {"n_rows": 3})
    with pytest.raises(ValueError) as e:
        SFTDataset(d)
    assert str(e.value) == f"{d}: row_offsets has 3 entries, meta.json says n_rows=3"
    np.save(d / "row_offsets.npy", np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError) as e:
        SFTDataset(d)
    assert str(e.value) == f"{d}/input_ids.npy: expected int32 [-1], got int32 [9]"


def test_collate_pads_right_with_labels_ignored_and_positions_restarting():
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3], "position_ids": [0, 1, 0]},
            {"input_ids": [4], "labels": [4], "position_ids": [0]}]
    b = collate_sft(rows, pad_token_id=9)
    assert set(b) == {"input_ids", "labels", "position_ids"} and all(v.dtype == torch.long for v in b.values())
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    b = collate_sft(rows, pad_token_id=9, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 2]]
    assert collate_sft(rows, 9, pad_to_multiple_of=3)["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError) as e:
        collate_sft([], 9)
    assert str(e.value) == "collate_sft: empty batch"


def test_sample_spans_start_where_positions_restart():
    assert sample_spans(torch.tensor([0, 1, 2, 0, 1, 0])) == [(0, 3), (3, 5), (5, 6)]
    assert sample_spans(torch.tensor([0])) == [(0, 1)] and sample_spans(torch.tensor([], dtype=torch.long)) == []


def test_best_fit_puts_each_sample_in_the_fullest_row_it_fits():
    assert pack_best_fit([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert pack_best_fit([5, 3, 3], 8) == [[0, 1], [2]]  # an exact fit fills row 0
    assert pack_best_fit([4, 4, 2], 7) == [[0, 2], [1]]  # equal room: the first row
    assert pack_best_fit([3, 3, 3], 6) == [[0, 1], [2]]  # equal lengths: by index
    assert pack_best_fit([2, 6, 2], 8) == [[1, 0], [2]]
    assert pack_best_fit([], 8) == [] and pack_best_fit([8], 8) == [[0]]
    assert pack_best_fit([3, 1], 4) == [[0, 1]]  # one token of room is room
    with pytest.raises(ValueError) as e:
        pack_best_fit([3, 9], 8)
    assert str(e.value) == "sample 1 has 9 tokens > capacity 8"


def test_padding_waste_counts_pad_tokens_of_consecutive_batches():
    w = padding_waste([4, 2, 3, 3, 1], batch_size=2, seed=0)
    # batches [4, 2] [3, 3] [1]: 2 pad tokens of 8 + 6 + 1 slots
    assert (w["batch_size"], w["pad_tokens"], w["fraction"]) == (2, 2, round(2 / 15, 4))
    perm = np.asarray([4, 2, 3, 3, 1])[np.random.default_rng(0).permutation(5)]
    pad = sum(int(max(perm[s:s + 2]) * len(perm[s:s + 2]) - sum(perm[s:s + 2])) for s in range(0, 5, 2))
    total = sum(int(max(perm[s:s + 2]) * len(perm[s:s + 2])) for s in range(0, 5, 2))
    assert w["fraction_shuffled"] == round(pad / total, 4)
    shuffled = padding_waste([7, 1, 5, 2, 3, 6, 4], 2, 0)["fraction_shuffled"]
    assert shuffled == round(5 / 33, 4)  # the seed's order; four decimals
    assert padding_waste([3, 3, 3], 3, 1) == {"batch_size": 3, "pad_tokens": 0, "fraction": 0.0,
                                              "fraction_shuffled": 0.0}
    assert padding_waste([], 4, 0) == {"batch_size": 4, "pad_tokens": 0, "fraction": 0.0, "fraction_shuffled": 0.0}


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM(conf).eval()
    model.config.use_cache = False
    return model


def _rows():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (16,), generator=g)
    return [{"input_ids": ids[:12], "labels": ids[:12], "position_ids": torch.cat([torch.arange(5), torch.arange(7)])},
            {"input_ids": ids[12:], "labels": ids[12:], "position_ids": torch.arange(4)}]


def test_packed_samples_get_the_logits_they_get_alone(tiny_model):
    res = packed_vs_alone(tiny_model, _rows(), pad_token_id=0, device="cpu", pad_to_multiple_of=8)
    assert (res["rows"], res["samples"], res["row_lengths"]) == (2, 3, [12, 4])
    assert res["max_abs_logit_diff"] < 1e-5
    assert res["naive_packing_min_abs_logit_diff"] > 1e-3  # positions running on: the check can fail
    few = packed_vs_alone(tiny_model, _rows(), 0, "cpu", max_samples=1, pad_alone_to=16)
    assert few["samples"] == 1 and few["naive_packing_min_abs_logit_diff"] is None


def test_a_lone_sample_padded_on_the_right_keeps_its_logits(tiny_model):
    ids = _rows()[0]["input_ids"][:5]
    plain = _alone(tiny_model, ids, 0, "cpu", None)
    assert plain.shape == (5, 64) and plain.dtype == torch.float32
    padded = _alone(tiny_model, ids, 0, "cpu", 8)
    assert padded.shape == (5, 64) and torch.allclose(plain, padded, atol=1e-6)
    want = tiny_model(input_ids=ids[None]).logits[0]
    assert torch.allclose(plain, want.float(), atol=1e-6)


def test_a_model_that_would_mix_packed_samples_is_refused(tiny_model):
    class NoConfig(torch.nn.Module):
        pass
    with pytest.raises(ValueError) as e:
        check_packed_forward(NoConfig())
    assert str(e.value) == "model has no config: cannot check packed-sequence support"
    check_packed_forward(tiny_model)

    class OwnConfig(torch.nn.Module):  # a model whose config does not know use_cache
        config = SimpleNamespace(hidden_size=16)
    check_packed_forward(OwnConfig())
    tiny_model.config.use_cache = True
    try:
        with pytest.raises(ValueError) as e:
            packed_vs_alone(tiny_model, _rows(), 0, "cpu")
        assert str(e.value) == ("model.config.use_cache is True: packed samples would attend to each other. "
                                "Set model.config.use_cache = False for training/eval on packed rows.")
    finally:
        tiny_model.config.use_cache = False
