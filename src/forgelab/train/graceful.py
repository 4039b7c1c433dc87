"""Preemption: SIGTERM (what Slurm, Kubernetes and spot instances send before a kill) or SIGINT
stops a run at the end of the current optimizer step, after a checkpoint.

In a rank, ``GracefulStop`` notes the signal; at each step end the ranks agree on the step to
stop at (through the process group's store when there are several), that step's save and stop
are requested, and ``checkpoint.grace_s`` later a watchdog exits the process anyway (an
unfinished save is a staging dir, never a checkpoint). The session then writes its summary as
``interrupted`` and exits with 128 + the signal number; ``checkpoint.resume=auto`` continues
the same curve. A second SIGINT interrupts at once.

The driver forwards the signals to its ranks (``forward_signals``): to torchrun's workers
directly, so the grace period is the lab's, not the agent's.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from transformers import TrainerCallback

log = logging.getLogger("forgelab.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop(TrainerCallback):
    def __init__(self, grace_s: float, world: int):
        self.grace_s = grace_s
        self.world = world
        self.signum: int | None = None   # the signal that asked for the stop
        self.stopped_at: int | None = None
        self._old: dict = {}
        self._timer: threading.Timer | None = None
        self._published = False

    # -- signals
    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: stopping after this step with a checkpoint (grace %.0f s)",
                        signal.Signals(signum).name, self.grace_s)
            self._timer = threading.Timer(self.grace_s, self._expired)
            self._timer.daemon = True
            self._timer.start()

    def _expired(self) -> None:
        log.error("grace period of %.0f s over before the checkpoint was saved: exiting now (the unfinished "
                  "save is discarded at the next start)", self.grace_s)
        logging.shutdown()
        os._exit(128 + (self.signum or signal.SIGTERM))

    # -- the step boundary
    KEY = "forgelab_graceful_stop_step"

    def _stop_step(self, step: int) -> int | None:
        """The step at which every rank stops, or None. One rank: this one. Several: agreed
        through the process group's key-value store (not a collective, so the step's own
        communication stays as it is in profiles): the first rank to see a signal publishes
        its next step, which no rank can have ended yet (each step's gradient all-reduce keeps
        the ranks within one step of each other), and every rank checks at each step end."""
        if self.world <= 1:
            return step if self.signum else None
        store = _store()
        if self.signum and not self._published:
            store.compare_set(self.KEY, "", str(step + 1))
            self._published = True
        if not store.check([self.KEY]):
            return None
        return int(store.get(self.KEY))

    def on_step_end(self, args, state, control, **kw):
        target = self._stop_step(state.global_step)
        if target is not None and state.global_step >= target and self.stopped_at is None:
            self.signum = self.signum or int(signal.SIGTERM)  # a rank without the signal follows the others
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum) if self.signum else 0

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


def _store():
    """The default process group's key-value store (the rendezvous store torchrun or DeepSpeed set up)."""
    from torch.distributed import distributed_c10d
    return distributed_c10d._get_default_store()


@contextlib.contextmanager
def forward_signals(proc):
    """While the child runs, pass SIGTERM/SIGINT on to the processes that train: the child's
    own children when it is a launcher (torchrun, DeepSpeed), else the child."""
    def handler(signum, frame):
        proc.forwarded_signal = signum
        targets = [proc.pid]
        try:
            import psutil
            ranks = {}
            for k in psutil.Process(proc.pid).children(recursive=True):
                cmd = " ".join(k.cmdline())
                if "forgelab.train.entry" in cmd and "--worker" in cmd and \
                        "torch.distributed.run" not in cmd and "deepspeed.launcher" not in cmd:
                    ranks[k.pid] = k.ppid()
            # a rank's own children (DataLoader workers) have its command line too: not them
            workers = [pid for pid, parent in ranks.items() if parent not in ranks]
            targets = workers or targets
        except Exception:
            pass
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
