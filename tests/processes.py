"""Processes a test (or a torture bench) started, found again after they may have been orphaned.

A process started with `tagged_env(token)` carries the token in its environment, and so does every
process it starts (children inherit the environment), however deep and even after reparenting to
init. `survivors(token)` finds those still running.
"""

from __future__ import annotations

import os
import time

import psutil

TOKEN = "MVREC_TEST_PROCESS_TOKEN"


def tagged_env(token: str, env: dict[str, str] | None = None) -> dict[str, str]:
    return {**(os.environ if env is None else env), TOKEN: token}


def tagged(token: str) -> list[psutil.Process]:
    """Running processes whose environment carries `token` (zombies count as gone)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TOKEN) == token:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone meanwhile, or not ours
            continue
    return found


def survivors(token: str, grace_s: float = 30.0) -> list[psutil.Process]:
    """Tagged processes still running after `grace_s` for those on their way out (a server stopping
    after its parent exited). Waits only while some are still there."""
    deadline = time.monotonic() + grace_s
    alive = tagged(token)
    while alive and time.monotonic() < deadline:
        psutil.wait_procs(alive, timeout=0.5)
        alive = tagged(token)
    return alive


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            out.append(str(p.pid))
    return "; ".join(out)
