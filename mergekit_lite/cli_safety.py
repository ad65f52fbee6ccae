"""The command line's safety net: how every way a command can end becomes an exit status.

- success: 0;
- bad input of any kind (plan, models, options, an output that may not be written, a full disk):
  the :class:`~mergekit_lite.errors.MergeError`'s message and status 2;
- SIGINT / SIGTERM at any moment, start-up included: temporaries removed (see
  :mod:`mergekit_lite.interrupts`), one line, status 130 / 143;
- running out of memory or stack: a message and status 2;
- anything else is a bug in mergekit-lite: one line saying so, status 2, and the traceback only with
  ``MERGEKIT_LITE_TRACEBACK=1``.

No traceback ever reaches the user otherwise. Also here: the ``run`` flags about output safety,
kept out of cli.py. This module must not import torch (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Callable

from .errors import Interrupted, MergeError, MergeWarning
from .interrupts import handling_signals


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``run``'s flags about what may be replaced, resuming, and overflowing values."""
    p.add_argument("--force-overwrite", action="store_true",
                   help="replace OUT even if mergekit-lite did not write it (inputs, the plan and the Hugging Face "
                        "cache are still never replaced)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into OUT (same plan, inputs and options): tensors already "
                        "written are kept; the result is identical to an uninterrupted run")
    p.add_argument("--clamp-overflow", action="store_true",
                   help="clamp values too large for the output dtype to its largest value instead of failing")


def run(command: Callable[[], int], entry: bool, prog: str = "mergekit-lite") -> int:
    """Run `command` with signals handled and every failure turned into a message and a status.
    `entry`: this is the process's entry point (keep the signal handlers until it exits); `prog`
    starts every message."""
    try:
        with handling_signals(restore=not entry), warnings.catch_warnings():
            warnings.simplefilter("always", MergeWarning)
            warnings.showwarning = lambda message, *args, **kwargs: print(f"{prog}: warning: {message}",
                                                                         file=sys.stderr)
            return _guarded(command, prog)
    except Interrupted as exc:  # a signal that arrived while an error was reported, or on the way out
        return _interrupted(exc, prog)


def _guarded(command: Callable[[], int], prog: str) -> int:
    try:
        return command()
    except MergeError as exc:
        return _fail(prog, f"error: {exc}")
    except Interrupted as exc:
        return _interrupted(exc, prog)
    except KeyboardInterrupt:
        return _interrupted(Interrupted(signal.SIGINT), prog)
    except MemoryError:
        return _fail(prog, "error: out of memory; lower --max-memory or free memory (inputs and the plan were not "
                     "changed)")
    except RecursionError:
        return _fail(prog, "error: the input is nested too deeply to process")
    except Exception as exc:  # a bug: say so, without a traceback unless asked
        if os.environ.get("MERGEKIT_LITE_TRACEBACK"):
            raise
        return _fail(prog, f"internal error: {type(exc).__name__}: {exc} ({_innermost(exc)}). This is a bug in "
                     "mergekit-lite; rerun with MERGEKIT_LITE_TRACEBACK=1 to see the traceback, and please report it")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


def _interrupted(exc: Interrupted, prog: str) -> int:
    name = signal.Signals(exc.signum).name if exc.signum in signal.Signals._value2member_map_ else str(exc.signum)
    print(f"{prog}: stopped by {name}; its temporary files were removed", file=sys.stderr)
    return exc.status


def _innermost(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown place"
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
