"""The training datasets built by tests/helpers.py (the conftest fixtures cpt_dir, sft_dir) are
valid inputs of the data stages' own readers."""
from __future__ import annotations


def test_built_datasets_read_back_through_the_stage_readers(cpt_dir, sft_dir, tiny_model_dir):
    """The fixtures are valid inputs: the data stages' own readers open them."""
    from forgelab.data.cpt_dataset import CPTBlockDataset
    from forgelab.data.sft_store import SFTDataset, collate_sft
    from transformers import AutoTokenizer
    cpt = CPTBlockDataset(cpt_dir)
    assert len(cpt) == 160 and cpt[0]["input_ids"].shape == (64,)
    sft = SFTDataset(sft_dir)
    assert len(sft) == sft.meta["n_rows"] and sft.meta["n_samples"] > len(sft)  # packed
    row = sft[0]
    assert (row["position_ids"] == 0).sum() >= 2  # at least two samples in the first row
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.decode(row["input_ids"][row["labels"] != -100])
    assert "<|im_end|>" in text and "user" not in text  # labels cover assistant turns only
    batch = collate_sft([sft[0], sft[1]], pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and "attention_mask" not in batch
