"""Who runs a flow run, and whether that process is gone: how a later run tells a crashed run
(SIGKILL, OOM kill, power loss) from one still working.

A run records its owner: host name, pid, and the process's start time. A pid can be reused by a
new process after the old one died; the start time tells them apart. Only runs started on this
host can be checked; a run of another host is left as it is (its own host's next run marks it).
"""

from __future__ import annotations

import json
import os
import socket

import psutil


def process_owner() -> str:
    """This process as a runs.owner value (JSON)."""
    return json.dumps(owner_fields(), sort_keys=True)


def owner_fields() -> dict:
    """{"host", "pid", "pid_started"} of this process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": round(psutil.Process().create_time(), 2)}


def owner_gone(owner: str | None) -> bool:
    """True when the run's process ran on this host and no longer exists (dead, a zombie, or its pid
    now belongs to a newer process). False when unknown: no owner recorded, or another host."""
    if not owner:
        return False
    o = json.loads(owner)
    if o.get("host") != socket.gethostname():
        return False
    return process_gone(int(o["pid"]), o["pid_started"])


def process_gone(pid: int, started: float) -> bool:
    """True when process `pid` of this host, started at `started` (psutil create_time, 2 decimals),
    no longer runs: no such pid, a zombie, or the pid now belongs to a newer process."""
    try:
        p = psutil.Process(pid)
        return p.status() == psutil.STATUS_ZOMBIE or round(p.create_time(), 2) != round(started, 2)
    except psutil.NoSuchProcess:
        return True


def describe(owner: str) -> str:
    o = json.loads(owner)
    return f"process {o.get('pid')} on {o.get('host')}"
