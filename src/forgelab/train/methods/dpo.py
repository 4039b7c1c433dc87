"""dpo: Direct Preference Optimization on (prompt, chosen, rejected) pairs, through TRL's
DPOTrainer. ``align.loss_type`` picks TRL's variants: sigmoid (the DPO paper), ipo, hinge,
robust, ... and sums of them (e.g. [sigmoid, sft]); ``align.beta`` is the KL strength to the
reference (the model before alignment)."""
from .trl_base import TRLMethod, both


class DPO(TRLMethod):
    task = "dpo"
    data_kind = "pref"
    trainer_path = "trl:DPOTrainer"
    config_path = "trl:DPOConfig"
    reference = "model"
    about_method = "Direct Preference Optimization on preference pairs (TRL DPOTrainer; align.loss_type)"

    def method_args(self, conf) -> dict:
        a = conf.align
        return {"beta": a.beta, "max_length": a.max_length, "loss_type": list(a.loss_type),
                "loss_weights": list(a.loss_weights) if a.loss_weights else None,
                "label_smoothing": a.label_smoothing, "precompute_ref_log_probs": a.precompute_ref_log_probs}


METHODS = both(DPO)
