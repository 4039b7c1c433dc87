"""sft_full: supervised fine-tuning of every weight on the stage-05 store (chat template,
assistant-only labels, packed rows whose samples cannot see each other)."""
from .base import Method


class FullSFT(Method):
    name = "sft_full"
    task = "sft"
    sft_mode = "full"
    data_kind = "sft"
    about = "supervised fine-tuning of all weights (task sft, sft.mode full)"


METHOD = FullSFT()
