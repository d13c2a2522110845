"""The extraction loop, one for every entry point: a plain generator, no Prefect, no store.

    for batch in iter_batches(refs, backend, lookahead=2, batch_size=4, opts=DecodeOptions("uniform:8")):
        batch.results    # Extracted (ref, features, meta, decode_s), in input order
        batch.failures   # Failure, one per video that did not make it

Decoding runs `lookahead` batches ahead of the model (decord and PyAV release the GIL), so the model
rarely waits for frames. `mvrec extract` runs it as is; the extract-features flow swaps in Prefect
task submission for the two steps (`decode`, `model`), so each batch is one decode-batch and one
lvlm-batch task run. A bad file never stops the loop:
- a decode error becomes a Failure with stage "decode"; DecodeErrors are permanent, anything else
  is retried `retries` times with backoff first;
- a batch that runs out of memory (BackendOOM) is split in halves and retried; a single video that
  still does not fit is a Failure with stage "model";
- any other model error on a batch is retried one video at a time, so only the culprits fail.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

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


def decode_batch(refs: Sequence[VideoRef], opts: DecodeOptions, workers: int = 1, retries: int = 0,
                 retry_delay_s: float = 1.0) -> list[Decoded]:
    """decode_one for every ref, in order, `workers` at a time."""
    if workers <= 1:
        return [decode_one(r, opts, retries, retry_delay_s) for r in refs]
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        return list(pool.map(lambda r: decode_one(r, opts, retries, retry_delay_s), refs))


def run_batch(backend: LVLMBackend, videos: list[VideoInput]) -> ModelResult:
    """One model call; on out-of-memory split in halves, on any other error find the culprits alone."""
    try:
        return list(backend.extract(videos)), []
    except Exception as e:  # noqa: BLE001 - one video's failure must not stop the others
        if len(videos) == 1:
            v = videos[0]
            return [None], [Failure.of(v.video_id, v.meta.path, "model", e)]
        parts = [videos[: len(videos) // 2], videos[len(videos) // 2:]] if isinstance(e, BackendOOM) \
            else [[v] for v in videos]
        feats, failures = [], []
        for part in parts:
            f, fl = run_batch(backend, part)
            feats += f
            failures += fl
        return feats, failures


def run_model(backend: LVLMBackend, videos: list[VideoInput], batch_size: int) -> ModelResult:
    """run_batch over consecutive model batches of `batch_size` videos."""
    feats, failures = [], []
    for i in range(0, len(videos), batch_size):
        f, fl = run_batch(backend, videos[i:i + batch_size])
        feats += f
        failures += fl
    return feats, failures


# ---------------------------------------------------------------------------------------------
# the loop


def iter_batches(refs: Sequence[VideoRef], backend: LVLMBackend | None, lookahead: int = 2, batch_size: int = 4,
                 opts: DecodeOptions = DecodeOptions(), model_batch: int = 0,
                 decode: Callable[[list[VideoRef]], Any] | None = None,
                 model: Callable[[list[VideoInput]], ModelResult] | None = None) -> Iterator[Batch]:
    """Decode, run and yield `batch_size` refs at a time, in order; the next `lookahead` batches
    decode (one thread each) while the model works. The model sees `model_batch` videos at a time
    (default batch_size). `decode(refs)` (returns a future: anything with .result()) and
    `model(videos)` replace how a batch runs: they stand for decode_batch and run_model."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    refs = list(refs)
    with ThreadPoolExecutor(max(1, lookahead), thread_name_prefix="decode") as pool:
        decode = decode or (lambda chunk: pool.submit(decode_batch, chunk, opts))
        model = model or (lambda videos: run_model(backend, videos, model_batch or batch_size))
        ahead: deque[tuple[list[VideoRef], Any]] = deque()
        for start in range(0, len(refs), batch_size):
            ahead.append((refs[start:start + batch_size], decode(refs[start:start + batch_size])))
            if len(ahead) > lookahead:
                yield _finish(*ahead.popleft(), model)
        while ahead:
            yield _finish(*ahead.popleft(), model)


def _finish(chunk: list[VideoRef], decoding: Any, model: Callable[[list[VideoInput]], ModelResult]) -> Batch:
    """Wait for a batch's frames, run the model on what decoded, pair the features with their refs."""
    decoded: list[Decoded] = decoding.result()
    ok = [(ref, video, s) for ref, (video, s) in zip(chunk, decoded) if not isinstance(video, Failure)]
    feats, model_failures = model([video for _, video, _ in ok]) if ok else ([], [])
    results = [Extracted(ref, f, video.meta, s) for (ref, video, s), f in zip(ok, feats) if f is not None]
    return Batch(results, [v for v, _ in decoded if isinstance(v, Failure)] + model_failures)


# ---------------------------------------------------------------------------------------------
# for callers with a list of files


ProgressFn = Callable[[int, int, int], None]  # (videos done, of which failed, total)


def extract_videos(paths: Iterable[str | Path], backend: LVLMBackend, batch_size: int = 4,
                   decode_kwargs: dict | None = None, on_progress: ProgressFn | None = None,
                   decode_workers: int = 2) -> tuple[list[Extracted], list[Failure]]:
    """iter_batches over local files (video_id = file stem), collected: results in input order
    (failed videos left out) and a Failure for every other video."""
    refs = [VideoRef(video_id=Path(p).stem, uri=str(p)) for p in paths]
    results: list[Extracted] = []
    failures: list[Failure] = []
    for batch in iter_batches(refs, backend, lookahead=max(1, decode_workers), batch_size=batch_size,
                              opts=DecodeOptions(**(decode_kwargs or {}))):
        results += batch.results
        failures += batch.failures
        if on_progress is not None:
            on_progress(len(results) + len(failures), len(failures), len(refs))
    return results, failures
