"""simpo: SimPO, a reference-free preference loss on length-normalized log-probs with a target
margin (``align.simpo_gamma``), through TRL's CPOTrainer with loss_type simpo; ``align.cpo_alpha``
> 0 adds the SFT term on the chosen answer (CPO-SimPO)."""
from .trl_base import TRLMethod, both


class SimPO(TRLMethod):
    task = "simpo"
    data_kind = "pref"
    trainer_path = "trl.experimental.cpo:CPOTrainer"
    config_path = "trl.experimental.cpo:CPOConfig"
    reference = "none"
    fused_lm_head = False               # the experimental trainers compute full logits
    pads_to_multiple = False
    about_method = "SimPO: length-normalized, reference-free preference loss (TRL CPOTrainer, loss_type simpo)"

    def method_args(self, conf) -> dict:
        a = conf.align
        return {"beta": a.beta, "max_length": a.max_length, "loss_type": "simpo", "simpo_gamma": a.simpo_gamma,
                "cpo_alpha": a.cpo_alpha, "label_smoothing": a.label_smoothing}


METHODS = both(SimPO)
