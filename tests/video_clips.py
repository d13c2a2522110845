"""Small real video files encoded with PyAV, for the decode and extraction tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from mvrec.devtools.demo_data import VideoSpec, encode_video


def encode_clip(path: Path, codec: str = "libx264", width: int = 224, height: int = 160, frames: int = 24,
                fps: int = 12, rotation: int | None = None, seed: int = 0) -> Path:
    """A clip whose pixels depend on seed and frame index: coloured bars that move."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(3,), dtype=np.uint8)
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if rotation is not None:
        stream.set_display_rotation(rotation)
    for i in range(frames):
        img = np.empty((height, width, 3), dtype=np.uint8)
        img[:] = base
        img[: height // 2, :, 0] = 255  # a red top half: rotation is visible in the pixels
        x = (i * 7) % max(1, width - 16)
        img[:, x : x + 16, 1] = 255  # a moving green bar
        img[..., 2] = (i * 9 + seed * 40) % 256
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def bad_files(directory: Path, good: Path) -> dict[str, Path]:
    """A zero-byte file, a truncated copy of `good` and a text file named .mp4."""
    zero = directory / "zero.mp4"
    zero.write_bytes(b"")
    truncated = directory / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: max(64, good.stat().st_size // 3)])
    text = directory / "text.mp4"
    text.write_text("this is not a video, only text with the wrong extension\n" * 20)
    return {"zero": zero, "truncated": truncated, "text": text}


def write_corrupt_files(directory: str | Path, first_id: int | None = None) -> list[Path]:
    """Write a zero-byte .mp4, a truncated .mp4, a text file named .mp4 and a truncated .mkv.

    With first_id the files are named <first_id>.mp4, <first_id+1>.mp4, ... so they look like
    corpus items; otherwise they get descriptive names.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = ["zero_bytes.mp4", "truncated.mp4", "not_a_video.mp4", "truncated.mkv"]
    if first_id is not None:
        names = [f"{first_id + i}{Path(n).suffix}" for i, n in enumerate(names)]
    paths = [d / n for n in names]

    paths[0].write_bytes(b"")

    # Truncate real videos to 40% of their bytes: the mp4 loses its moov index,
    # the mkv keeps its header but loses most frames.
    scratch = d / ".corrupt_scratch"
    for path, ext, codec in ((paths[1], "mp4", "libx264"), (paths[3], "mkv", "mpeg4")):
        spec = VideoSpec(item_id=0, topic=0, codec=codec, ext=ext, width=160, height=284, fps=15,
                         n_frames=45, seed=0, title="")
        encode_video(spec, scratch)
        data = (scratch / spec.file).read_bytes()
        path.write_bytes(data[: int(len(data) * 0.4)])
        (scratch / spec.file).unlink()

    paths[2].write_text("this is not a video, only text with a .mp4 name\n", encoding="utf-8")
    for leftover in (scratch / "videos", scratch):
        leftover.rmdir()
    return paths


def damage_after(good: Path, out: Path, first_bad: int) -> Path:
    """A copy of an H.264 `good` clip whose packets from `first_bad` on (decode order) carry
    invalid NAL units, like decord's own corrupted.mp4: the header still promises every frame."""
    with av.open(str(good)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    data = bytearray(good.read_bytes())
    rng = np.random.default_rng(0)
    for pos, size in packets[first_bad:]:
        data[pos:pos + 4] = b"\xff\xff\xff\xff"  # an impossible NAL length
        data[pos + 4:pos + size] = rng.integers(0, 256, size - 4, dtype=np.uint8).tobytes()
    out.write_bytes(bytes(data))
    return out
