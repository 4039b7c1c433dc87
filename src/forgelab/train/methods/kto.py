"""kto: Kahneman-Tversky Optimization on unpaired answers labelled good or bad, through TRL's
KTOTrainer; ``align.desirable_weight`` / ``undesirable_weight`` balance the two labels."""
from .trl_base import TRLMethod, both


class KTO(TRLMethod):
    task = "kto"
    data_kind = "kto"
    trainer_path = "trl:KTOTrainer"
    config_path = "trl:KTOConfig"
    reference = "model"
    about_method = "KTO on answers labelled good/bad (TRL KTOTrainer)"

    def validate(self, conf) -> None:
        super().validate(conf)
        if conf.steps.micro_batch_size < 2:
            # TRL estimates the KL term from mismatched (prompt, answer) pairs inside a micro-batch
            from ...config import ConfigError
            raise ConfigError("key 'steps.micro_batch_size': kto needs at least 2 records per micro-batch "
                              "(its KL estimate pairs each prompt with another record's answer)")

    def estimate_terms(self, conf) -> dict:
        # B labelled answers train; the KL pass (B mismatched pairs) and each reference pass run
        # B rows without grad, whether or not a reference model is held
        return {**super().estimate_terms(conf), "nograd_sequences_per_item": 1}

    def method_args(self, conf) -> dict:
        a = conf.align
        return {"beta": a.beta, "max_length": a.max_length, "desirable_weight": a.desirable_weight,
                "undesirable_weight": a.undesirable_weight, "precompute_ref_log_probs": a.precompute_ref_log_probs}


METHODS = both(KTO)
