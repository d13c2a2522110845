"""Find the videos to process and fingerprint their contents.

A source is one of:
- a directory: every video file below it (by extension), video_id = path relative to the
  directory without the extension (`videos/17.mp4` under `videos/` -> "17");
- a manifest file (.txt: one path or URI per line; .csv: a `uri` or `file` column, optional
  `video_id` column); relative paths are relative to the manifest's folder;
- a list of paths / URIs given directly.
URIs other than local paths (s3://, gs://, https://, ...) are read through fsspec.
"""

from __future__ import annotations

import csv
import hashlib
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


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _from_directory(root: Path) -> list[VideoRef]:
    refs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS):
        video_id = path.relative_to(root).with_suffix("").as_posix()
        refs.append(VideoRef(video_id=video_id, uri=str(path.resolve())))
    return refs


def _video_id_from_uri(uri: str) -> str:
    return Path(uri.rstrip("/").rsplit("/", 1)[-1]).stem


def _resolve(entry: str, base: Path) -> str:
    if _is_remote(entry):
        return entry
    path = Path(_local(entry)).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def _from_manifest(manifest: Path) -> list[VideoRef]:
    base = manifest.parent
    refs: list[VideoRef] = []
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="") as fh:
            reader = csv.DictReader(fh)
            column = next((c for c in ("uri", "file", "path") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise ValueError(f"{manifest}: a manifest CSV needs a 'uri', 'file' or 'path' column")
            for line_no, row in enumerate(reader, start=2):
                entry = (row.get(column) or "").strip()
                if not entry:
                    raise ValueError(f"{manifest}:{line_no}: empty {column!r}")
                uri = _resolve(entry, base)
                refs.append(VideoRef(video_id=(row.get("video_id") or "").strip() or _video_id_from_uri(uri), uri=uri))
    else:
        for line in manifest.read_text().splitlines():
            entry = line.strip()
            if entry and not entry.startswith("#"):
                uri = _resolve(entry, base)
                refs.append(VideoRef(video_id=_video_id_from_uri(uri), uri=uri))
    return refs


def discover_videos(source: str | Path | Sequence[str]) -> list[VideoRef]:
    """All videos named by a directory, a manifest file, or a list of paths/URIs, in stable order.

    Raises FileNotFoundError naming the source, or ValueError for duplicate video ids.
    """
    if isinstance(source, (list, tuple)):
        refs = [VideoRef(video_id=_video_id_from_uri(u), uri=_resolve(str(u), Path.cwd())) for u in source]
    else:
        text = str(source)
        path = Path(_local(text)).expanduser()
        if _is_remote(text):
            refs = [VideoRef(video_id=_video_id_from_uri(text), uri=text)]
        elif path.is_dir():
            refs = _from_directory(path)
        elif path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
            refs = [VideoRef(video_id=path.stem, uri=str(path.resolve()))]
        elif path.is_file():
            refs = _from_manifest(path)
        else:
            raise FileNotFoundError(f"video source not found: {text}")
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

    Returns (hashed refs, [(ref, reason)] for files that could not be read).
    """
    refs = list(refs)
    hashed: list[VideoRef] = []
    unreadable: list[tuple[VideoRef, str]] = []

    def one(ref: VideoRef):
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
