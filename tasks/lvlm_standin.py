"""The accelerator stand-in: a backend for benchmarks and tests of the data plane, NOT a model.

It stands for GPU time. Each batch is held for a set time per video (`time.sleep`: the CPU stays
free, as it does while a GPU computes), then gets features of the right shape that are a pure
function of the frames, so runs on threads and on Ray can be compared row for row and a frame
that never arrived would show. Its features carry no meaning; its rows are labelled as a test
model (`is_test_model`).

    extract.backend = "standin"
    extract.model   = "standin:0.05"            # 50 ms per video, 5 layers + final of 64
    extract.model   = "standin:0.05:37x2048"    # the 3B shape: 37 layer outputs of 2,048
"""

from __future__ import annotations

import hashlib
import time
from typing import Sequence

import numpy as np

from tasks.lvlm import ExtractSpec, ModelInfo, VideoFeatures, VideoInput, layer_rows, parse_layers


def parse_standin(model: str) -> tuple[float, int, int]:
    """"standin:SECONDS[:ROWSxDIM]" -> (seconds per video, decoder layers L, hidden size D)."""
    parts = model.split(":")
    try:
        if parts[0] != "standin" or len(parts) not in (2, 3):
            raise ValueError
        seconds = float(parts[1])
        rows, dim = (int(x) for x in parts[2].split("x")) if len(parts) == 3 else (6, 64)
        if seconds < 0 or rows < 2 or dim < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"model: {model!r} is not a stand-in spec such as standin:0.05 or "
                         "standin:0.05:37x2048 (seconds per video, layer rows x hidden size)") from None
    return seconds, rows - 1, dim  # rows = L + 1 layer outputs (0..L); `final` is one more


class StandinBackend:
    """Holds a batch for seconds_per_video × len(batch) without using the CPU; see the module doc."""

    name = "standin"

    def __init__(self, spec: ExtractSpec):
        self.spec = spec
        self.seconds_per_video, num_layers, dim = parse_standin(spec.model)
        self.layers = parse_layers(spec.layers, num_layers)
        self.rows = layer_rows(self.layers, num_layers)
        self.info = ModelInfo(model=spec.model, revision="standin", arch="accelerator-stand-in",
                              num_layers=num_layers, hidden_size=dim, is_test_model=True, dtype="float32",
                              device="stand-in")

    def extract(self, batch: Sequence[VideoInput]) -> list[VideoFeatures]:
        t0 = time.perf_counter()
        time.sleep(self.seconds_per_video * len(batch))  # the accelerator's time, CPU idle
        out = [self._features(video) for video in batch]
        for features in out:
            features.timings = {"model_s": (time.perf_counter() - t0) / len(batch)}
        return out

    def _features(self, video: VideoInput) -> VideoFeatures:
        digest = hashlib.sha256(np.ascontiguousarray(video.frames).data).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        full = rng.standard_normal((max(self.rows) + 1, self.info.hidden_size), dtype=np.float32)
        return VideoFeatures(video_id=video.video_id, caption=f"stand-in {digest.hex()[:12]}",
                             layers=list(self.layers), hidden=full[self.rows], pooling=self.spec.pooling,
                             n_video_tokens=int(video.frames.shape[0]), n_prompt_tokens=0, n_new_tokens=0)

    def close(self) -> None:
        pass
