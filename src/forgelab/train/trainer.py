"""The Trainer: transformers.Trainer with the lab's hooks, and what runs in one optimizer step.

One optimizer step, in order (stock = transformers.Trainer._inner_training_loop; ours in brackets):

 1. fetch: ``get_batch_samples`` pulls ``steps.grad_accum`` micro-batches from the DataLoader
    [ForgeTrainer: timed as "data"; pops the collators' host-side token counts, so tokens and
    padding waste are counted without a device sync]
 2. ``on_step_begin`` callbacks (none of ours)
 3. for each micro-batch (DDP skips the gradient all-reduce on all but the last):
      ``training_step`` [timed as "forward_backward"] -> ``compute_loss`` [timed as "forward";
      the method's loss (``Method.loss``: a user's loss component, handed to the Trainer as
      ``compute_loss_func``), or the chunked LM head + loss (runtime.loss_chunk_tokens), or the
      model's own cross-entropy] -> backward; ``floating_point_ops`` [the cached formula]
 4. clip the gradient norm (optim.max_grad_norm), ``optimizer.step()`` ->
    ``on_optimizer_step`` [_PhaseCallback: optimizer time], scheduler step, zero_grad
 5. global_step += 1 -> ``on_step_end`` [_PhaseCallback closes the step's timers;
    StopCallback: steps.stop_after_steps asks for a save and a stop; ProfilerCallback steps
    torch.profiler]
 6. log: the loss is gathered over ranks (the step's one host sync) -> ``on_log``
    [MetricsCallback: one metrics.jsonl line + TensorBoard scalars; tokens summed over ranks]
 7. evaluate when eval.every_steps says so -> ``on_evaluate`` [eval_metrics.jsonl]
 8. save when checkpoint.every_steps (or the stop) says so -> ``_save_checkpoint``
    [hf_private.AtomicCheckpoints: staging dir, rename, rotate] -> ``on_save`` [MetricsCallback
    leaves the save out of the next step's time]

TRL's trainers (dpo, orpo, simpo, kto, grpo) get the same hooks: ``trainer_class(DPOTrainer)``
puts AtomicCheckpoints and ForgeMixin in front of the TRL class, whose own compute_loss (and,
for GRPO, the generation in ``_prepare_inputs``) runs inside the same timers and callbacks.

Also ours: AdamW groups without decay on norms, biases and embeddings
(``get_decay_parameter_names``) and the token counts popped from evaluation batches
(``prediction_step``). Everything else is the stock Trainer. The only private Trainer methods
overridden are in hf_private.py, checked when a ForgeTrainer is built.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from . import hf_private
from .data import DIGESTS_KEY, SLOTS_KEY, TOKENS_KEY
from .optim import decay_parameter_names
from .profiling import StepTimers


class ForgeMixin:
    """The lab's part of a Trainer, for transformers.Trainer and for TRL's Trainer subclasses
    alike (``trainer_class``): timers, host-side token counts, no decay on norms, the cached
    FLOP formula and the chunked loss."""

    def __init__(self, *args, run_dir: Path, keep_last: int, timers: StepTimers, flops_per_token: float,
                 steady_skip: int = 0, loss_chunk: int = 0, sample_log: Path | None = None, **kwargs):
        problems = hf_private.check(type(self))
        if problems:
            raise RuntimeError("this transformers version changed what the lab's atomic checkpoints rely on: "
                               + "; ".join(problems))
        super().__init__(*args, **kwargs)
        self.loss_chunk = loss_chunk
        self.steady_skip = steady_skip
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.timers = timers
        self.fpt = flops_per_token
        self.saved: list[dict] = []
        self._step_tokens = 0
        self.local_tokens = 0  # this rank's real and padded token slots over the session
        self.local_slots = 0
        self._micro_end = 0.0
        self.sample_log = sample_log  # this rank's samples/rank<r>.jsonl (metrics.sample_digests)
        self.add_callback(_PhaseCallback(self))

    def pop_step_tokens(self) -> int:
        n, self._step_tokens = self._step_tokens, 0
        return n

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        with self.timers.time("data"):
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        digests: list[str] = []
        for b in batches:
            if not isinstance(b, dict):  # GRPO's list of prompt records: counted when answers are generated
                continue
            n = int(b.pop(TOKENS_KEY, 0))
            self._step_tokens += n
            self.local_tokens += n
            self.local_slots += int(b.pop(SLOTS_KEY, n))
            digests += b.pop(DIGESTS_KEY, [])
        if self.sample_log is not None and batches:
            # what this rank is about to train on in the coming optimizer step
            self.sample_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.sample_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "items": digests}) + "\n")
        return batches, n_items

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(TOKENS_KEY, None)  # evaluation batches reach here with the counts still in
        inputs.pop(SLOTS_KEY, None)
        inputs.pop(DIGESTS_KEY, None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.timers.time("forward"):
            if self.loss_chunk and model.training and not return_outputs:
                from .chunked_loss import causal_lm_loss
                # the chunked path calls the inner decoder, past the autocast that accelerate wraps
                # around the top-level forward: without this the blocks ran in fp32 and SDPA fell
                # back to the math kernel (a 64 GiB score matrix at seq 32768)
                with self.accelerator.autocast():
                    loss = causal_lm_loss(model, inputs, self.loss_chunk, num_items_in_batch)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * self.accelerator.num_processes  # as the stock compute_loss does
                return loss
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            sp = self.get_sp_size()
            if sp > 1 and model.training:
                # Ulysses: every rank back-propagates its group's whole loss (transformers'
                # deepspeed_sp_compute_loss gathers it with a differentiable all_gather, whose
                # backward sums the ranks' copies) and DeepSpeed sums the group's gradients without
                # dividing by the SP size (zero/stage_1_and_2.py divides by dp_world_size /
                # sequence_parallel_size; DeepSpeed issue #5248): measured 2.0001 x the one-process
                # gradient norm with SP 2. AdamW's eps and clipping see that scale (parameters 3e-5
                # off after 4 steps unclipped), so the backward is scaled by 1/sp; the loss value
                # logged stays as computed. tests/test_train_parallel.py holds the grad norm to the
                # one-process one: a DeepSpeed that fixes this fails there, and this goes.
                if return_outputs:
                    out = (_scale_grad(out[0], 1.0 / sp), out[1])
                else:
                    out = _scale_grad(out, 1.0 / sp)
            return out

    def count_generated(self, tokens: int, slots: int) -> None:
        """Tokens a method produced inside the step (GRPO's sampled answers): counted like the
        collators' ones, so throughput covers what the step computed."""
        self._step_tokens += tokens
        self.local_tokens += tokens
        self.local_slots += slots

    def training_step(self, model, inputs, *args, **kwargs):
        with self.timers.time("forward_backward"):
            loss = super().training_step(model, inputs, *args, **kwargs)
        self._micro_end = time.perf_counter()
        return loss

    def floating_point_ops(self, inputs) -> int:
        # the stock version walks all parameters on every micro-batch; the formula is cached
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        return int(self.fpt * ids.numel()) if hasattr(ids, "numel") else 0


def _scale_grad(loss, scale: float):
    """``loss`` unchanged forward (the added term is exactly zero); its gradient times ``scale``."""
    return loss.detach() + (loss - loss.detach()) * scale


class ForgeTrainer(hf_private.AtomicCheckpoints, ForgeMixin, Trainer):
    """The lab's Trainer for the methods that train on the stock loop (cpt, pretrain, sft)."""


_CLASSES: dict[type, type] = {}


def trainer_class(base: type) -> type:
    """The lab's Trainer on top of ``base`` (transformers.Trainer or a TRL trainer such as
    DPOTrainer): atomic checkpoints and the mixin's hooks run around the base's own step."""
    if base is Trainer:
        return ForgeTrainer
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Forge{base.__name__}", (hf_private.AtomicCheckpoints, ForgeMixin, base),
                              {"__doc__": f"{base.__name__} with the lab's checkpoints, timers and counts"})
    return _CLASSES[base]


class _PhaseCallback(TrainerCallback):
    """Optimizer time (clip + step: from the last micro-batch's end to after the step) and the
    step boundary for the phase timers."""

    def __init__(self, trainer: ForgeTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kw):
        t = self.trainer.timers
        if t.enabled:
            t._sync()
            t.add("optimizer", time.perf_counter() - self.trainer._micro_end)

    def on_step_end(self, args, state, control, **kw):
        self.trainer.timers.end_step(self.trainer.steady_skip)
