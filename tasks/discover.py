"""Find the videos to process and fingerprint their contents.

A source is one of:
- a directory: every video file below it (by extension), video_id = path relative to the
  directory without the extension (`videos/17.mp4` under `videos/` -> "17");
- a manifest file (.txt: one path or URI per line; .csv: a `uri` or `file` column, optional
  `video_id` column); relative paths are relative to the manifest's folder;
- a list of paths / URIs given directly.
URIs other than local paths (s3://, gs://, https://, ...) are read through fsspec.

Every path found ends as a ref. One that cannot be processed carries a `problem` ("Kind: why"), and
the flow turns it into a permanent failure row: a file name that is not valid UTF-8 (its id and
uri keep the raw bytes, escaped as \\xNN), a dangling symlink, a symlink loop, a directory symlink
that points back to one of its parents (not followed), a directory that cannot be listed, a
manifest line naming a missing file. Symlinks to directories elsewhere are followed.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".flv", ".ts", ".mpg", ".mpeg"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VideoRef:
    video_id: str
    uri: str  # absolute local path or a URI
    bytes: int = -1
    content_sha256: str = ""
    problem: str = ""  # "Kind: why" when the path cannot be processed (see the module docstring)


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def escape_name(text: str) -> str:
    """A path as valid UTF-8: bytes that are not (os.fsdecode's surrogates) become \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _file_ref(video_id: str, path: Path) -> VideoRef:
    """A ref for a local video file, with a problem when it cannot be read as one."""
    path = Path(os.path.abspath(path))
    if escape_name(str(path)) != str(path):
        return VideoRef(escape_name(video_id), escape_name(str(path)),
                        problem="UndecodableName: file name is not valid UTF-8 (bytes shown as \\xNN)")
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        kind = "DanglingSymlink" if path.is_symlink() else "MissingFile"
        why = f"{path} -> {os.readlink(path)} does not exist" if path.is_symlink() else f"{path} does not exist"
        return VideoRef(video_id, str(path), problem=f"{kind}: {why}")
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError for a symlink loop
        if isinstance(e, RuntimeError) or e.errno == errno.ELOOP:
            return VideoRef(video_id, str(path), problem=f"SymlinkLoop: {path} is a symlink loop")
        return VideoRef(video_id, str(path), problem=f"{type(e).__name__}: {e}")
    return VideoRef(video_id=video_id, uri=str(resolved))


def _from_directory(root: Path) -> list[VideoRef]:
    """Video files below root in sorted path order, following directory symlinks but never into one
    of their own parents."""
    refs: list[VideoRef] = []

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def walk(folder: Path, parents: frozenset[str]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            refs.append(VideoRef(rel(folder), str(folder), problem=f"UnreadableDirectory: {e}"))
            return
        for entry in entries:
            path = Path(entry.path)
            if path.is_dir():  # follows symlinks; False for a dangling link or a loop
                real = os.path.realpath(path)
                if real in parents:
                    refs.append(VideoRef(rel(path), str(path),
                                         problem=f"SymlinkLoop: {path} -> {real} is one of its parents, not followed"))
                else:
                    walk(path, parents | {real})
            elif path.suffix.lower() in VIDEO_EXTENSIONS:
                refs.append(_file_ref(path.relative_to(root).with_suffix("").as_posix(), path))

    walk(root, frozenset({os.path.realpath(root)}))
    return refs


def _video_id_from_uri(uri: str) -> str:
    return Path(uri.rstrip("/").rsplit("/", 1)[-1]).stem


def _resolve(entry: str, base: Path, video_id: str | None = None) -> VideoRef:
    """A ref for one entry of a manifest or a path list (relative to `base`)."""
    if _is_remote(entry):
        return VideoRef(video_id or _video_id_from_uri(entry), entry)
    path = Path(_local(entry)).expanduser()
    path = path if path.is_absolute() else base / path
    return _file_ref(video_id or path.stem, path)


def _from_manifest(manifest: Path) -> list[VideoRef]:
    """Refs for a manifest's entries; a missing local file is a ref whose problem names the line."""
    base = manifest.parent
    entries: list[tuple[int, str, str | None]] = []  # (line, path or URI, video_id)
    # surrogateescape: a path that is not valid UTF-8 becomes an UndecodableName ref, not a crash.
    with manifest.open(newline="", errors="surrogateescape") as fh:
        if manifest.suffix.lower() == ".csv":
            reader = csv.DictReader(fh)
            column = next((c for c in ("uri", "file", "path") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise ValueError(f"{manifest}: a manifest CSV needs a 'uri', 'file' or 'path' column")
            for line_no, row in enumerate(reader, start=2):
                entry = (row.get(column) or "").strip()
                if not entry:
                    raise ValueError(f"{manifest}:{line_no}: empty {column!r}")
                entries.append((line_no, entry, (row.get("video_id") or "").strip() or None))
        else:
            for line_no, line in enumerate(fh.read().splitlines(), start=1):
                if line.strip() and not line.strip().startswith("#"):
                    entries.append((line_no, line.strip(), None))
    refs = [_resolve(entry, base, video_id) for _, entry, video_id in entries]
    return [replace(r, problem=f"{r.problem} (named on {manifest}:{line})") if r.problem else r
            for r, (line, _, _) in zip(refs, entries)]


def discover_videos(source: str | Path | Sequence[str]) -> list[VideoRef]:
    """All videos named by a directory, a manifest file, or a list of paths/URIs, in stable order;
    paths that cannot be processed are refs with a `problem`.

    Raises FileNotFoundError naming the source, or ValueError for duplicate video ids.
    """
    if isinstance(source, (list, tuple)):
        refs = [_resolve(str(u), Path.cwd()) for u in source]
    else:
        text = str(source)
        path = Path(_local(text)).expanduser()
        if _is_remote(text):
            refs = [VideoRef(video_id=_video_id_from_uri(text), uri=text)]
        elif path.is_dir():
            refs = _from_directory(path)
        elif path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
            refs = [_resolve(text, Path.cwd())]
        elif path.is_file():
            refs = _from_manifest(path)
        else:
            raise FileNotFoundError(f"video source not found: {escape_name(text)}")
    seen: dict[str, str] = {}
    for ref in refs:
        if ref.video_id in seen:
            raise ValueError(f"duplicate video_id {ref.video_id!r}: {seen[ref.video_id]} and {ref.uri}")
        seen[ref.video_id] = ref.uri
    return refs


def open_bytes(uri: str):
    """A binary file object for a local path or any fsspec URI."""
    if _is_remote(uri):
        import fsspec

        return fsspec.open(uri, "rb").open()
    return open(_local(uri), "rb")


def hash_video(ref: VideoRef) -> VideoRef:
    """Fill in `bytes` and `content_sha256` by streaming the file once."""
    digest, size = hashlib.sha256(), 0
    with open_bytes(ref.uri) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return replace(ref, bytes=size, content_sha256=digest.hexdigest())


def hash_videos(refs: Iterable[VideoRef], workers: int = 4) -> tuple[list[VideoRef], list[tuple[VideoRef, str]]]:
    """Hash many files in a small thread pool (hashlib releases the GIL).

    Returns (hashed refs, [(ref, reason)] for files that could not be read, or refs with a problem).
    """
    refs = list(refs)
    hashed: list[VideoRef] = []
    unreadable: list[tuple[VideoRef, str]] = []

    def one(ref: VideoRef):
        if ref.problem:  # found but not processable: recorded as a failure, never opened
            return ref, ref.problem
        try:
            return hash_video(ref), None
        except OSError as e:
            return ref, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for ref, problem in pool.map(one, refs):
            (unreadable.append((ref, problem)) if problem else hashed.append(ref))
    return hashed, unreadable


def local_copy(uri: str, cache_dir: str | Path) -> str:
    """A local path for a URI: local paths as they are, remote files copied into cache_dir once."""
    if not _is_remote(uri):
        return _local(uri)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / (hashlib.sha1(uri.encode()).hexdigest()[:16] + "-" + uri.rsplit("/", 1)[-1])
    if not target.exists():
        tmp = target.with_suffix(target.suffix + ".part")
        with open_bytes(uri) as src, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
        tmp.replace(target)
    return str(target)
