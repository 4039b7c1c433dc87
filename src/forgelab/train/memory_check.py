"""The pre-flight memory and step estimate of a run (forgelab.estimate), fed what the run
resolved, and the warning when it does not fit the GPU."""
from __future__ import annotations


def run_estimate(pre, mc, rt, world: int) -> tuple[dict | None, str | None]:
    """(estimate, None), or (None, why not): an estimator failure must not cost the training run."""
    try:
        from ..estimate.estimator import estimate_run
        from ..estimate.knobs import knobs_from_conf
        from ..estimate.shape import TrainShape
    except ImportError:
        return None, "forgelab.estimate is not available"
    conf = pre.conf
    seq = pre.train.seq_len
    meta = pre.train.meta
    # batches padded to their longest row: the worst batch holds the longest sample (unpacked SFT)
    # or sequence (text data tokenized by the run), padded to data.pad_to_multiple_of
    longest = None
    if pre.train.kind == "sft" and not meta.get("packed", True):
        longest = int((meta.get("sample_tokens") or {}).get("max") or seq)
    elif "sequence_tokens" in meta:
        longest = int(meta["sequence_tokens"]["max"])
    if longest is not None:
        mult = conf.data.pad_to_multiple_of
        seq = min(seq, -(-longest // mult) * mult if mult else longest)
    try:
        knobs = knobs_from_conf(conf)
        kernels = "liger" if rt.liger else "compiled" if rt.compile else "eager"
        shape, notes = TrainShape.from_train_config(
            conf, precision=rt.precision, seq_len=seq, kernels=kernels, trainable=conf.method.estimate_terms(conf),
            ds_config=pre.ds_config, params_in_half=knobs.params_in_half)
        return estimate_run(shape, mc, pre.train.n_items, world, knobs=knobs, notes=notes), None
    except Exception as e:  # recorded in the summary instead
        return None, f"estimate failed: {type(e).__name__}: {e}"


def memory_warning(estimate: dict, device_total: int) -> str | None:
    """A warning when the estimated device memory (allocator peak + reserve + CUDA context) does
    not fit the GPU; the run still starts (the estimate can be off, an out-of-memory error is clear)."""
    need = estimate.get("device_bytes") or 0
    if need <= device_total:
        return None
    return (f"{need / 2**30:.1f} GiB needed on a {device_total / 2**30:.1f} GiB GPU: expect out of memory; lower "
            "steps.micro_batch_size (raise steps.grad_accum to keep the global batch) or turn on "
            "runtime.gradient_checkpointing")
