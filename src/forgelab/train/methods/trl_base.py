"""What the alignment methods (dpo, orpo, simpo, kto, grpo) share: a TRL trainer under the lab's
session.

A method here names its TRL trainer and config class and the config fields it sets from the
``align.*`` keys; the session builds ``trainer_class(<TRL trainer>)`` (train/trainer.py), so the
lab's atomic checkpoints, exact resume, timers, token counts, metrics.jsonl/TensorBoard and
train_summary.json wrap TRL's own loss. Every method comes in two modes selected by
``align.mode``: ``lora`` (``--task <name>``: adapters from ``lora.*`` on the frozen model, which
with its adapters switched to their initial values is also the reference model) and ``full``
(``--task <name>_full``: every weight trains; a frozen copy of the starting model is the
reference where the method has one).

The data are text records that TRL tokenizes with the model's chat template
(train/text_data.py); the pair builder (stage 08b) and stage 03b write them.
"""
from __future__ import annotations

import importlib
from typing import Any

from ...config import ConfigError
from .adapters import apply_lora, lora_terms
from .base import Method


def _load(path: str):
    module, name = path.rsplit(":", 1)
    return getattr(importlib.import_module(module), name)


class TRLMethod(Method):
    trainer_path = "trl:DPOTrainer"     # module:class of the TRL trainer
    config_path = "trl:DPOConfig"       # module:class of its TrainingArguments subclass
    reference = "model"                 # "model": a frozen reference forward per step; "none": no reference
    pads_to_multiple = True             # the TRL config has pad_to_multiple_of (data.pad_to_multiple_of)
    fused_lm_head = True                # TRL computes the log-probs in tiles (trl.trainer.utils.add_fused_lm_head)

    def __init__(self, mode: str = "lora"):
        self.trainable = mode
        self.name = self.task if mode == "lora" else f"{self.task}_full"
        self.about = f"{self.about_method} ({'LoRA adapters' if mode == 'lora' else 'all weights'}, align.mode {mode})"

    about_method = ""

    # -- config
    def selects(self, conf) -> bool:
        return conf.task == self.task and conf.align.mode == self.trainable

    def random_init(self, conf) -> bool:
        # a preset shape without model.path: a benchmark of the method's step, not an alignment
        return not conf.model.path and bool(conf.model.preset)

    def validate(self, conf) -> None:
        if not conf.model.path and not conf.model.preset:
            raise ConfigError(f"task {conf.task} needs model.path (the SFT model to align, e.g. model/merged-sft)")
        a = conf.align
        if a.max_length < 8:
            raise ConfigError(f"key 'align.max_length' must be >= 8, got {a.max_length}")
        if a.beta < 0:
            raise ConfigError(f"key 'align.beta' must be >= 0, got {a.beta}")
        if conf.loss:
            raise ConfigError(f"key 'loss': task {conf.task} trains on TRL's {self.task} loss; a loss component "
                              "applies to cpt, pretrain and sft")
        if conf.runtime.loss_chunk_tokens:
            raise ConfigError(f"key 'runtime.loss_chunk_tokens': task {conf.task} computes its log-probs in TRL "
                              "(its own fused LM head); set it to 0")
        if conf.runtime.torch_compile and conf.runtime.compile_scope == "model":
            raise ConfigError(f"key 'runtime.compile_scope': task {conf.task} runs the policy and the reference "
                              "through one model; compile per block (compile_scope blocks) instead")

    def uses_reference(self, conf) -> bool:
        return self.reference == "model" and not conf.align.precompute_ref_log_probs

    # -- data
    def tokens_vary(self) -> bool:
        return True

    def open_data(self, pre):
        from ..text_data import open_text_dataset
        return open_text_dataset(pre.train), (open_text_dataset(pre.eval) if pre.eval else None)

    def sequence_lengths(self, pre, tokenizer) -> list[int]:
        from ..text_data import sequence_lengths
        return sequence_lengths(pre.train, tokenizer)

    # -- parameters
    def prepare_model(self, model, conf):
        return apply_lora(model, conf) if self.trainable == "lora" else model

    # -- the trainer
    def trainer_base(self, conf) -> type:
        return _load(self.trainer_path)

    def args_class(self) -> type:
        return _load(self.config_path)

    def method_args(self, conf) -> dict[str, Any]:
        """TRL config fields of this method, from align.*."""
        return {"beta": conf.align.beta, "max_length": conf.align.max_length}

    def trl_args(self, conf) -> dict[str, Any]:
        """Fields every TRL config gets: the lab's gradient-checkpointing choice (TRL defaults to
        on), no dataset worker processes, and the method's own."""
        out = {"gradient_checkpointing": conf.runtime.gradient_checkpointing, "disable_dropout": True,
               **self.method_args(conf)}
        if self.pads_to_multiple:
            out["pad_to_multiple_of"] = conf.data.pad_to_multiple_of  # None: each batch to its longest row
        return out

    def trainer_parts(self, s, tokenizer) -> dict[str, Any]:
        """Keyword arguments of the TRL trainer besides model, args and processing_class."""
        train, ev = self.open_data(s.pre)
        parts = {"train_dataset": train, "eval_dataset": ev}
        if self.reference == "model" and self.trainable == "full" and self.uses_reference(s.conf):
            parts["ref_model"] = s.build_reference()
        return parts

    def loss(self, conf):
        return None

    # -- MFU
    @property
    def flops_formula(self) -> str:
        train = ("4*(N_nonemb+N_head) + 6*N_lora + 12*L*A*S" if self.trainable == "lora"
                 else "6*(N_nonemb+N_head) + 12*L*A*S")
        return train + (self.extra_formula if self.reference == "model" else "")

    extra_formula = " + reference forward 2*(N_nonemb+N_head) + 4*L*A*S"

    def extra_forwards(self, conf) -> int:
        """Forward passes per token beside the policy's training pass (without a config: the
        method's usual ones): the reference's."""
        return int(self.reference == "model") if conf is None else int(self.uses_reference(conf))

    def flops_per_token(self, counts, span: float, conf=None) -> float:
        from ..flops import flops_per_token, forward_flops_per_token
        return (flops_per_token(counts, span, lora=self.trainable == "lora")
                + self.extra_forwards(conf) * forward_flops_per_token(counts, span))

    # -- memory estimate
    def estimate_terms(self, conf) -> dict[str, Any]:
        """TrainShape fields: LoRA's adapters; pairs train chosen + rejected concatenated (2
        sequences per item); a reference forward (no grad) runs on the same rows after the
        policy's; a full-weight reference is a second frozen copy of the weights (LoRA: the base
        weights with the adapters off)."""
        terms = lora_terms(conf) if self.trainable == "lora" else {}
        if self.data_kind == "pref":
            terms["sequences_per_item"] = 2
        if self.fused_lm_head:
            terms["fused_lm_head"] = True
        if self.uses_reference(conf):
            terms["nograd_sequences_per_item"] = terms.get("sequences_per_item", 1)
            if self.trainable == "full":
                terms["reference_model"] = True
        return terms

    def summary(self, conf) -> dict[str, Any]:
        return {"sft_mode": None, "align": {"method": self.task, "mode": self.trainable,
                                            "reference": self.uses_reference(conf),
                                            "trl": self.trainer_path.split(":")[1],
                                            **self.method_args(conf)}}


def both(cls) -> tuple[TRLMethod, TRLMethod]:
    """The LoRA and the full-weight variant of a method (``METHODS`` of its module)."""
    return cls("lora"), cls("full")
