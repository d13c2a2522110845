"""extract_features: the extraction DAG. The flow is the control plane; the data plane
(tasks/dataplane.py) does the work.

    plan-work: discover, check what changed (no read of an unchanged file), anti-join the store
        -> data plane: decode + preprocess workers -> R model replicas (threads, or a Ray cluster)
        -> commit-batch, as results arrive -> finish (the run record)

Frames stay in the data plane; only rows come back here. The data plane runs in the background
while this process commits, and each commit takes every result that has arrived once at least
extract.commit_size videos wait: when commits lag behind the replicas they grow, so the commit
path keeps up. A commit is atomic and upserts are idempotent: a crash loses at most the results
not yet committed, and the next run redoes exactly those videos.

Failures are recorded one row per video, with `permanent` as the error said where it was raised:
- DecodeError (corrupt, empty, no video stream, too long/large): permanent. Recorded once, skipped
  by later runs until the file changes or `mvrec rerun-failed` asks for it.
- Anything else while decoding is transient: retried per video in its decode worker with backoff
  (prefect.task_retries, prefect.retry_delay_s); still failing, it fails the run (what succeeded
  is committed) so the run can be retried.
- An out-of-memory batch is split in halves down to single videos; a video the model rejects
  fails alone (tasks.extract.run_batch). A replica that dies has its batches sent elsewhere.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.plan import Plan, extractor_record, take_plan
from flows.report import extract_markdown, publish
from mvrec.config import Config, load_config
from storage import ExtractionBatch, ExtractorRecord, FailureRow, FeatureStore, VideoRow, open_store
from storage.quality import LayerNorms, gate_batch
from tasks.dataplane import PlaneSpec, PlaneStats, in_background, run_plane, runs_on_gpu
from tasks.discover import VideoRef, is_transient
from tasks.extract import Batch, decode_options, extract_spec
from tasks.lvlm import Failure, ModelInfo

# ---------------------------------------------------------------------------------------------
# Tasks: the control plane's steps. The data plane is not a Prefect task: it streams.


@task(name="plan-work", cache_policy=NO_CACHE)
def plan_task(cfg: Config, source: str | list[str], only_failed: bool, verify: bool) -> Plan:
    return take_plan(cfg, source, only_failed=only_failed, verify=verify)


@task(name="commit-batch", cache_policy=NO_CACHE)
def commit_task(store: FeatureStore, batch: ExtractionBatch) -> dict[str, int]:
    return store.write_batch(batch)


def plane_spec(cfg: Config) -> PlaneSpec:
    """The data plane of this config: what to run, where and how wide."""
    extract = cfg.extract
    return PlaneSpec(backend=extract.backend, spec=extract_spec(cfg), opts=decode_options(cfg), batch_size=extract.batch_size,
                     replicas=extract.replicas, decode_workers=extract.decode_workers,
                     retries=cfg.prefect.task_retries, retry_delay_s=cfg.prefect.retry_delay_s,
                     place_timeout_s=extract.place_timeout_s)


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
    commits: int = 0
    partial: int = 0  # stored videos decoded from fewer frames than their header promised
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    hash_reused: int = 0  # content hashes the change check took from the file index (no byte read)
    hash_read: int = 0  # files it read to hash
    read_bytes: int = 0
    plan_seconds: dict[str, float] = field(default_factory=dict)  # discover, check, plan
    versions: dict[str, int] = field(default_factory=dict)  # table versions this run's commits wrote
    norms: dict[str, dict] = field(default_factory=dict)  # per-layer embedding norm statistics
    plane: dict[str, Any] = field(default_factory=dict)  # busy shares of the replicas and decode workers

    def add(self, failures: list[Failure] | list[FailureRow], processed: int = 0) -> None:
        self.processed += processed
        self.failed += len(failures)
        # A transient decode or read error (a stalled mount, a file changed mid-run) fails the run so it
        # is retried; a model error on one video is recorded.
        self.transient_failed += sum((f.stage == "decode" and not f.permanent) or
                                     (f.stage == "read" and is_transient(f.error_type)) for f in failures)
        self.failures += [{k: getattr(f, k) for k in ("video_id", "uri", "stage", "error_type", "message")}
                          for f in failures]


def failure_rows(failures: list[Failure], refs: dict[str, VideoRef], run_id: str, extractor_id: str) -> list[FailureRow]:
    return [FailureRow(video_id=f.video_id, uri=f.uri, stage=f.stage, error_type=f.error_type, message=f.message,
                       extractor_id=extractor_id if f.stage == "model" else "", run_id=run_id,
                       content_sha256=refs[f.video_id].content_sha256, permanent=f.permanent) for f in failures]


def batch_rows(batch: Batch, refs: dict[str, VideoRef], run_id: str, extractor_id: str) -> ExtractionBatch:
    """One commit: videos, captions and hidden states of what succeeded, one failure row per video."""
    rows = ExtractionBatch(failures=failure_rows(batch.failures, refs, run_id, extractor_id))
    for done in batch.results:
        ref, meta = done.ref, done.meta
        key = {"video_id": ref.video_id, "content_sha256": ref.content_sha256, "extractor_id": extractor_id}
        rows.videos.append(VideoRow(video_id=ref.video_id, uri=ref.uri, content_sha256=ref.content_sha256,
                                    bytes=ref.bytes, duration_s=meta.duration_s, fps=meta.fps,
                                    width=meta.source_width or meta.width, height=meta.source_height or meta.height,
                                    frame_count=meta.total_num_frames, partial=meta.partial))
        rows.captions.append({**key, "caption": done.features.caption})
        rows.hidden_states += [{**key, "layer": int(layer), "embedding": done.features.hidden[row]}
                               for row, layer in enumerate(done.features.layers)]
    return rows


def read_problem(why: str) -> tuple[str, str]:
    """("Kind", "why") from discovery's "Kind: why"; a bare reason is Unreadable."""
    kind, sep, message = why.partition(": ")
    return (kind, message) if sep and kind.isidentifier() else ("Unreadable", why)


def record_unreadable(store: FeatureStore, unreadable: list[tuple[VideoRef, str]], by_id: dict[str, VideoRef],
                      summary: ExtractSummary) -> None:
    """One failure row per file discovery or hashing could not read. Not permanent: an unreadable
    file has no content hash to be known broken by, so the planner takes it once it can be read.
    A problem found by discovery is "Kind: why" (tasks/discover.py)."""
    failures = [Failure(ref.video_id, ref.uri, "read", *read_problem(why), permanent=False) for ref, why in unreadable]
    rows = ExtractionBatch(failures=failure_rows(failures, by_id, summary.run_id, summary.extractor_id))
    summary.versions.update(commit_task(store, rows))
    summary.add(failures)


def commit_arrived(store: FeatureStore, arrived: list[tuple[Batch, ModelInfo]], record: ExtractorRecord,
                   by_id: dict[str, VideoRef], summary: ExtractSummary, norms: LayerNorms) -> None:
    """One commit of every batch that has arrived: the quality gate, then the rows. The first commit
    writes the extractor row with the model's shape, as the replica reported it."""
    model = arrived[0][1]
    if not summary.commits:
        store.upsert_extractor(ExtractorRecord(**{**asdict(record), "dim": model.hidden_size,
                                                  "num_layers": model.num_layers}))
    batch = Batch([done for part, _ in arrived for done in part.results],
                  [failure for part, _ in arrived for failure in part.failures])
    # Quality gate: a NaN/Inf, wrong-size or all-zero embedding makes its video a failure row.
    gated = gate_batch(batch_rows(batch, by_id, summary.run_id, summary.extractor_id), model.hidden_size,
                       summary.run_id)
    norms.merge(gated.norms)
    summary.versions.update(commit_task(store, gated.batch))
    summary.add(batch.failures + gated.rejected, processed=len(batch.results) - len(gated.rejected))
    summary.partial += sum(bool(video.partial) for video in gated.batch.videos)
    summary.commits += 1


# ---------------------------------------------------------------------------------------------
# The flow


@flow(name="extract-features", log_prints=True)
def extract_features(source: str | list[str], overrides: dict[str, Any] | None = None,
                     only_failed: bool = False, config_path: str | None = None, verify: bool = False) -> dict:
    """Extract captions and per-layer hidden states for every new or changed video in `source`.

    overrides: {"section.key": value} on top of mvrec.toml and MVREC_* (e.g. {"extract.model": ...}).
    only_failed: process only videos with open failures (what `mvrec rerun-failed` does).
    verify: read every file to hash it, trusting no recorded stat signature.
    """
    started, log = time.perf_counter(), get_run_logger()
    cfg = load_config(config_path, overrides=overrides)
    if runs_on_gpu(cfg.extract.device, cfg.extract.engine, cfg.extract.ray_address):
        cfg = load_config(config_path, overrides=overrides, on_gpu=True)  # batch, queue and commit sizes for a GPU
    store, record = open_store(cfg.store), extractor_record(cfg)
    extractor_id = record.extractor_id
    # One run per store and extractor at a time: a second one stops here, naming the owner (RunLeaseHeld).
    with store.run_lease(extractor_id):
        run_id = store.start_run("extract-features", extractor_id=extractor_id,
                                 params={"source": source, "only_failed": only_failed, **(overrides or {})})
        summary, stats = ExtractSummary(run_id=run_id, extractor_id=extractor_id), PlaneStats()

        with store.failing_run(run_id):  # an exception (disk full, a bug) ends the run `failed`, not `running`
            plan = plan_task(cfg, source, only_failed, verify)
            refs, hashed, unreadable, todo, counts = plan.refs, plan.check.hashed, plan.check.unreadable, plan.todo, plan.counts
            summary.hash_reused, summary.hash_read = plan.check.reused, plan.check.read_files
            summary.read_bytes, summary.plan_seconds = plan.check.read_bytes, plan.seconds
            summary.discovered = len(refs)
            summary.skipped_done, summary.skipped_broken = counts["done"], counts["known_broken"]
            log.info("%d videos: %d to extract, %d done, %d known broken, %d unreadable", len(refs), len(todo),
                     counts["done"], counts["known_broken"], len(unreadable))
            by_id = {ref.video_id: ref for ref in refs + hashed}
            if unreadable:
                record_unreadable(store, unreadable, by_id, summary)

            norms, stop = LayerNorms(), threading.Event()  # stop: Ctrl-C here ends the plane within seconds
            results = run_plane(todo, plane_spec(cfg), engine=cfg.extract.engine, ray_address=cfg.extract.ray_address,
                                stats=stats, stop=stop)
            for arrived in in_background(results, min_videos=cfg.extract.commit_size, stop=stop,
                                         max_videos=cfg.extract.max_commit_size):
                commit_arrived(store, arrived, record, by_id, summary, norms)
                summary.lvlm_batches = stats.batches

        summary.seconds, summary.norms = time.perf_counter() - started, norms.summary()
        summary.plane = {**stats.busy_shares(), "resent": stats.resent, "replicas_lost": stats.replicas_lost,
                         "replicas_asked": stats.replicas_asked, "replicas_placed": stats.replicas_placed,
                         "note": stats.placement_note()}
        if summary.plane["note"]:  # fewer replicas than asked: said in the log, the report and `mvrec status`
            log.warning(summary.plane["note"])
        store.finish_run(run_id, status="failed" if summary.transient_failed else "completed", counts={
            key: getattr(summary, key) for key in ("discovered", "processed", "failed", "skipped_done", "skipped_broken",
                                                   "partial", "lvlm_batches")}, stats={"norms": summary.norms},
                         message=summary.plane["note"])
        publish("extract-features", extract_markdown(asdict(summary)), f"extract-features run {run_id}")
        log.info("run %s: %d processed, %d failed, %d skipped in %.1fs", run_id, summary.processed, summary.failed,
                 summary.skipped_done + summary.skipped_broken, summary.seconds)
        if summary.transient_failed:
            # Fail the flow run so it can be retried (`prefect flow-run retry`); what succeeded is committed.
            raise RuntimeError(f"{summary.transient_failed} video(s) failed with transient errors after retries; "
                               f"run `mvrec rerun-failed` or retry this flow run")
        return asdict(summary)
