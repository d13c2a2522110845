"""The two steps of a model batch, and what they share: no Prefect, no store.

- decode_one: a file -> frames + metadata, or a Failure. DecodeErrors are permanent; anything else
  is retried `retries` times with backoff first.
- run_model / run_batch: the model on a list of videos. A batch that runs out of memory
  (BackendOOM) is split in halves and retried; a single video that still does not fit is a Failure
  with stage "model"; any other model error is retried one video at a time, so only the culprits fail.

tasks/dataplane.py runs them: decode workers and model replicas, on threads or on Ray. It is the
one extraction loop; the extract-features flow and `mvrec extract` (through extract_videos) use it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tasks.decode import DEFAULT_POLICY, decode
from tasks.discover import VideoRef, local_copy
from tasks.lvlm import BackendOOM, ExtractSpec, Failure, LVLMBackend, VideoFeatures, VideoInput, VideoMeta

Decoded = tuple["VideoInput | Failure", float]  # (the video or why not, seconds spent)
ModelResult = tuple[list["VideoFeatures | None"], list[Failure]]  # features in input order (None: failed)


@dataclass(frozen=True)
class DecodeOptions:
    """Arguments of tasks.decode.decode, plus where remote videos are copied before decoding."""

    policy: str = DEFAULT_POLICY
    max_frames: int = 32
    max_pixels: int = 224 * 224
    max_duration_s: float = 3600.0
    max_file_bytes: int = 2 * 1024**3
    allow_partial: bool = True
    cache_dir: str = "./.mvrec/cache"


@dataclass
class Extracted:
    ref: VideoRef
    features: VideoFeatures
    meta: VideoMeta
    decode_s: float


@dataclass
class Batch:
    results: list[Extracted]
    failures: list[Failure]


def extract_spec(cfg: Any) -> ExtractSpec:
    """How to load and run the model, from an mvrec.config.Config; [vllm] options go to the vLLM backend."""
    e = cfg.extract
    return ExtractSpec(model=e.model, revision=e.revision, device=e.device, dtype=e.dtype, prompt=e.prompt,
                       max_new_tokens=e.max_new_tokens, pooling=e.pooling, layers=e.layers,
                       options=asdict(cfg.vllm) if e.backend == "vllm" else {})


def decode_options(cfg: Any) -> DecodeOptions:
    """How to decode, from an mvrec.config.Config. Remote videos are cached next to a local store."""
    e, store = cfg.extract, cfg.store.path
    return DecodeOptions(policy=e.frames, max_frames=e.max_frames, max_pixels=e.max_pixels,
                         max_duration_s=e.max_duration_s, max_file_bytes=e.max_file_bytes,
                         allow_partial=e.partial != "fail",
                         cache_dir=str(Path(store).parent / "cache") if "://" not in store else "./.mvrec/cache")


# ---------------------------------------------------------------------------------------------
# the two steps of a batch


def decode_one(ref: VideoRef, opts: DecodeOptions, retries: int = 0, retry_delay_s: float = 1.0) -> Decoded:
    """The video, or its Failure. Transient errors are retried with exponential backoff."""
    t0 = time.perf_counter()
    if ref.problem:  # found by discovery but not a readable file (tasks/discover.py)
        return Failure(ref.video_id, ref.uri, "read", *ref.problem.split(": ", 1), permanent=True), 0.0
    for attempt in range(retries + 1):
        try:
            video = decode(local_copy(ref.uri, opts.cache_dir), policy=opts.policy, max_frames=opts.max_frames,
                           max_pixels=opts.max_pixels, max_duration_s=opts.max_duration_s,
                           max_file_bytes=opts.max_file_bytes, allow_partial=opts.allow_partial,
                           video_id=ref.video_id)
            return video, time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a decoder bug or an odd file: one failure, not a stopped run
            failure = Failure.of(ref.video_id, ref.uri, "decode", e)
            if failure.permanent or attempt == retries:
                break
            time.sleep(retry_delay_s * 2**attempt)
    return failure, time.perf_counter() - t0


def run_batch(extract: Callable[[list], list[VideoFeatures]], videos: list) -> ModelResult:
    """One model call (`extract`: a backend's extract or extract_prepared); on out-of-memory split in
    halves, on any other error find the culprits alone."""
    try:
        return list(extract(videos)), []
    except Exception as error:  # noqa: BLE001 - one video's failure must not stop the others
        if len(videos) == 1:
            video = videos[0]
            return [None], [Failure.of(video.video_id, video.meta.path, "model", error)]
        parts = [videos[: len(videos) // 2], videos[len(videos) // 2:]] if isinstance(error, BackendOOM) \
            else [[v] for v in videos]
        features, failures = [], []
        for part in parts:
            part_features, part_failures = run_batch(extract, part)
            features += part_features
            failures += part_failures
        return features, failures


def run_model(extract: Callable[[list], list[VideoFeatures]], videos: list, batch_size: int) -> ModelResult:
    """run_batch over consecutive model batches of `batch_size` videos."""
    features, failures = [], []
    for i in range(0, len(videos), batch_size):
        part_features, part_failures = run_batch(extract, videos[i:i + batch_size])
        features += part_features
        failures += part_failures
    return features, failures


# ---------------------------------------------------------------------------------------------
# for callers with a list of files


ProgressFn = Callable[[int, int, int], None]  # (videos done, of which failed, total)


def extract_videos(videos: Iterable[str | Path | VideoRef], backend: LVLMBackend, batch_size: int = 4,
                   decode_kwargs: dict | None = None, on_progress: ProgressFn | None = None,
                   decode_workers: int = 2, opts: DecodeOptions | None = None) -> tuple[list[Extracted], list[Failure]]:
    """The data plane on threads with an already loaded backend, collected: results in input order
    (failed videos left out) and a Failure for every other video. `videos`: VideoRefs, or local files
    (video_id = file stem). `mvrec extract` and the tests use it."""
    from tasks.dataplane import PlaneSpec, run_plane

    refs = [v if isinstance(v, VideoRef) else VideoRef(video_id=Path(v).stem, uri=str(v)) for v in videos]
    plane = PlaneSpec(backend.name, getattr(backend, "spec", None), opts or DecodeOptions(**(decode_kwargs or {})),
                      batch_size=batch_size, replicas=1, decode_workers=decode_workers)
    results: list[Extracted] = []
    failures: list[Failure] = []
    for batch, _ in run_plane(refs, plane, backends=[backend]):
        results += batch.results
        failures += batch.failures
        if on_progress is not None:
            on_progress(len(results) + len(failures), len(failures), len(refs))
    order = {ref.video_id: i for i, ref in enumerate(refs)}
    return sorted(results, key=lambda x: order[x.ref.video_id]), sorted(failures, key=lambda f: order[f.video_id])
