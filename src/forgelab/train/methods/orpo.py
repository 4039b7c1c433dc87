"""orpo: Odds Ratio Preference Optimization (the SFT loss on the chosen answer plus an odds-ratio
term against the rejected one), through TRL's ORPOTrainer. No reference model: one model's
weights and activations, which is what fits a 24 GB card. ``align.beta`` is the odds-ratio
weight (lambda in the paper)."""
from .trl_base import TRLMethod, both


class ORPO(TRLMethod):
    task = "orpo"
    data_kind = "pref"
    trainer_path = "trl.experimental.orpo:ORPOTrainer"
    config_path = "trl.experimental.orpo:ORPOConfig"
    reference = "none"
    fused_lm_head = False               # the experimental trainers compute full logits
    pads_to_multiple = False
    about_method = "ORPO: SFT + odds-ratio preference term, no reference model (TRL ORPOTrainer)"

    def method_args(self, conf) -> dict:
        return {"beta": conf.align.beta, "max_length": conf.align.max_length}


METHODS = both(ORPO)
