"""pretrain: a model from scratch (random weights of a preset or config, the project's own
tokenizer) on CPT blocks tokenized with that tokenizer."""
from ...config import ConfigError
from .base import Method


class Pretraining(Method):
    name = task = "pretrain"
    data_kind = "cpt"
    builds_from_config = True
    about = "train from scratch: model.preset / model.config with model.tokenizer, on CPT blocks"

    def validate(self, conf) -> None:
        m = conf.model
        if not (m.preset or m.config or m.config_file):
            raise ConfigError("task pretrain needs model.preset, model.config or model.config_file")
        if not m.tokenizer:
            raise ConfigError("task pretrain needs model.tokenizer (the tokenizer dir the data was built with)")


METHOD = Pretraining()
