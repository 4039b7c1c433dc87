"""sft_lora: supervised fine-tuning of LoRA adapters (peft) on the stage-05 store; the base
weights stay frozen and final/ holds the adapter (scripts/08_merge_lora.py merges it).

MFU counts only the work that runs: frozen weights cost a forward and the input gradient (4 per
parameter), adapters all three (6); see forgelab/train/flops.py."""
from .adapters import apply_lora, lora_terms
from .base import Method


class LoraSFT(Method):
    name = "sft_lora"
    task = "sft"
    sft_mode = "lora"
    data_kind = "sft"
    trainable = "lora"
    about = "supervised fine-tuning of LoRA adapters (task sft, sft.mode lora)"
    flops_formula = "lora: 4*(N_nonemb+N_head) + 6*N_lora + 12*L*A*S"

    def prepare_model(self, model, conf):
        return apply_lora(model, conf)

    def estimate_terms(self, conf) -> dict:
        return lora_terms(conf)


METHOD = LoraSFT()
