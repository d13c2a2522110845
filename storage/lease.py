"""Run leases: at most one extraction run per store and extractor at a time.

A second run that finds the lease held does not wait: it raises RunLeaseHeld, whose one-line
message names the owner (host, pid, when it started), and does no work. A nightly run that
overran is still doing the work the next one would do; queueing behind it would only start a run
late that finds nothing new (docs/flows.md, "Overlapping runs").

The lease is a POSIX record lock (fcntl) on `<store>/_leases/<name>.lease`, which also holds the
owner as JSON. The kernel releases the lock when its process ends in any way (SIGKILL and OOM kill
included), so a lease expires exactly when its owner is dead; a child process does not inherit it.
On NFS the lock goes through the server's lock manager and is released when the owner's host is
gone. POSIX locks belong to the process and closing any descriptor of the file drops them, so this
module keeps the one descriptor a process has per lease and never opens a held lease's file again.
An object-store store (s3://) has no such lock: the lease is recorded as not held there
(`locked: False`), and overlapping runs must be prevented by the orchestrator (a Prefect
concurrency limit).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from storage.runs import owner_fields, process_gone

_HELD: dict[str, tuple[int, dict]] = {}  # lease path -> (descriptor, owner) held by this process
_GUARD = threading.Lock()


class RunLeaseHeld(RuntimeError):
    """Another run holds the lease: one line naming it."""

    def __init__(self, what: str, owner: dict, path: str):
        self.owner, self.path = owner, path
        if owner.get("pid"):
            who = (f"process {owner['pid']} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
                   + (" (gone: the lock is held by a process it left behind)"
                      if owner.get("host") and _gone(owner) else ""))
        else:
            who = "a process that has not written its name yet"
        super().__init__(f"another run is extracting {what}: {who}; this run did not start "
                         f"(lease {path})")


def _gone(owner: dict) -> bool:
    import socket

    return owner.get("host") == socket.gethostname() and process_gone(int(owner["pid"]), owner["pid_started"])


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # being written
        return {}


def holder(path: str) -> dict | None:
    """The owner of the lease at `path`, or None when nobody holds it. Never waits."""
    with _GUARD:
        if path in _HELD:
            return _HELD[path][1]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # read-only: works on a read-only store
        except FileNotFoundError:
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with the holder's exclusive lock
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return _read(fd)
        finally:
            os.close(fd)  # this process held no lock on it: nothing of ours is dropped
        return None


@contextmanager
def run_lease(path: str, what: str) -> Iterator[dict]:
    """Hold the lease at `path` for the body, or raise RunLeaseHeld at once. Yields the owner
    written into it: {host, pid, pid_started, started}. `what` names the work in the message."""
    with _GUARD:
        if path in _HELD:
            raise RunLeaseHeld(what, _HELD[path][1], path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _read(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise RunLeaseHeld(what, owner, path) from None
            raise
        owner = {**owner_fields(), "started": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner, sort_keys=True).encode(), 0)
        _HELD[path] = (fd, owner)
    try:
        yield owner
    finally:
        with _GUARD:
            os.ftruncate(fd, 0)
            del _HELD[path]
            os.close(fd)  # releases the lock
