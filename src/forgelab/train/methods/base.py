"""What the lab asks of a training method.

A method is one module in this package that sets ``METHOD = <a Method subclass>()``; the
registry (``forgelab.train.methods``) finds it by name, and ``--task <name>`` (the launchers:
``configs/train/<name>.yaml``) selects it. The trainer never branches on the task: it asks the
method for

- ``data_kind``: which data it reads (``cpt`` blocks or ``sft`` rows, tokenized; or text records
  for TRL: ``pref`` pairs, ``kto`` labelled answers, ``prompts``);
- ``collator``: how a list of items becomes a batch (with the host-side token counts);
- ``trainable``: which parameters train (``full``, ``lora``) and ``prepare_model`` doing it;
- ``loss``: the ``compute_loss_func`` handed to the Trainer (None: the model's causal-LM loss);
- ``trainer_base`` / ``args_class`` / ``trl_args`` / ``trainer_parts``: the Trainer class the lab's
  hooks go on (transformers.Trainer, or a TRL trainer), its arguments class and what else it is
  given (datasets, collator, reference model, reward functions);
- ``flops_per_token`` / ``flops_formula``: the model FLOPs of one token, for MFU;
- ``estimate_terms``: what the memory estimate must add for it (LoRA adapters; the alignment
  methods' reference copy, sequences per item, no-grad forwards and generation), as TrainShape
  fields;
- ``validate``: its config rules, checked before any model loads.

Methods import nothing heavy at module level (torch, transformers and peft are imported inside
the calls), so that validating a config stays fast.
"""
from __future__ import annotations

from typing import Any, Callable

from ...config import ConfigError


class Method:
    name: str = ""            # the --task name and configs/train/<name>.yaml
    task: str = ""            # the config's `task` value (several methods may share one, e.g. sft)
    sft_mode: str | None = None  # for task sft: the sft.mode value that selects this method
    data_kind: str = "cpt"    # "cpt" (fixed-length blocks) or "sft" (rows with labels)
    trainable: str = "full"   # "full" or "lora"
    builds_from_config: bool = False  # the model starts from random weights of a config (pretraining)
    about: str = ""           # one line for --help and the docs

    # -- config
    def selects(self, conf) -> bool:
        """This method is the one the config asks for."""
        return conf.task == self.task and (self.sft_mode is None or conf.sft.mode == self.sft_mode)

    def validate(self, conf) -> None:
        """Method-specific config rules (raise ConfigError naming the key)."""
        m = conf.model
        if not m.path and not (self.data_kind == "sft" and m.preset):
            raise ConfigError(f"task {conf.task} needs model.path (a pretrained model dir)")

    def random_init(self, conf) -> bool:
        """The model is built from a config with random weights."""
        # an SFT run of a preset shape without model.path: a benchmark shape, not a fine-tune
        return self.builds_from_config or (self.data_kind == "sft" and not conf.model.path
                                           and bool(conf.model.preset))

    # -- data
    def tokens_vary(self) -> bool:
        """Batches carry a varying number of real tokens (rows of samples, not full blocks)."""
        return self.data_kind == "sft"

    def collator(self, conf, tokenizer, data) -> Callable[[list[dict]], dict]:
        from ..data import CPTCollator, SFTCollator
        if self.data_kind == "sft":
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            pad = int(data.meta.get("pad_token_id", pad))
            return SFTCollator(pad, conf.data.pad_to_multiple_of)
        return CPTCollator(position_ids=conf.dist.sequence_parallel > 1)

    # -- parameters
    def prepare_model(self, model, conf):
        """Make the parameters that train trainable (full training: the model as loaded)."""
        return model

    # -- loss
    def loss(self, conf) -> Callable | None:
        """The Trainer's compute_loss_func: a user's loss component (key `loss`) or None for the
        model's own shifted cross-entropy over `labels` (-100 ignored)."""
        if conf.loss:
            from ...components import load_component
            return load_component("loss", conf.loss, "loss")
        return None

    # -- the trainer
    def trainer_base(self, conf) -> type:
        """The Trainer class the lab's hooks go on (train/trainer.py trainer_class)."""
        from transformers import Trainer
        return Trainer

    def args_class(self) -> type:
        from transformers import TrainingArguments
        return TrainingArguments

    def trl_args(self, conf) -> dict[str, Any]:
        """Fields of args_class() beyond the TrainingArguments the lab sets for every run."""
        return {}

    def trainer_parts(self, s, tokenizer) -> dict[str, Any]:
        """Keyword arguments of the trainer besides model, args and processing_class."""
        from ..data import open_dataset
        pre, conf = s.pre, s.conf
        return {"train_dataset": open_dataset(pre.train),
                "eval_dataset": open_dataset(pre.eval) if pre.eval else None,
                "data_collator": self.collator(conf, tokenizer, pre.train), "compute_loss_func": self.loss(conf)}

    def sequence_lengths(self, pre, tokenizer) -> list[int] | None:
        """Token lengths of the training sequences when the data is text (None: a tokenized store,
        whose attention span data.attention_span reads)."""
        return None

    # -- MFU
    flops_formula = "6*(N_nonemb+N_head) + 12*L*A*S"

    def flops_per_token(self, counts, span: float, conf=None) -> float:
        from ..flops import flops_per_token
        return flops_per_token(counts, span, lora=self.trainable == "lora")

    # -- memory estimate
    def estimate_terms(self, conf) -> dict[str, Any]:
        """TrainShape fields this method sets (full training: none)."""
        return {}

    def summary(self, conf) -> dict[str, Any]:
        """What train_summary.json records about the method (next to `task`)."""
        return {"sft_mode": self.sft_mode}
