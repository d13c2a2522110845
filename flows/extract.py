"""extract_features: the extraction DAG.

    discover-videos -> hash-videos -> plan (skip what the store already has)
        -> per batch of commit_size videos:  decode-batch -> lvlm-batch -> commit-batch
        -> finish (the run record)

The loop is tasks.extract.iter_batches, the same one `mvrec extract` runs; here its two steps are
Prefect tasks, so a batch costs three task runs, not one per video. The decode-batch of the next
batch is submitted before the model runs on this one, so decoding overlaps the model. Inside a
batch the model sees extract.batch_size videos at a time. Each batch is one commit: a crash loses
at most the batch in flight, and the next run redoes exactly those videos (upserts are idempotent).

Failures are recorded one row per video, with `permanent` as the error said where it was raised:
- DecodeError (corrupt, empty, no video stream, too long/large): permanent. Recorded once, skipped
  by later runs until the file changes or `mvrec rerun-failed` asks for it.
- Anything else while decoding is transient: retried per video inside decode-batch with backoff
  (prefect.task_retries, prefect.retry_delay_s); still failing, it fails the run (what succeeded
  is committed) so the run can be retried.
- An out-of-memory batch is split in halves down to single videos; a video the model rejects
  fails alone (tasks.extract.run_batch).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.plan import extractor_record, plan_work
from flows.report import extract_markdown, publish
from mvrec.config import load_config
from storage import ExtractionBatch, ExtractorRecord, FailureRow, FeatureStore, VideoRow, open_store
from storage.quality import LayerNorms, gate_batch
from tasks.discover import VideoRef, discover_videos, hash_videos
from tasks.extract import (
    Batch,
    Decoded,
    DecodeOptions,
    ModelResult,
    decode_batch,
    decode_options,
    extract_spec,
    iter_batches,
    run_model,
)
from tasks.lvlm import ExtractSpec, Failure, LVLMBackend, ModelInfo, VideoInput, load_backend

# One loaded backend per process: loading a model is the expensive part, batches reuse it.
_BACKENDS: dict[str, tuple[LVLMBackend, threading.Lock]] = {}
_BACKENDS_LOCK = threading.Lock()
LVLM_CALLS = {"batches": 0, "videos": 0}  # model batches and videos, per process; tests and the bench read it


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


@task(name="decode-batch", cache_policy=NO_CACHE)
def decode_task(refs: list[VideoRef], opts: DecodeOptions, workers: int, retries: int, retry_delay_s: float
                ) -> list[Decoded]:
    return decode_batch(refs, opts, workers, retries, retry_delay_s)


@task(name="lvlm-batch", cache_policy=NO_CACHE)
def lvlm_task(videos: list[VideoInput], backend_name: str, spec: ExtractSpec, batch_size: int
              ) -> tuple[ModelResult, ModelInfo]:
    backend, lock = get_backend(backend_name, spec)
    with lock:  # one batch at a time per loaded model
        result = run_model(backend, videos, batch_size)
    LVLM_CALLS["batches"] += math.ceil(len(videos) / batch_size)
    LVLM_CALLS["videos"] += len(videos)
    return result, backend.info


@task(name="commit-batch", cache_policy=NO_CACHE)
def commit_task(store: FeatureStore, batch: ExtractionBatch) -> dict[str, int]:
    return store.write_batch(batch)


class LVLMStep:
    """The loop's model step as one lvlm-batch task run, so the task runner decides where the model
    runs (a thread here, a Dask or Ray worker elsewhere). Keeps the model's info for the extractor row."""

    def __init__(self, backend: str, spec: ExtractSpec, batch_size: int, tags: list[str]):
        self.task, self.args = lvlm_task.with_options(tags=tags), (backend, spec, batch_size)
        self.info: ModelInfo | None = None
        self.batches = 0

    def __call__(self, videos: list[VideoInput]) -> ModelResult:
        result, self.info = self.task.submit(videos, *self.args).result()
        self.batches += math.ceil(len(videos) / self.args[2])
        return result


# ---------------------------------------------------------------------------------------------
# Store rows


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
    partial: int = 0  # stored videos decoded from fewer frames than their header promised
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # table versions this run's commits wrote
    norms: dict[str, dict] = field(default_factory=dict)  # per-layer embedding norm statistics

    def add(self, failures: list[Failure] | list[FailureRow], processed: int = 0) -> None:
        self.processed += processed
        self.failed += len(failures)
        # A transient read error fails the run so it is retried; a model error on one video is recorded.
        self.transient_failed += sum(f.stage == "decode" and not f.permanent for f in failures)
        self.failures += [{k: getattr(f, k) for k in ("video_id", "uri", "stage", "error_type", "message")}
                          for f in failures]


def failure_rows(failures: list[Failure], refs: dict[str, VideoRef], run_id: str, extractor_id: str) -> list[FailureRow]:
    return [FailureRow(video_id=f.video_id, uri=f.uri, stage=f.stage, error_type=f.error_type, message=f.message,
                       extractor_id=extractor_id if f.stage == "model" else "", run_id=run_id,
                       content_sha256=refs[f.video_id].content_sha256, permanent=f.permanent) for f in failures]


def batch_rows(batch: Batch, refs: dict[str, VideoRef], run_id: str, extractor_id: str) -> ExtractionBatch:
    """One commit: videos, captions and hidden states of what succeeded, one failure row per video."""
    rows = ExtractionBatch(failures=failure_rows(batch.failures, refs, run_id, extractor_id))
    for x in batch.results:
        ref, m, key = x.ref, x.meta, {"video_id": x.ref.video_id, "content_sha256": x.ref.content_sha256,
                                      "extractor_id": extractor_id}
        rows.videos.append(VideoRow(video_id=ref.video_id, uri=ref.uri, content_sha256=ref.content_sha256,
                                    bytes=ref.bytes, duration_s=m.duration_s, fps=m.fps,
                                    width=m.source_width or m.width, height=m.source_height or m.height,
                                    frame_count=m.total_num_frames, partial=m.partial))
        rows.captions.append({**key, "caption": x.features.caption})
        rows.hidden_states += [{**key, "layer": int(layer), "embedding": x.features.hidden[row]}
                               for row, layer in enumerate(x.features.layers)]
    return rows


# ---------------------------------------------------------------------------------------------
# The flow


@flow(name="extract-features", log_prints=True)
def extract_features(source: str | list[str], overrides: dict[str, Any] | None = None,
                     only_failed: bool = False, config_path: str | None = None) -> dict:
    """Extract captions and per-layer hidden states for every new or changed video in `source`.

    overrides: {"section.key": value} on top of mvrec.toml and MVREC_* (e.g. {"extract.model": ...}).
    only_failed: process only videos with open failures (what `mvrec rerun-failed` does).
    """
    started, log = time.perf_counter(), get_run_logger()
    cfg = load_config(config_path, overrides=overrides)
    e, p = cfg.extract, cfg.prefect
    store, record = open_store(cfg.store), extractor_record(cfg)
    eid = record.extractor_id
    run_id = store.start_run("extract-features", extractor_id=eid,
                             params={"source": source, "only_failed": only_failed, **(overrides or {})})
    summary = ExtractSummary(run_id=run_id, extractor_id=eid)

    with store.failing_run(run_id):  # an exception (disk full, a bug) ends the run `failed`, not `running`
        refs = discover_task(source)
        hashed, unreadable = hash_task(refs)
        todo, counts = plan_work(hashed, store.completed(eid), store.failures(eid), only_failed=only_failed)
        summary.discovered, summary.skipped_done = len(refs), counts["done"]
        summary.skipped_broken = counts["known_broken"]
        log.info("%d videos: %d to extract, %d done, %d known broken, %d unreadable", len(refs), len(todo),
                 counts["done"], counts["known_broken"], len(unreadable))
        by_id = {r.video_id: r for r in refs + hashed}
        if unreadable:
            # Recorded again by every run's hash step; not permanent, so the planner takes the file
            # as soon as it can be read (an unreadable file has no content hash to be known broken by).
            # A problem found by discovery is "Kind: why" (tasks/discover.py).
            read_failures = [Failure(r.video_id, r.uri, "read", *(why.split(": ", 1) if r.problem else
                                                                  ("Unreadable", why)), permanent=False)
                             for r, why in unreadable]
            summary.versions.update(commit_task(store, ExtractionBatch(failures=failure_rows(read_failures, by_id,
                                                                                             run_id, eid))))
            summary.add(read_failures)

        opts, lvlm = decode_options(cfg), LVLMStep(e.backend, extract_spec(cfg), e.batch_size, tags=[p.gpu_tag])
        extractor_written, norms = False, LayerNorms()
        for batch in iter_batches(todo, None, lookahead=1, batch_size=e.commit_size, model=lvlm, decode=lambda chunk:
                                  decode_task.submit(chunk, opts, e.decode_workers, p.task_retries, p.retry_delay_s)):
            if lvlm.info is not None and not extractor_written:  # the model's shape, before its first rows
                store.upsert_extractor(ExtractorRecord(**{**asdict(record), "dim": lvlm.info.hidden_size,
                                                          "num_layers": lvlm.info.num_layers}))
                extractor_written = True
            summary.lvlm_batches = lvlm.batches
            # Quality gate: a NaN/Inf, wrong-size or all-zero embedding makes its video a failure row.
            gated = gate_batch(batch_rows(batch, by_id, run_id, eid), lvlm.info.hidden_size if lvlm.info else 0, run_id)
            norms.merge(gated.norms)
            summary.versions.update(commit_task(store, gated.batch))
            summary.add(batch.failures + gated.rejected, processed=len(batch.results) - len(gated.rejected))
            summary.partial += sum(bool(v.partial) for v in gated.batch.videos)

    summary.seconds, summary.norms = time.perf_counter() - started, norms.summary()
    store.finish_run(run_id, status="failed" if summary.transient_failed else "completed", counts={
        "discovered": summary.discovered, "processed": summary.processed, "failed": summary.failed,
        "skipped_done": summary.skipped_done, "skipped_broken": summary.skipped_broken,
        "partial": summary.partial, "lvlm_batches": summary.lvlm_batches}, stats={"norms": summary.norms})
    publish("extract-features", extract_markdown(asdict(summary)), f"extract-features run {run_id}")
    log.info("run %s: %d processed, %d failed, %d skipped in %.1fs", run_id, summary.processed, summary.failed,
             summary.skipped_done + summary.skipped_broken, summary.seconds)
    if summary.transient_failed:
        # Fail the flow run so it can be retried (`prefect flow-run retry`); what succeeded is committed.
        raise RuntimeError(f"{summary.transient_failed} video(s) failed with transient errors after retries; "
                           f"run `mvrec rerun-failed` or retry this flow run")
    return asdict(summary)
