"""Stopping a long job on SIGINT or SIGTERM at a point where what it wrote is whole.

A terminal's Ctrl-C, a scheduler's SIGTERM (SLURM before its time limit, Kubernetes, a spot
instance's notice) and torchrun passing either on to its workers all mean "stop soon, keep the
work". While a `StopRequest` is installed the first such signal only sets `requested`; the job
finishes the unit in hand (a training step), saves, and raises `Interrupted`, whose message says
what was kept and how to continue. Signals within STOP_WINDOW_S of the first are the same request
(a terminal's Ctrl-C reaches torchrun and its workers at once, and torchrun forwards it to them
again); a Ctrl-C after that stops at once (KeyboardInterrupt), for a user who will not wait.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

STOP_WINDOW_S = 1.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A job stopped on a signal; the message says what was kept and how to continue. A
    KeyboardInterrupt, so that no `except Exception` takes a user's stop for a failure.
    `exit_code` is the shell's convention for a death by that signal (130 for SIGINT)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "no signal"


def to_stderr(message: str) -> None:
    """Print from a signal handler: one unbuffered write (a handler may run while Python's own
    stderr buffer is mid-write, where print would raise a reentrant-call error)."""
    try:
        os.write(2, f"\n{message}\n".encode())
    except OSError:
        pass


class StopRequest:
    """Context manager: SIGINT/SIGTERM set `signum` instead of stopping the process.

    `notice` is passed to `say` when the first signal arrives (None: silent). Installed only in
    the main thread (Python delivers signals there); elsewhere it never reports a request.
    """

    def __init__(self, notice: str | None = None, say: Callable[[str], None] = to_stderr):
        self.notice, self.say = notice, say
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for s in SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # ignored by whoever started us (`cmd &`): stays so
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            # None: a handler not set from Python; the default is the honest restoration
            previous = handler if handler is not None else signal.SIG_DFL
            if self.signum is not None:  # a repeat still on its way (torchrun, a sweep passing it on) is
                previous = _LateRepeats(self._first_at + STOP_WINDOW_S, s, previous)  # the same request
            signal.signal(s, previous)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, _frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if self.notice:
                self.say(self.notice)
        elif signum == signal.SIGINT and now - self._first_at >= STOP_WINDOW_S:
            raise KeyboardInterrupt


class _LateRepeats:
    """The handler left once a stop was requested: signals before `until` are ignored (repeats of
    the request); the first one after puts `previous` back and delivers itself to it."""

    def __init__(self, until: float, signum: int, previous):
        self.until, self.signum, self.previous = until, signum, previous

    def __call__(self, signum: int, _frame) -> None:
        if time.monotonic() < self.until:
            return
        signal.signal(self.signum, self.previous)
        os.kill(os.getpid(), signum)
