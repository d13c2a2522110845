"""extract_features: the extraction DAG.

    discover-videos -> hash-videos -> plan-work (skip what the store already has)
        -> for each batch:  decode-video (CPU pool, runs ahead)  ->  lvlm-batch  ->  commit-batch
        -> finish-run

Decoding is submitted `lookahead` batches ahead, so while the model works on batch i the pool
decodes batch i+1. Results are committed every `commit_size` videos; a crash loses at most the
uncommitted group, and the next run redoes exactly those (the store's upserts are idempotent).

Failures:
- DecodeError (corrupt, empty, no video stream, too long/large) is permanent: recorded once, not
  retried, and skipped by later runs until the file changes or `mvrec rerun-failed` asks for it.
- Anything else while decoding is treated as transient and retried with backoff (task retries).
- An out-of-memory batch is split in half and tried again, down to single videos
  (tasks.extract.run_batch); a video the model rejects fails alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.plan import PERMANENT_ERRORS, extract_spec, extractor_record, plan_work  # noqa: F401 (re-exported)
from mvrec.config import load_config
from storage import ExtractionBatch, ExtractorRecord, FailureRow, FeatureStore, VideoRow, open_store
from tasks.decode import DecodeError, decode
from tasks.extract import run_batch
from tasks.discover import VideoRef, discover_videos, hash_videos, local_copy
from tasks.lvlm import ExtractSpec, LVLMBackend, VideoFeatures, VideoInput, load_backend

# One loaded backend per process: loading a model is the expensive part, batches reuse it.
_BACKENDS: dict[str, tuple[LVLMBackend, threading.Lock]] = {}
_BACKENDS_LOCK = threading.Lock()
LVLM_CALLS = {"batches": 0, "videos": 0}  # per process; tests and the bench read it


def get_backend(name: str, spec: ExtractSpec) -> tuple[LVLMBackend, threading.Lock]:
    key = json.dumps([name, asdict(spec)], sort_keys=True, default=str)
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            _BACKENDS[key] = (load_backend(name, spec), threading.Lock())
        return _BACKENDS[key]


# ---------------------------------------------------------------------------------------------
# Tasks


@task(name="discover-videos", cache_policy=NO_CACHE)
def discover_task(source: str | list[str]) -> list[VideoRef]:
    return discover_videos(source)


@task(name="hash-videos", cache_policy=NO_CACHE)
def hash_task(refs: list[VideoRef]) -> tuple[list[VideoRef], list[tuple[VideoRef, str]]]:
    return hash_videos(refs)


def _retry_transient(task, task_run, state) -> bool:
    """Retry everything but a DecodeError: a corrupt file stays corrupt."""
    try:
        state.result()
    except DecodeError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


@task(name="decode-video", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient)
def decode_task(ref: VideoRef, frames: str, max_frames: int, max_pixels: int, max_duration_s: float,
                max_file_bytes: int, cache_dir: str) -> VideoInput:
    return decode(local_copy(ref.uri, cache_dir), policy=frames, max_frames=max_frames, max_pixels=max_pixels,
                  max_duration_s=max_duration_s, max_file_bytes=max_file_bytes, video_id=ref.video_id)


@task(name="lvlm-batch", cache_policy=NO_CACHE)
def lvlm_task(videos: list[VideoInput], backend_name: str, spec: ExtractSpec) -> tuple[list[VideoFeatures], list[dict], dict]:
    backend, lock = get_backend(backend_name, spec)
    with lock:  # one batch at a time per loaded model; out-of-memory batches are split in half
        results, failed = run_batch(backend, videos)
    features = [f for f in results if f is not None]
    failures = [{"video_id": f.video_id, "stage": f.stage, "error_type": f.error_type, "message": f.message[:2000]}
                for f in failed]
    LVLM_CALLS["batches"] += 1
    LVLM_CALLS["videos"] += len(videos)
    info = backend.info
    return features, failures, {"dim": info.hidden_size, "num_layers": info.num_layers}


@task(name="commit-batch", cache_policy=NO_CACHE)
def commit_task(store: FeatureStore, batch: ExtractionBatch) -> dict[str, int]:
    return store.write_batch(batch)


# ---------------------------------------------------------------------------------------------
# The flow


@dataclass
class ExtractSummary:
    run_id: str
    extractor_id: str
    discovered: int = 0
    skipped_done: int = 0
    skipped_broken: int = 0
    processed: int = 0
    failed: int = 0
    transient_failed: int = 0
    lvlm_batches: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)


def _video_row(ref: VideoRef, video: VideoInput) -> VideoRow:
    m = video.meta
    return VideoRow(video_id=ref.video_id, uri=ref.uri, content_sha256=ref.content_sha256, bytes=ref.bytes,
                    duration_s=m.duration_s, fps=m.fps, width=m.source_width or m.width,
                    height=m.source_height or m.height)


def _failure(ref: VideoRef, stage: str, error: BaseException | None, run_id: str, extractor_id: str = "",
             error_type: str = "", message: str = "") -> FailureRow:
    return FailureRow(video_id=ref.video_id, uri=ref.uri, stage=stage,
                      error_type=error_type or type(error).__name__,
                      message=(message or str(error))[:2000], extractor_id=extractor_id, run_id=run_id,
                      content_sha256=ref.content_sha256)


@flow(name="extract-features", log_prints=True)
def extract_features(source: str | list[str], overrides: dict[str, Any] | None = None,
                     only_failed: bool = False, config_path: str | None = None) -> dict:
    """Extract captions and per-layer hidden states for every new or changed video in `source`.

    overrides: {"section.key": value} on top of mvrec.toml and MVREC_* (e.g. {"extract.model": ...}).
    only_failed: process only videos with open failures (what `mvrec rerun-failed` does).
    """
    started = time.perf_counter()
    cfg = load_config(config_path, overrides=overrides)
    e = cfg.extract
    log = get_run_logger()
    store = open_store(cfg.store)
    record = extractor_record(cfg)
    eid = record.extractor_id
    run_id = store.start_run("extract-features", extractor_id=eid,
                             params={"source": source, "only_failed": only_failed, **(overrides or {})})
    summary = ExtractSummary(run_id=run_id, extractor_id=eid)

    refs = discover_task(source)
    hashed, unreadable = hash_task(refs)
    summary.discovered = len(refs)
    todo, counts = plan_work(hashed, store.completed(eid), store.failures(eid), only_failed=only_failed)
    summary.skipped_done, summary.skipped_broken = counts["done"], counts["known_broken"]
    log.info("%d videos: %d to extract, %d done, %d known broken, %d unreadable", len(refs), len(todo),
             counts["done"], counts["known_broken"], len(unreadable))

    spec = extract_spec(cfg)
    decode_opts = dict(frames=e.frames, max_frames=e.max_frames, max_pixels=e.max_pixels,
                       max_duration_s=e.max_duration_s, max_file_bytes=e.max_file_bytes,
                       cache_dir=str(Path(cfg.store.path).parent / "cache") if "://" not in cfg.store.path
                       else "./.mvrec/cache")
    decoder = decode_task.with_options(retries=cfg.prefect.task_retries,
                                       retry_delay_seconds=[cfg.prefect.retry_delay_s * 2**i
                                                            for i in range(max(cfg.prefect.task_retries, 1))])
    lvlm = lvlm_task.with_options(tags=[cfg.prefect.gpu_tag])

    pending = ExtractionBatch(failures=[_failure(r, "read", None, run_id, error_type="Unreadable", message=why)
                                        for r, why in unreadable])
    pending_videos = 0
    extractor_written = False

    all_failures: list[FailureRow] = []

    def flush(force: bool = False) -> None:
        nonlocal pending, pending_videos
        if pending_videos and (force or pending_videos >= e.commit_size) or (force and pending.failures):
            commit_task(store, pending)
            all_failures.extend(pending.failures)
            pending, pending_videos = ExtractionBatch(), 0

    batches = [todo[i:i + e.batch_size] for i in range(0, len(todo), e.batch_size)]
    lookahead = 2  # batches decoded ahead of the model
    decoding: deque = deque()
    in_model: deque = deque()
    next_batch = 0

    def submit_decodes() -> None:
        nonlocal next_batch
        while next_batch < len(batches) and len(decoding) < lookahead:
            refs_ = batches[next_batch]
            decoding.append((refs_, [decoder.submit(r, **decode_opts) for r in refs_]))
            next_batch += 1

    def collect_model_result() -> None:
        nonlocal pending_videos, extractor_written
        refs_, videos, future = in_model.popleft()
        features, failures, info = future.result()
        summary.lvlm_batches += 1
        if not extractor_written:
            store.upsert_extractor(ExtractorRecord(**{**asdict(record), "dim": info["dim"],
                                                      "num_layers": info["num_layers"]}))
            extractor_written = True
        by_id = {r.video_id: r for r in refs_}
        videos_by_id = {v.video_id: v for v in videos}
        for feat in features:
            ref = by_id[feat.video_id]
            pending.videos.append(_video_row(ref, videos_by_id[feat.video_id]))
            pending.captions.append({"video_id": ref.video_id, "content_sha256": ref.content_sha256,
                                     "extractor_id": eid, "caption": feat.caption})
            pending.hidden_states.extend(
                {"video_id": ref.video_id, "content_sha256": ref.content_sha256, "extractor_id": eid,
                 "layer": int(layer), "embedding": feat.hidden[row]}
                for row, layer in enumerate(feat.layers))
            summary.processed += 1
        for fail in failures:
            ref = by_id[fail["video_id"]]
            pending.failures.append(_failure(ref, fail["stage"], None, run_id, eid, fail["error_type"], fail["message"]))
            summary.failed += 1
        pending_videos += len(refs_)
        flush()

    submit_decodes()
    while decoding:
        refs_, futures = decoding.popleft()
        videos = []
        for ref, fut in zip(refs_, futures):
            try:
                videos.append(fut.result())
            except DecodeError as err:
                pending.failures.append(_failure(ref, "decode", err, run_id))
                summary.failed += 1
            except Exception as err:  # noqa: BLE001 - transient, retries exhausted
                pending.failures.append(_failure(ref, "decode", err, run_id))
                summary.failed += 1
                summary.transient_failed += 1
        submit_decodes()
        if videos:
            in_model.append((refs_, videos, lvlm.submit(videos, e.backend, spec)))
        while in_model and (len(in_model) > 1 or not decoding):
            collect_model_result()
    flush(force=True)

    summary.seconds = time.perf_counter() - started
    summary.failures = [{"video_id": f.video_id, "stage": f.stage, "error_type": f.error_type, "message": f.message}
                        for f in all_failures]
    status = "completed" if summary.transient_failed == 0 else "failed"
    store.finish_run(run_id, status=status, counts={
        "discovered": summary.discovered, "processed": summary.processed, "failed": summary.failed,
        "skipped_done": summary.skipped_done, "skipped_broken": summary.skipped_broken,
        "lvlm_batches": summary.lvlm_batches})
    log.info("run %s: %d processed, %d failed, %d skipped in %.1fs", run_id, summary.processed, summary.failed,
             summary.skipped_done + summary.skipped_broken, summary.seconds)
    result = asdict(summary)
    if summary.transient_failed:
        # Fail the flow run so it can be retried (`prefect flow-run retry`); what succeeded is committed.
        raise RuntimeError(f"{summary.transient_failed} video(s) failed with transient errors after retries; "
                           f"run `mvrec rerun-failed` or retry this flow run")
    return result
