"""Small real video files encoded with PyAV, for the decode and extraction tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


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
