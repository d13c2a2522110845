"""Which files in a folder any process opened, from the kernel (Linux inotify through ctypes): a
test of "reads no video file" that holds for child processes and C decoders too."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_OPEN, IN_NONBLOCK = 0x20, 0o4000
_libc = ctypes.CDLL(None, use_errno=True)


class FileOpens:
    """Watch the folders given (not recursive) for opens until `opened()` is read."""

    def __init__(self, *folders: str | os.PathLike[str]):
        self.fd = _libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders: dict[int, Path] = {}
        for folder in folders:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(str(folder)), IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
            self.folders[wd] = Path(folder)

    def opened(self) -> list[Path]:
        """Every file opened since the watch began (the kernel merges back-to-back opens of one file
        into one event, so this says which files, not how often), then stop watching."""
        seen, data = [], b""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            data += chunk
        os.close(self.fd)
        while data:
            wd, mask, _, length = struct.unpack_from("iIII", data)
            name = data[16:16 + length].rstrip(b"\0").decode()
            data = data[16 + length:]
            if mask & IN_OPEN and name:
                seen.append(self.folders[wd] / name)
        return seen
