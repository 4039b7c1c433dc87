"""Preemption: SIGTERM (what Slurm, Kubernetes and spot instances send before a kill) or SIGINT
stops a run at the end of the current optimizer step, after a checkpoint.

In a rank, ``GracefulStop`` notes the signal; at each step end the ranks agree (an all-reduce
of the flag when there are several, so all stop at the same step), the step's save and stop
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
    def __init__(self, grace_s: float, world: int, device=None):
        self.grace_s = grace_s
        self.world = world
        self.device = device
        self.signum: int | None = None   # the signal that asked for the stop
        self.stopped_at: int | None = None
        self._old: dict = {}
        self._timer: threading.Timer | None = None

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
    def _agreed(self) -> int:
        flag = self.signum or 0
        if self.world > 1:
            import torch
            import torch.distributed as dist
            t = torch.tensor([flag], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def on_step_end(self, args, state, control, **kw):
        flag = self._agreed()
        if flag and self.stopped_at is None:
            self.signum = self.signum or flag  # a rank that did not get the signal itself follows the others
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
