"""Decode a video file into a few RGB frames plus the metadata a Qwen-VL processor needs.

    video = decode("clip.mp4", policy="uniform:8")      # -> tasks.lvlm.VideoInput
    video.frames                                         # uint8 (T, H, W, 3), upright, <= max_pixels each
    video.meta.frames_indices, video.meta.fps, ...       # tasks.lvlm.VideoMeta

Steps: check the file (size), probe it with PyAV (stream, duration, rotation), choose the frame
indices from the policy, then read just those frames with decord, resized inside the decoder to
the pixel budget. decord cannot read some codecs and containers (AV1 among them); then PyAV
decodes the stream sequentially instead.

Policies:
    uniform:N   N frames spread evenly over the whole video (fewer if the video has fewer frames)
    fps:F       F frames per second of video, at most max_frames, spread evenly
Every policy returns at least 2 frames (a Qwen-VL temporal patch spans 2 frames; a one-frame
video repeats its frame).

A video of which fewer frames decode than its header promises (a damaged or cut stream) is kept
with `meta.partial` set and counted on what decoded (frames, duration), or refused with
PartialVideo when allow_partial is False.

Failures raise a DecodeError subclass carrying `path` and `reason`. They are permanent: the same
file fails the same way again, so callers should record them rather than retry.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mvrec.config import Policy, parse_policy
from tasks.lvlm import VideoInput, VideoMeta

DEFAULT_POLICY = "uniform:8"
MIN_FRAMES = 2  # one temporal patch
SIZE_MULTIPLE = 28  # Qwen2.5-VL patch 14 x merge 2; the processor resizes to it anyway


# ---------------------------------------------------------------------------------------------
# errors


class DecodeError(ValueError):
    """A video that cannot be turned into frames. Permanent: retrying gives the same result."""

    permanent = True

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep path and reason when pickled to another process
        return type(self), (self.path, self.reason)


class Unreadable(DecodeError):
    """Not a media file, truncated, or corrupt."""


class NoVideoStream(DecodeError):
    """A media file without a video stream (e.g. audio only)."""


class ZeroFrames(DecodeError):
    """A video stream that yields no frames."""


class TooLong(DecodeError):
    """Longer than max_duration_s."""


class TooLarge(DecodeError):
    """Bigger on disk than max_file_bytes."""


class PartialVideo(DecodeError):
    """Fewer frames decode than the header promises; raised only when partial videos are refused."""


# ---------------------------------------------------------------------------------------------
# policies (parsed by mvrec.config.parse_policy, the one parser)


def frame_indices(policy: Policy, total_frames: int, fps: float, max_frames: int) -> list[int]:
    """Source frame indices to read, evenly spread from the first to the last frame."""
    if policy.kind == "uniform":
        n = int(policy.value)
    else:
        n = int(round(total_frames / max(fps, 1e-6) * policy.value))
    n = max(MIN_FRAMES, min(n, max_frames, total_frames))
    return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def target_size(width: int, height: int, max_pixels: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(width, height) within max_pixels, aspect kept, each a multiple of `multiple`. Never upscales
    more than the rounding to `multiple` needs."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    if w * h > max_pixels:  # rounding went over the budget: round down instead
        w = max(multiple, math.floor(width * scale / multiple) * multiple)
        h = max(multiple, math.floor(height * scale / multiple) * multiple)
    return w, h


# ---------------------------------------------------------------------------------------------
# probing


@dataclass
class _Probe:
    width: int  # as stored (before rotation)
    height: int
    fps: float
    total_frames: int  # 0 when the container does not say
    duration_s: float
    rotation: int  # degrees counter-clockwise to display upright: 0, 90, 180, 270


def _probe(path: str, max_duration_s: float) -> _Probe:
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise Unreadable(path, f"not a readable media file ({_short(e)})") from None
    with container:
        if not container.streams.video:
            raise NoVideoStream(path, "the file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1e6  # AV_TIME_BASE
        else:
            duration = 0.0
        total = int(stream.frames or 0)
        if duration > max_duration_s:
            raise TooLong(path, f"duration {duration:.1f} s exceeds max_duration_s={max_duration_s:g}")
        # Rotation lives in the display matrix; PyAV exposes it on decoded frames only.
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as e:
            raise Unreadable(path, f"cannot decode the first frame ({_short(e)})") from None
        if first is None:
            raise ZeroFrames(path, "the video stream has no decodable frames")
        rotation = int(first.rotation or 0) % 360
        return _Probe(stream.width or first.width, stream.height or first.height, fps, total, duration, rotation)


def _short(e: BaseException) -> str:
    """One line of an error, without the path it repeats."""
    text = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return text[-1][:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# decoders


def _decode_decord(path: str, policy: Policy, max_frames: int, out_w: int, out_h: int):
    import decord

    kwargs = {"width": out_w, "height": out_h}  # decord sizes refer to the upright frame
    reader = decord.VideoReader(path, ctx=decord.cpu(0), **kwargs)
    total, fps = len(reader), float(reader.get_avg_fps())
    indices = frame_indices(policy, total, fps, max_frames)
    frames = reader.get_batch(indices).asnumpy()
    del reader
    return frames, indices, total, fps, False


def _decode_pyav(path: str, policy: Policy, max_frames: int, out_w: int, out_h: int, probe: _Probe):
    import av

    # Reformat to the stored orientation, then rotate upright.
    k = probe.rotation // 90
    store_w, store_h = (out_h, out_w) if k % 2 else (out_w, out_h)

    def read(indices: list[int]) -> tuple[dict[int, np.ndarray], int, bool]:
        wanted, got, count, damaged = set(indices), {}, 0, False
        stop = max(indices) if probe.total_frames else None  # trust the header: stop early
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            try:
                for i, frame in enumerate(container.decode(stream)):
                    count = i + 1
                    if i in wanted:
                        rgb = frame.reformat(width=store_w, height=store_h, format="rgb24").to_ndarray()
                        got[i] = np.rot90(rgb, k) if k else rgb
                    if stop is not None and i >= stop:
                        break
            except av.error.FFmpegError as e:
                if not got:
                    raise Unreadable(path, f"decoding failed ({_short(e)})") from None
                damaged = True  # a damaged tail: keep the frames before it
        return got, count, damaged

    total = probe.total_frames or max(1, round(probe.duration_s * probe.fps))
    indices = frame_indices(policy, total, probe.fps or 1.0, max_frames)
    got, count, damaged = read(indices)
    if count == 0:
        raise ZeroFrames(path, "the video stream has no decodable frames")
    if any(i not in got for i in indices):  # the header over-counted: plan again on what exists
        total = count if count < total else total
        indices = frame_indices(policy, total, probe.fps or 1.0, max_frames)
        if any(i not in got for i in indices):
            got, _, _ = read(indices)
        if any(i not in got for i in indices):
            raise ZeroFrames(path, f"only {len(got)} of the {len(indices)} requested frames decode")
    frames = np.stack([got[i] for i in indices])
    return np.ascontiguousarray(frames), indices, total, probe.fps, damaged


def _is_partial(found: int, probe: _Probe, damaged: bool) -> bool:
    """Fewer frames than the header promises: its frame count, else duration x fps (with one frame
    plus 2% of slack for rounding unless a decode error cut the stream)."""
    if probe.total_frames:
        return found < probe.total_frames
    promised = round(probe.duration_s * probe.fps)
    return found < promised and (damaged or found < promised - 1 - 0.02 * promised)


def decode(
    path: str | os.PathLike,
    policy: str = DEFAULT_POLICY,
    max_frames: int = 32,
    max_pixels: int = 224 * 224,
    max_duration_s: float = 3600.0,
    max_file_bytes: int = 2 * 1024**3,
    video_id: str | None = None,
    backend: str = "auto",
    allow_partial: bool = True,
) -> VideoInput:
    """Frames (uint8 T,H,W,3, upright, each <= max_pixels) and metadata for one video file.

    backend: auto (decord, PyAV where decord fails) | decord | pyav.
    allow_partial: keep a video of which fewer frames decode than its header promises (flagged
    `meta.partial`, counted on what decoded); False raises PartialVideo instead.
    Raises ValueError for bad parameters and a DecodeError subclass for a bad file.
    """
    plan = parse_policy(policy)
    if max_frames < MIN_FRAMES:
        raise ValueError(f"max_frames: must be at least {MIN_FRAMES}, got {max_frames}")
    if max_pixels < SIZE_MULTIPLE * SIZE_MULTIPLE:
        raise ValueError(f"max_pixels: must be at least {SIZE_MULTIPLE}x{SIZE_MULTIPLE}, got {max_pixels}")
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend: {backend!r} is not auto, decord or pyav")
    path = os.fspath(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise Unreadable(path, "file not found") from None
    except OSError as e:
        raise Unreadable(path, f"cannot stat the file ({e.strerror})") from None
    if size == 0:
        raise Unreadable(path, "empty file (0 bytes)")
    if size > max_file_bytes:
        raise TooLarge(path, f"{size} bytes exceeds max_file_bytes={max_file_bytes}")

    probe = _probe(path, max_duration_s)
    upright_w, upright_h = (probe.height, probe.width) if probe.rotation in (90, 270) else (probe.width, probe.height)
    out_w, out_h = target_size(upright_w, upright_h, max_pixels)

    result, used = None, "pyav"
    if backend in ("auto", "decord"):
        try:
            result = _decode_decord(path, plan, max_frames, out_w, out_h)
            used = "decord"
            if result[0].shape[1:] != (out_h, out_w, 3):  # decord disagreed on orientation
                result = None
        except Exception as e:  # decord raises bare DECORDError/RuntimeError on codecs it lacks
            if backend == "decord":
                raise Unreadable(path, f"decord cannot read it ({_short(e)})") from None
            result = None
    if result is None:
        used = "pyav"
        result = _decode_pyav(path, plan, max_frames, out_w, out_h, probe)
    frames, indices, total, fps, damaged = result
    partial = _is_partial(total, probe, damaged)
    if partial and not allow_partial:
        promised = probe.total_frames or round(probe.duration_s * probe.fps)
        raise PartialVideo(path, f"only {total} of the {promised} frames the header promises decode "
                                 "(partial videos refused: extract.partial = \"fail\")")
    if fps <= 0:
        fps = probe.fps or 1.0
    meta = VideoMeta(
        path=path,
        fps=fps,
        total_num_frames=total,
        frames_indices=[int(i) for i in indices],
        width=out_w,
        height=out_h,
        duration_s=total / fps if partial else probe.duration_s or total / fps,
        backend=used,
        source_width=upright_w,
        source_height=upright_h,
        rotation=probe.rotation,
        partial=partial,
    )
    return VideoInput(video_id=video_id or Path(path).stem, frames=frames, meta=meta)
