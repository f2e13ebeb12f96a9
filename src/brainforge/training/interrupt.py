"""Ctrl-C during training: stop promptly, keep the last complete checkpoint, say how to resume.

Python's default SIGINT handling alone is not enough for a training run:
- a KeyboardInterrupt that happens to be raised inside a finaliser or a callback whose
  errors are swallowed is lost, and the run trains on for hundreds of steps;
- Lightning ignores SIGINT once it has caught the first one, so a shutdown that stalls
  (a logger thread, a flush on a loaded machine) can then be stopped only with `kill -9`.

So while a run is active (`interrupt_guard`):
- the first Ctrl-C says at once how to resume, raises KeyboardInterrupt (Lightning's
  graceful path: callbacks, logger flush, exit 1) and arms a watchdog that ends the process
  if that shutdown takes longer than `grace_s`;
- an interrupt that was swallowed is raised again at the next batch boundary
  (`StopOnInterrupt`, a Lightning callback);
- a second Ctrl-C ends the process at once.
A hard exit at any moment loses nothing complete: checkpoints are written aside and renamed
into place (checkpointing.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

GRACE_S = 60.0
EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C


class _Guard:
    def __init__(self, resume_hint: str, grace_s: float):
        self.resume_hint = resume_hint
        self.grace_s = grace_s
        self.requested = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            _hard_exit("second interrupt: exiting now. " + self.resume_hint)
        self.requested = True
        log.warning("interrupted: stopping (press Ctrl-C again to exit at once). %s", self.resume_hint)
        watchdog = threading.Timer(self.grace_s, _hard_exit, args=(
            f"shutdown took over {self.grace_s:.0f} s after the interrupt: exiting now. {self.resume_hint}",))
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.handle)


_active: list[_Guard] = []


@contextmanager
def interrupt_guard(resume_hint: str, grace_s: float = GRACE_S) -> Iterator[None]:
    """Handle Ctrl-C as described above for the duration of a run (main thread only: signal
    handlers cannot be set elsewhere, and a run in another thread gets no SIGINT anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    guard = _Guard(resume_hint, grace_s)
    previous = signal.getsignal(signal.SIGINT)
    _active.append(guard)
    guard.install()
    try:
        yield
    finally:
        _active.remove(guard)
        if not guard.requested:  # once interrupted the process is on its way out: keep Ctrl-C-again-exits
            signal.signal(signal.SIGINT, previous)


def _hard_exit(message: str) -> None:
    # Straight to the file descriptor: this can run inside a signal handler or a timer
    # thread while the main thread holds the logging and console locks.
    os.write(2, f"\n{message}\n".encode())
    os._exit(EXIT_CODE)


class StopOnInterrupt(L.Callback):
    """Raise a requested interrupt at the next batch boundary if it was swallowed, and keep
    Ctrl-C working during shutdown (Lightning sets SIGINT to ignored when it catches one)."""

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._raise_if_requested()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._raise_if_requested()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if _active and _active[-1].requested and threading.current_thread() is threading.main_thread():
            _active[-1].install()

    @staticmethod
    def _raise_if_requested() -> None:
        if _active and _active[-1].requested:
            raise KeyboardInterrupt("interrupt requested earlier and not yet handled")
