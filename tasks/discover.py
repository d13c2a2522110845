"""Find the videos to process and fingerprint their contents.

A source is one of:
- a directory: every video file below it (by extension), video_id = path relative to the
  directory without the extension (`videos/17.mp4` under `videos/` -> "17");
- a manifest file (.txt: one path or URI per line; .csv: a `uri` or `file` column, optional
  `video_id` column); relative paths are relative to the manifest's folder;
- a list of paths / URIs given directly.
URIs other than local paths (s3://, gs://, https://, ...) are read through fsspec.

Every path found ends as a ref. One that cannot be processed carries a `problem` ("Kind: why"), and
the flow turns it into a failure row: a file name that is not valid UTF-8 (its id and uri keep the
raw bytes, escaped as \\xNN), a dangling symlink, a symlink loop, a directory symlink that points
back to one of its parents (not followed), a directory that cannot be listed, a manifest line
naming a missing file, anything that is not a regular file (`NotARegularFile`: a FIFO, a device, a
socket; never opened, so it cannot hang a run), and two files that map to one video id
(`DuplicateVideoId`: `x.mp4` and `x.mkv` in one folder; neither is extracted until one is renamed,
the rest of the source goes on). Symlinks to directories elsewhere are followed.

Hashing bounds every read: an open or a 1 MiB read that makes no progress for `read_timeout_s`
(a stalled network mount) gives up on that file with a `ReadTimeout` problem, which is transient
(`is_transient`): the next run tries the file again. The stalled read itself cannot be cancelled
(the kernel holds it); it is left in a daemon thread that never blocks the process from exiting.

A hashed ref records the file's stat (size, mtime_ns, ctime_ns, inode) as it was hashed, so
`changed_since_hash(ref)` can tell cheaply, after decoding, whether the file changed since its
hash was taken (it rehashes only when the stat differs).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".flv", ".ts", ".mpg", ".mpeg"}
_CHUNK = 1 << 20
READ_TIMEOUT_S = 60.0  # an open or one chunk read making no progress this long: a ReadTimeout
# Problem kinds that a later run may not meet again: a stalled read, a file changed while processed.
TRANSIENT_PROBLEMS = frozenset({"ReadTimeout", "ContentChanged"})
# A file modified this close to its hashing has an untrusted stat: a rewrite within the file
# system's timestamp granularity could keep mtime and size (git's "racily clean" files).
_RACY_NS = 2_000_000_000


@dataclass(frozen=True, slots=True)  # slots: a night's refs are 100,000s of them
class VideoRef:
    video_id: str
    uri: str  # absolute local path or a URI
    bytes: int = -1
    content_sha256: str = ""
    problem: str = ""  # "Kind: why" when the path cannot be processed (see the module docstring)
    # (size, mtime_ns, ctime_ns, inode) of a local file as found, then as hashed (None: racy, see
    # hash_video); None for a URI
    stat: tuple[int, int, int, int] | None = None
    # An object's "etag-or-version:size:last-modified" as listed, then as hashed; "" for a local file
    object_sig: str = ""


def signature(ref: VideoRef) -> str:
    """What the file looks like without reading it, as the change check compares it with the
    signature recorded when its hash was taken: local "local:size:mtime_ns:ctime_ns:inode", an
    object "object:etag:size:last-modified"; "" when unknown (the file is hashed)."""
    if ref.stat is not None:
        size, mtime, ctime, inode = ref.stat
        return f"local:{size}:{mtime}:{ctime}:{inode}"
    return f"object:{ref.object_sig}" if ref.object_sig else ""


class NotARegularFile(OSError):
    """A FIFO, device, socket or directory where a video file was expected (never read)."""


class ReadTimeout(TimeoutError):
    """An open or a read made no progress for the read timeout (a stalled mount or network)."""


def is_transient(problem: str) -> bool:
    """Whether a ref's problem ("Kind: why") may go away by itself (a stalled mount): the run that
    met it should count it as a transient failure, not as a broken file."""
    return problem.split(":", 1)[0] in TRANSIENT_PROBLEMS


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


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
    try:
        st = os.stat(resolved)  # stat never opens: a FIFO or a device cannot block here
    except OSError as e:
        return VideoRef(video_id, str(path), problem=f"{type(e).__name__}: {e}")
    if not stat.S_ISREG(st.st_mode):
        shown = f"{path} -> {resolved}" if resolved != path else str(path)
        return VideoRef(video_id, str(path), problem=f"NotARegularFile: {shown} is {_kind(st.st_mode)}, not a video file")
    return VideoRef(video_id=video_id, uri=str(resolved), stat=_signature(st))


def _object_sig(info: dict) -> str:
    """An object's signature from fsspec's info/listing (s3fs: ETag, VersionId, size, LastModified)."""
    # ETag first: a listing gives it, while a version id comes only from a HEAD of a versioned bucket
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("VersionId") or ""
    when = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or info.get("updated") or ""
    return f"{str(tag).strip(chr(34))}:{info.get('size', '')}:{when}"


def _from_prefix(uri: str) -> list[VideoRef] | None:
    """Video objects under an object-store prefix (one listing: their metadata comes with it), or
    None when `uri` names one object."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()  # fsspec keeps listings per filesystem: a long-lived process must list anew
    if not fs.isdir(path):
        return None
    protocol = uri.split("://", 1)[0]
    root = path.rstrip("/")
    refs = []
    for name, info in sorted(fs.find(root, detail=True).items()):
        if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
            rel = name[len(root):].lstrip("/")
            refs.append(VideoRef(str(Path(rel).with_suffix("").as_posix()), f"{protocol}://{name}",
                                 object_sig=_object_sig(info)))
    return refs


def _from_directory(root: Path) -> list[VideoRef]:
    """Video files below root in sorted path order, following directory symlinks but never into one
    of their own parents. A plain regular file costs one lstat (its signature comes with it);
    symlinks, odd names and anything not regular take the careful path (_file_ref)."""
    refs: list[VideoRef] = []

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def walk(folder: Path, real_folder: str, prefix: str, parents: frozenset[str]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            refs.append(VideoRef(rel(folder), str(folder), problem=f"UnreadableDirectory: {e}"))
            return
        for entry in entries:
            link = entry.is_symlink()
            # A link is followed (pathlib: False for a dangling link or a loop); else d_type, no stat.
            if Path(entry.path).is_dir() if link else entry.is_dir(follow_symlinks=False):
                path = Path(entry.path)
                real = os.path.realpath(path)
                if real in parents:
                    refs.append(VideoRef(rel(path), str(path),
                                         problem=f"SymlinkLoop: {path} -> {real} is one of its parents, not followed"))
                else:
                    walk(path, real, f"{prefix}{entry.name}/", parents | {real})
                continue
            stem, dot, ext = entry.name.rpartition(".")
            if not stem or f"{dot}{ext}".lower() not in VIDEO_EXTENSIONS:  # ".mp4" alone has no stem
                continue
            if link or not entry.is_file(follow_symlinks=False) or escape_name(entry.path) != entry.path:
                refs.append(_file_ref(prefix + stem, Path(entry.path)))
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:  # gone since the listing
                refs.append(VideoRef(prefix + stem, entry.path, problem=f"{type(e).__name__}: {e}"))
                continue
            refs.append(VideoRef(prefix + stem, os.path.join(real_folder, entry.name), stat=_signature(st)))

    real_root = os.path.realpath(root)
    walk(root, real_root, "", frozenset({real_root}))
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
            for r, (line, _, _) in zip(refs, entries, strict=True)]


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
            refs = _from_prefix(text) or [VideoRef(video_id=_video_id_from_uri(text), uri=text)]
        elif path.is_dir():
            refs = _from_directory(path)
        elif path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
            refs = [_resolve(text, Path.cwd())]
        elif path.is_file():
            refs = _from_manifest(path)
        elif path.exists():
            raise ValueError(f"video source {escape_name(text)} is {_kind(path.stat().st_mode)}, "
                             "not a directory, a manifest or a video file")
        else:
            raise FileNotFoundError(f"video source not found: {escape_name(text)}")
    return _one_ref_per_id(refs)


def _one_ref_per_id(refs: list[VideoRef]) -> list[VideoRef]:
    """Refs with distinct video ids, in order. The same uri named twice is one ref; different files
    with one id (`x.mp4` and `x.mkv`) become one ref with a DuplicateVideoId problem naming them all
    (one failure row per id: which file is video x cannot be guessed, so neither is extracted)."""
    by_id: dict[str, list[VideoRef]] = {}
    for ref in refs:
        same = by_id.setdefault(ref.video_id, [])
        if all(r.uri != ref.uri for r in same):
            same.append(ref)
    out = []
    for vid, same in by_id.items():
        if len(same) == 1:
            out.append(same[0])
        else:
            names = " and ".join(r.uri for r in same)
            out.append(VideoRef(vid, same[0].uri, problem=f"DuplicateVideoId: {names} map to one video id "
                                f"{vid!r}; neither is extracted until all but one are renamed or removed"))
    return out


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _open_local(path: str):
    """(file object, stat) of a regular file. Opened non-blocking, so a FIFO put in a video's place
    after discovery cannot block the open; anything not regular raises NotARegularFile unread."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(f"{path} is {_kind(st.st_mode)}, not a video file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def open_bytes(uri: str):
    """A binary file object for a local path (regular files only, see _open_local) or any fsspec URI."""
    if _is_remote(uri):
        import fsspec

        return fsspec.open(uri, "rb").open()
    return _open_local(_local(uri))[0]


def hash_video(ref: VideoRef, progress: Callable[[], None] | None = None) -> VideoRef:
    """Fill in `bytes`, `content_sha256` and (local files) `stat` by streaming the file once;
    `progress()` is called after the open and after each chunk read."""
    digest, size, sig, started = hashlib.sha256(), 0, None, time.time_ns()
    object_sig = ""
    if _is_remote(ref.uri):
        object_sig = remote_signature(ref.uri)
        fh = open_bytes(ref.uri)
    else:
        fh, st = _open_local(_local(ref.uri))
        sig = _signature(st)
    with fh:
        while True:
            if progress is not None:
                progress()
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    if sig is not None and (_signature(os.stat(_local(ref.uri))) != sig or sig[1] >= started - _RACY_NS):
        sig = None  # written to while read, or too recently to trust: changed_since_hash rehashes
    if object_sig and remote_signature(ref.uri) != object_sig:
        object_sig = ""  # replaced while read: not recorded, so the next run reads it again
    return replace(ref, bytes=size, content_sha256=digest.hexdigest(), stat=sig, object_sig=object_sig)


def remote_signature(uri: str) -> str:
    """An object's signature from one metadata request (no bytes read)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(path)
    return _object_sig(fs.info(path))


def changed_since_hash(ref: VideoRef, rehash: Callable[[VideoRef], VideoRef] = hash_video) -> str | None:
    """Why the file of a hashed ref no longer holds the content it was hashed as, or None when it
    still does. Cheap: one stat; the file is hashed again only when its stat differs from the one
    recorded at hash time (size, mtime_ns, ctime_ns, inode), or none was recorded (a file modified
    within 2 s of its hashing, whose stat cannot be trusted). Call it after decoding a file: a
    reason means the decoded frames may be another content than `ref.content_sha256`, so the
    result must not be stored under that hash (a transient failure: the next run takes the new
    content). URIs other than local files are not checked (None)."""
    if _is_remote(ref.uri) or not ref.content_sha256:
        return None
    path = _local(ref.uri)
    try:
        sig = _signature(os.stat(path))
    except OSError as e:
        return f"ContentChanged: {path} cannot be read any more since it was hashed ({e.strerror})"
    if ref.stat is not None and sig == ref.stat:
        return None
    try:
        now = rehash(replace(ref, bytes=-1, content_sha256="", stat=None)).content_sha256
    except OSError as e:
        return f"ContentChanged: {path} cannot be read any more since it was hashed ({type(e).__name__}: {e})"
    if now != ref.content_sha256:
        return f"ContentChanged: {path} changed while it was processed (sha256 {ref.content_sha256[:12]}… -> {now[:12]}…)"
    return None


def hash_videos(refs: Iterable[VideoRef], workers: int = 4, read_timeout_s: float = READ_TIMEOUT_S
                ) -> tuple[list[VideoRef], list[tuple[VideoRef, str]]]:
    """Hash many files in a few threads (hashlib releases the GIL), in the refs' order.

    Returns (hashed refs, [(ref, "Kind: why")] for files that could not be read, refs with a
    problem, and files whose open or read made no progress for `read_timeout_s`: `ReadTimeout`,
    see the module docstring). Worker threads are daemons: a read stuck in the kernel is left
    behind (its thread replaced) and never keeps the process from exiting.
    """
    refs = list(refs)
    results: dict[int, tuple[VideoRef, str | None]] = {}
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(refs)):
        todo.put(i)
    done: queue.SimpleQueue[tuple[int, int | None, tuple[VideoRef, str | None] | None]] = queue.SimpleQueue()
    # worker id -> [ref index being read or None, time of its last progress, abandoned]
    state: dict[int, list] = {}

    def work(wid: int) -> None:
        me = state[wid]
        while not me[2]:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                break
            me[0], me[1] = i, time.monotonic()
            ref = refs[i]
            if ref.problem:  # found but not processable: recorded as a failure, never opened
                result: tuple[VideoRef, str | None] = (ref, ref.problem)
            else:
                try:
                    result = (hash_video(ref, progress=lambda: me.__setitem__(1, time.monotonic())), None)
                except OSError as e:
                    result = (ref, f"{type(e).__name__}: {e}")
            me[0] = None
            done.put((wid, i, result))
        done.put((wid, None, None))

    def start() -> None:
        wid = len(state)
        state[wid] = [None, time.monotonic(), False]
        threading.Thread(target=work, args=(wid,), name=f"hash-videos-{wid}", daemon=True).start()

    running = min(max(1, workers), len(refs))
    for _ in range(running):
        start()
    while running:
        busy = [(wid, s) for wid, s in state.items() if not s[2] and s[0] is not None]
        wait = min((s[1] + read_timeout_s for _, s in busy), default=None)
        try:
            wid, i, result = done.get(timeout=None if wait is None else max(0.0, wait - time.monotonic()))
        except queue.Empty:
            now = time.monotonic()
            for _, s in busy:
                if s[0] is not None and now - s[1] >= read_timeout_s:  # stalled: give up on this file
                    ref = refs[s[0]]
                    results[s[0]] = (ref, f"ReadTimeout: no progress reading {ref.uri} for {read_timeout_s:g} s "
                                          "(a stalled mount or network?); the next run tries it again")
                    s[2] = True
                    start()  # a fresh thread for the rest; this one stays stuck in its read
            continue
        if state[wid][2]:
            continue  # a read given up on that returned after all: its file is already a ReadTimeout
        if i is None:
            running -= 1
        else:
            results[i] = result
    hashed = [results[i][0] for i in range(len(refs)) if results[i][1] is None]
    unreadable = [(results[i][0], results[i][1]) for i in range(len(refs)) if results[i][1] is not None]
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
