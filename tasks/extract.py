"""Extract features for a list of video files with any LVLM backend: a plain function, no Prefect,
no store.

    results, failures = extract_videos(paths, backend, batch_size=4, decode_kwargs={"policy": "uniform:8"})

Decoding runs in a small thread pool a few batches ahead of the model (decord and PyAV release
the GIL), so the model rarely waits for frames. A bad file never stops the batch:
- a decode error (tasks.decode.DecodeError or anything else the decoder raises) becomes a
  Failure with stage "decode";
- a batch that runs out of memory (tasks.lvlm.BackendOOM) is split in halves and retried; a
  single video that still does not fit becomes a Failure with stage "model";
- any other model error on a batch is retried one video at a time, so only the videos that
  fail alone are reported.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from tasks.decode import DecodeError, decode
from tasks.discover import discover_videos
from tasks.lvlm import BackendOOM, LVLMBackend, VideoFeatures, VideoInput, VideoMeta


@dataclass
class Extracted:
    path: str
    features: VideoFeatures
    meta: VideoMeta
    decode_s: float


@dataclass
class Failure:
    path: str
    video_id: str
    stage: str  # decode | model
    error_type: str  # e.g. Unreadable, ZeroFrames, BackendOOM, RuntimeError
    message: str
    permanent: bool  # DecodeErrors are: the same file fails the same way again

    def to_dict(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[int, int, int], None]  # (videos done, of which failed, total)


def _decode_one(path: str, decode_kwargs: dict) -> tuple[VideoInput | None, Failure | None, float]:
    t0 = time.perf_counter()
    video_id = Path(path).stem
    try:
        video = decode(path, video_id=video_id, **decode_kwargs)
        return video, None, time.perf_counter() - t0
    except DecodeError as e:
        failure = Failure(path, video_id, "decode", type(e).__name__, e.reason, permanent=True)
    except Exception as e:  # a decoder bug or an odd file: still one failure, not a stopped run
        failure = Failure(path, video_id, "decode", type(e).__name__, str(e) or repr(e), permanent=False)
    return None, failure, time.perf_counter() - t0


def run_batch(backend: LVLMBackend, videos: list[VideoInput]) -> tuple[list[VideoFeatures | None], list[Failure]]:
    """Features in input order (None where the video failed) and the failures."""
    try:
        return list(backend.extract(videos)), []
    except BackendOOM as e:
        if len(videos) == 1:
            v = videos[0]
            return [None], [Failure(v.meta.path, v.video_id, "model", "BackendOOM", str(e), permanent=False)]
        half = len(videos) // 2
        left, lf = run_batch(backend, videos[:half])
        right, rf = run_batch(backend, videos[half:])
        return left + right, lf + rf
    except Exception as e:
        if len(videos) == 1:
            v = videos[0]
            return [None], [Failure(v.meta.path, v.video_id, "model", type(e).__name__, str(e) or repr(e), permanent=False)]
        feats, failures = [], []
        for v in videos:  # find the culprit(s)
            f, fl = run_batch(backend, [v])
            feats += f
            failures += fl
        return feats, failures


def extract_videos(
    paths: Iterable[str | Path],
    backend: LVLMBackend,
    batch_size: int = 4,
    decode_kwargs: dict | None = None,
    on_progress: ProgressFn | None = None,
    decode_workers: int = 2,
) -> tuple[list[Extracted], list[Failure]]:
    """Captions and pooled hidden states for every readable video; a Failure for every other one.

    Results come in input order (failed videos left out). decode_kwargs go to tasks.decode.decode
    (policy, max_frames, max_pixels, max_duration_s, max_file_bytes).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    paths = [str(p) for p in paths]
    decode_kwargs = dict(decode_kwargs or {})
    results: list[Extracted] = []
    failures: list[Failure] = []
    done = 0

    def report(n_done: int) -> None:
        if on_progress is not None:
            on_progress(n_done, len(failures), len(paths))

    def flush(pending: list[tuple[VideoInput, float]]) -> int:
        feats, model_failures = run_batch(backend, [v for v, _ in pending])
        failures.extend(model_failures)
        for (video, decode_s), feat in zip(pending, feats):
            if feat is not None:
                results.append(Extracted(video.meta.path, feat, video.meta, decode_s))
        return len(pending)

    with ThreadPoolExecutor(max_workers=max(1, decode_workers), thread_name_prefix="decode") as pool:
        # Keep a bounded number of decodes in flight: enough to hide decode time, not the corpus.
        ahead = max(2 * batch_size, decode_workers)
        queue: deque[Future] = deque()
        todo = iter(paths)
        for path in todo:
            queue.append(pool.submit(_decode_one, path, decode_kwargs))
            if len(queue) >= ahead:
                break
        pending: list[tuple[VideoInput, float]] = []
        while queue:
            video, failure, decode_s = queue.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                queue.append(pool.submit(_decode_one, nxt, decode_kwargs))
            if failure is not None:
                failures.append(failure)
                done += 1
                report(done)
                continue
            pending.append((video, decode_s))
            if len(pending) == batch_size:
                done += flush(pending)
                pending = []
                report(done)
        if pending:
            done += flush(pending)
            report(done)
    return results, failures


def extract_one(path: str | Path, backend: LVLMBackend, **decode_kwargs) -> Extracted:
    """One video; raises the DecodeError or model error instead of collecting it."""
    video = decode(path, **decode_kwargs)
    return Extracted(str(path), backend.extract([video])[0], video.meta, 0.0)


def video_files(directory: str | Path) -> list[Path]:
    """Video files below `directory`, sorted by path: the same rule the flows use (tasks.discover)."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"VIDEO_DIR: {root} is not a directory")
    return [Path(ref.uri) for ref in discover_videos(root)]
