"""SIGINT and SIGTERM during training: finish the step in flight, save, stop.

A scheduler's SIGTERM (preemption) and a user's Ctrl-C ask the run to stop; neither should
cost the steps since the last periodic checkpoint. While an `InterruptGuard` is active:

- the first SIGINT or SIGTERM only sets `requested`: the loop finishes the step in flight,
  writes a checkpoint at that step and raises `TrainingInterruptedError`;
- a second one stops at once (`KeyboardInterrupt` at the next Python instruction), except
  inside `guard.deferred()`, which a step's bookkeeping runs under so that the weights,
  the step count and the data position always agree; the loop then still saves the last
  finished step (or finishes the write in flight) before stopping;
- a third one kills the process (the signal's default action). Checkpoint writes are atomic,
  so a write cut short this way is discarded when the run is next started.

Exit statuses follow the shell's convention, 128 + the signal's number: 130 for SIGINT, 143
for SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["InterruptGuard", "TrainingInterruptedError"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterruptedError(Exception):
    """Training stopped on SIGINT or SIGTERM; ``exit_status`` is 128 + the signal number.

    Attributes:
      signum: the signal.
      step: the step the run stopped at.
      exit_status: what a program should exit with (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum = int(signum)
        self.step = int(step)
        self.exit_status = 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class InterruptGuard:
    """Holds SIGINT and SIGTERM for the run while active (a context manager).

    Handlers are installed only in the main thread (the only one Python delivers signals
    to), and not for a signal the process ignores; elsewhere signals act as usual.

    Args:
      on_request: called with the signal number when the first signal arrives (e.g. to say
        so on a progress bar); it must not raise.
    """

    def __init__(self, on_request=None):
        self.requested: int | None = None
        self.aborted = False
        self._on_request = on_request
        self._previous: dict[int, object] = {}
        self._deferring = 0
        self._abort_pending = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                # a signal the process was started to ignore (nohup, a background job of a
                # script) stays ignored
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        del frame
        if self.requested is None:
            self.requested = signum
            if self._on_request is not None:
                self._on_request(signum)
            return
        # The second signal: stop now; a third one gets the default action (terminate).
        for s in self._previous:
            signal.signal(s, signal.SIG_DFL)
        self.aborted = True
        if self._deferring:
            self._abort_pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """A block a second signal does not cut: it stops the run when the block ends."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if self._abort_pending and not self._deferring:
                self._abort_pending = False
                raise KeyboardInterrupt
