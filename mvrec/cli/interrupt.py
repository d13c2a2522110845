"""Ctrl-C and SIGTERM: the command stops within seconds, says so in one line, exits 128 + signal.

A terminal sends Ctrl-C's SIGINT to the whole process group, and a service manager sends SIGTERM.
Both raise Interrupted in the main thread, wherever it is. It unwinds like any error: an extraction
run stops its data plane, ends its record `failed` and frees its run lease; what was committed
stays (every commit is atomic). The Prefect API this process started is in its own session
(flows/runtime.py), so it is still there to record the flow runs as crashed.

If unwinding takes more than GRACE_S (a model still loading in a thread), or a second signal
comes, the process ends at once: the store is consistent anyway, and a run left `running` is
shown `abandoned`.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading

GRACE_S = 8.0
_received: list[int] = []


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt: `except Exception` lets it
    pass, while cleanup in `finally` and `except BaseException` runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def exit_code(signum: int) -> int:
    return 128 + signum  # what a shell shows for a process ended by that signal


def _handler(signum: int, frame) -> None:
    if _received:  # a second Ctrl-C: stop now
        os._exit(exit_code(_received[0]))
    _received.append(signum)
    _quiet_consoles()
    timer = threading.Timer(GRACE_S, _give_up, (signum,))
    timer.daemon = True
    timer.start()
    raise Interrupted(signum)


def _quiet_consoles() -> None:
    """From here on, log records stay off the terminal: Prefect reports each flow and task run it
    sees unwind as "Crash detected!", and the one line that matters is printed by the CLI."""
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(lambda record: False)


def _give_up(signum: int) -> None:
    sys.stderr.write(f"interrupted: still stopping after {GRACE_S:.0f} s; exiting now\n")
    sys.stderr.flush()
    os._exit(exit_code(signum))


def _not_a_crash_report(record: logging.LogRecord) -> bool:
    """Prefect's own SIGTERM bridge reports the flow and task runs it unwinds as crashed before it
    hands the signal on to us: those reports are not errors to show."""
    return not _received and "termination signal" not in record.getMessage()


def exit_now(code: int) -> None:
    """Run the exit handlers (the Prefect API's stop, Ray's shutdown), flush, and end without the
    interpreter's own teardown: freeing a loaded model and the native libraries' thread pools took
    5 s of the 10 on a loaded machine, and nothing in it matters to a stopped run."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe
            pass
    os._exit(code)


def install() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread (call from it)."""
    _received.clear()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if _not_a_crash_report not in logger.filters:
            logger.addFilter(_not_a_crash_report)
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
