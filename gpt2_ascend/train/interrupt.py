"""Ctrl-C (SIGINT) and SIGTERM during a training run.

Inside the training loop the first signal asks the loop to stop after the step it is in: the trainer saves a
checkpoint there (atomically, as always) and `run_training` raises TrainingInterrupted, which train.py turns
into one line saying where the checkpoint is and how to continue (exit 130 / 143). A second signal, or one
that arrives outside the loop (while preparing data, exporting final/), raises Interrupted at once: every
write is atomic, so stopping anywhere leaves the newest complete checkpoint the one to resume from.

Under torchrun the launcher forwards the signal to every worker; the ranks agree on the step to stop at
(Trainer.stop_signal all-reduces it), save together and all exit with the same code.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """A signal that stops the run at once (the process exits with 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class TrainingInterrupted(RuntimeError):
    """The run stopped after a step because of a signal, and saved a checkpoint there."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        super().__init__(f"interrupted by {signal_name(signum)} after step {step}, checkpoint saved: {checkpoint}; "
                         f"continue with --resume auto")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopOnSignal:
    """SIGINT / SIGTERM handlers for the life of a run (a context manager; a no-op outside the main thread,
    where Python cannot install handlers).

    `graceful` is True while the training loop runs: then the first signal only sets `signum` (the loop
    polls it after each step) and says so on stderr; otherwise, and for any later signal, Interrupted is
    raised right away."""

    def __init__(self, notify=None):
        self.signum = 0
        self.graceful = False
        self.notify = notify or (lambda text: print(text, file=sys.stderr, flush=True))
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        self.restore()

    def restore(self):
        """Put the handlers that were there before back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.graceful and not self.signum:
            self.signum = signum
            self.notify(f"{signal_name(signum)}: stopping after this step and saving a checkpoint "
                        f"(send it again to stop at once)")
            return
        raise Interrupted(signum)
