"""The one place that overrides private transformers.Trainer methods, and the check that they
still are what the overrides assume.

Atomic checkpoints need the Trainer to write a checkpoint somewhere other than its final name
and publish it only once every rank has finished; no public hook does that. So:

- ``_get_output_dir(trial)`` returns the staging dir while a save runs;
- ``_save_checkpoint(model, trial)`` (called by ``_maybe_log_save_evaluate`` when
  ``control.should_save``) is wrapped: stock save into staging, barrier, rename, rotate.

``check()`` verifies the names, their parameters, and that the stock save still asks
``_get_output_dir`` for its directory; ForgeTrainer calls it when it is built and a test calls
it, so a transformers release that changes them fails loudly instead of saving in place.
"""
from __future__ import annotations

import inspect
import logging
import shutil
import time

from transformers import Trainer

from .. import manifest
from . import checkpoint as ckpt
from .callbacks import SaveTimer

log = logging.getLogger("forgelab.train")

PRIVATE = {"_save_checkpoint": ("self", "model", "trial"), "_get_output_dir": ("self", "trial")}


def check(trainer_cls: type = Trainer) -> list[str]:
    """What no longer matches in this transformers version (empty: all as assumed)."""
    problems = []
    for name, params in PRIVATE.items():
        fn = getattr(trainer_cls, name, None)
        if fn is None:
            problems.append(f"transformers.Trainer.{name} is gone")
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            problems.append(f"transformers.Trainer.{name}{got} no longer takes {params}")
    save = getattr(Trainer, "_save_checkpoint", None)
    if save is not None and "self._get_output_dir(" not in inspect.getsource(save):
        problems.append("transformers.Trainer._save_checkpoint no longer asks _get_output_dir for its directory")
    # a subclass between the lab's mixins and Trainer (TRL's trainers) must hand both on to Trainer
    for cls in trainer_cls.__mro__:
        if cls is Trainer or not issubclass(cls, Trainer) or cls.__module__.startswith("forgelab."):
            continue
        for name in PRIVATE:
            if name in vars(cls) and f"super().{name}(" not in inspect.getsource(vars(cls)[name]):
                problems.append(f"{cls.__module__}.{cls.__name__}.{name} no longer calls Trainer's")
    return problems


class AtomicCheckpoints:
    """Mixin for a Trainer subclass with ``run_dir``, ``keep_last`` and ``saved``: a checkpoint is
    written to a staging dir, renamed to checkpoint-N once every rank finished, then the
    oldest beyond ``keep_last`` are removed. A kill at any point leaves only complete ones."""

    _staging: str | None = None

    def _get_output_dir(self, trial=None) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        final = self.run_dir / f"{ckpt.PREFIX}{step}"
        staging = ckpt.staging_path(self.run_dir, step)
        t0 = time.perf_counter()
        self._staging = str(staging)
        try:
            try:
                super()._save_checkpoint(model, trial)  # every rank writes its part into staging/checkpoint-N
            finally:
                self._staging = None
            if self.args.should_save:
                SaveTimer.delay(step)
            self.accelerator.wait_for_everyone()
            removed = []
            if self.args.should_save:
                manifest.write_manifest(staging / final.name, hash=getattr(self, "manifest_hash", "sha256"))
                ckpt.publish(staging, final)
                removed = ckpt.rotate(self.run_dir, self.keep_last)
        except Exception as e:  # a full disk, an I/O error: nothing half-written may stay
            why = ckpt.save_failure(final, e)
            shutil.rmtree(staging, ignore_errors=True)
            raise ckpt.CheckpointError(why) from e
        self.accelerator.wait_for_everyone()
        rec = {"step": step, "seconds": round(time.perf_counter() - t0, 3),
               "bytes": ckpt.dir_bytes(final) if self.args.should_save else None, "path": str(final)}
        self.saved.append(rec)
        log.info("checkpoint %s: %.2f s, %s bytes%s", final.name, rec["seconds"], rec["bytes"],
                 f" (removed {', '.join(removed)})" if removed else "")
