"""Which parameters train when only adapters do: the one place of the LoRA rule (peft).

Used by the LoRA methods for the model, for the memory estimate's terms and for the record."""
from __future__ import annotations


def apply_lora(model, conf):
    """Wrap the model with LoRA adapters (lora.*); the base weights freeze. The seed is set
    first so that the adapters' initial values are the same in every run of this config."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed
    lc = conf.lora
    set_seed(conf.seed)
    return get_peft_model(model, LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        modules_to_save=lc.modules_to_save or None, bias="none", task_type="CAUSAL_LM"))


def lora_terms(conf) -> dict:
    """The estimator's view of the adapters (forgelab.estimate.shape.TrainShape.lora)."""
    lc = conf.lora
    # peft keeps adapter weights in fp32 on a half base model
    return {"lora": {"r": int(lc.r), "targets": lc.target_modules, "dropout": float(lc.dropout or 0.0),
                     "dtype_bytes": 4}}
