"""Is a Ray cluster answering at this address? Asked within seconds, before `ray.init`.

`ray.init(address=...)` has no time limit of its own: against an address where nothing answers it
retries "Failed to connect to GCS" for as long as it is let. Ray's GCS and its client server both
speak gRPC, which is HTTP/2: a server there answers the HTTP/2 connection preface with a SETTINGS
frame at once. So a TCP connect and one read, each with a deadline, tell a cluster from a closed
port, a host that drops packets, and a port that accepts and never answers.
"""

from __future__ import annotations

import os
import socket
import time

CONNECT_TIMEOUT_S = 5.0
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + an empty SETTINGS
_SETTINGS = 0x04


class RayUnreachable(ValueError):
    """No Ray cluster answers at the configured address (bad input: exit 2 before any work)."""


def host_port(address: str) -> tuple[str, int] | None:
    """("host", port) of "host:port" or "ray://host:port"; None for "" / "auto" / "local" with no
    RAY_ADDRESS (Ray finds or starts the cluster itself)."""
    address = address.strip()
    if address in ("", "auto"):
        address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "auto", "local"):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnreachable(f"extract.ray_address: {address!r} is not host:port or ray://host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_ray_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayUnreachable, one line naming the address, unless a gRPC server answers there within
    `timeout_s`. Returns at once for an address Ray resolves itself (empty, auto, local)."""
    target = host_port(address)
    if target is None:
        return
    host, port = target
    shown = f"{host}:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection(target, timeout=timeout_s) as sock:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(_PREFACE)
            header = _read(sock, 9)
    except socket.timeout:
        raise RayUnreachable(f"extract.ray_address: no Ray cluster answered at {shown} within {timeout_s:.0f} s; "
                             "start one (`ray start --head`) or fix the address") from None
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise RayUnreachable(f"extract.ray_address: no Ray cluster at {shown} ({why.lower()}); "
                             "start one (`ray start --head`) or fix the address") from None
    if len(header) < 9 or header[3] != _SETTINGS:
        raise RayUnreachable(f"extract.ray_address: {shown} answers, but not as a Ray cluster (no gRPC server "
                             "there); fix the address")


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
