"""SIGINT and SIGTERM: stop cleanly at any moment, never in the middle of a commit.

The command line installs :func:`handling_signals` before it imports anything heavy, so a signal
during start-up (importing torch, compiling the plan), while reading, merging, or while the writer
thread is busy becomes one :class:`~mergekit_lite.errors.Interrupted` exception in the main thread.
It unwinds through the context managers that own temporaries (output folders, writers, thread
pools), which remove them, and the command exits with 130 (SIGINT) or 143 (SIGTERM). Further
signals while it unwinds are ignored, so cleanup is never cut short.

:func:`critical` marks the few steps that must not be torn (renaming a finished output into place,
removing a temporary folder): a signal arriving inside is held and delivered when the step is done.
It also works without our handlers (the Python API, where SIGINT is Python's KeyboardInterrupt):
it holds the signal and re-raises it to whatever handler was there before.

This module imports nothing heavy (the command line's ``--help`` stays fast).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

from .errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    installed = False  # our handler is in place (the command line)
    stopping = False  # an Interrupted was raised: ignore further signals
    depth = 0  # nesting of critical sections
    pending: int | None = None  # a signal that arrived inside a critical section


_state = _State()


def _on_signal(signum: int, frame: Any) -> None:
    if _state.stopping:
        return
    if _state.depth > 0:
        _state.pending = _state.pending or signum
        return
    _state.stopping = True
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handling_signals(restore: bool = True) -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread while inside. With `restore` false
    (a process's entry point) the handlers stay, ignoring every later signal, until the process
    exits, so that no signal can turn the end of a run into a traceback."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _state.installed, _state.stopping, _state.depth, _state.pending = True, False, 0, None
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        _state.stopping = True
        if restore:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _state.installed = False


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while inside; deliver a held one on the way out (unless an
    exception is already on its way out, which ends the run anyway)."""
    if not _main_thread():
        yield
        return
    if not _state.installed:
        with _holding() as held:
            yield
        if held:
            signal.raise_signal(held[0])  # to the handler that was there before
        return
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if _state.depth == 0 and _state.pending is not None and not _state.stopping:
        signum, _state.pending = _state.pending, None
        _state.stopping = True
        raise Interrupted(signum)


@contextlib.contextmanager
def _holding() -> Iterator[list[int]]:
    """Without our handlers: record SIGINT/SIGTERM while inside, restore the previous handlers."""
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
