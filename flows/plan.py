"""Planning an extraction run, without Prefect: which extractor, which videos still need the model.

Kept free of Prefect imports so `mvrec refresh` can check for new work in seconds and skip starting
an orchestrator when there is none. A run's cost follows what changed, not the corpus:
- the change check reads no byte of a file whose stat signature (size, mtime, ctime, inode; an
  object's ETag, size and last-modified) is the one recorded when its hash was taken (the store's
  `file_index`, like git's index); only new or changed files are hashed;
- planning is an anti-join of Arrow key columns (the discovered files against the complete keys of
  one layer partition and the open failures), never whole tables turned into Python rows;
- the plan the CLI's pre-check makes is the plan the flow runs (`take_plan`): a file is hashed at
  most once per run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

import mvrec
from mvrec.config import Config
from storage import ExtractorRecord, FeatureStore, open_store
from tasks.discover import VideoRef, discover_videos, hash_videos, remote_signature, signature
from tasks.lvlm import model_revision

# Part of every extractor's lineage: bump when a change here or in tasks/ changes the features.
FEATURE_CODE_VERSION = f"mvrec-{mvrec.__version__}"


def model_name(model: str) -> str:
    """A local model directory by its absolute path, so that `./models/m` and `/abs/models/m` are
    one extractor wherever the command runs; a hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def extractor_record(cfg: Config) -> ExtractorRecord:
    """Everything that changes the features. The backend is not part of it: both backends give the
    same vectors (tests/test_vllm.py holds them to 1e-4), so their rows are interchangeable."""
    e = cfg.extract
    return ExtractorRecord(
        model=model_name(e.model), revision=model_revision(e.model, e.revision), prompt=e.prompt, frame_policy=e.frames,
        pooling=e.pooling, code_version=FEATURE_CODE_VERSION,
        params={"layers": e.layers, "dtype": e.dtype, "max_frames": e.max_frames, "max_pixels": e.max_pixels,
                "max_new_tokens": e.max_new_tokens})


def _keys(refs: Sequence[VideoRef]) -> pa.Table:
    return pa.table({"i": pa.array(range(len(refs)), pa.int64()),
                     "video_id": pa.array([r.video_id for r in refs], pa.string()),
                     "content_sha256": pa.array([r.content_sha256 for r in refs], pa.string())})


def plan_refs(videos: Sequence[VideoRef], complete: pa.Table, failures: pa.Table,
              only_failed: bool = False) -> tuple[list[VideoRef], dict[str, int]]:
    """Which videos need the model, by anti-joins of key columns: those whose content now is not
    complete and served (`complete`: FeatureStore.complete_keys, so a file reverted to an earlier
    content is extracted again, which makes that content the served one), and not known to be
    permanently broken (`failures`: FeatureStore.failure_keys; a permanent failure with no
    content hash counts for every content), unless only_failed, which takes exactly the videos
    with open failures."""
    keys = _keys(videos)
    rest = keys.join(complete, keys=["video_id", "content_sha256"], join_type="left anti")
    counts = {"done": keys.num_rows - rest.num_rows, "known_broken": 0, "not_failed": 0}
    if only_failed:
        keep = pc.is_in(rest.column("video_id"), value_set=failures.column("video_id"))
        counts["not_failed"] = rest.num_rows - pc.sum(keep).as_py() if rest.num_rows else 0
        rest = rest.filter(keep)
    else:
        permanent = failures.filter(failures.column("permanent"))
        any_content = permanent.filter(pc.equal(permanent.column("content_sha256"), "")).column("video_id")
        broken = rest.join(permanent.select(["video_id", "content_sha256"]), keys=["video_id", "content_sha256"],
                           join_type="left semi").column("i")
        is_broken = pc.or_(pc.is_in(rest.column("i"), value_set=broken),
                           pc.is_in(rest.column("video_id"), value_set=any_content))
        counts["known_broken"] = pc.sum(is_broken).as_py() if rest.num_rows else 0
        rest = rest.filter(pc.invert(is_broken))
    todo = [videos[i] for i in sorted(rest.column("i").to_pylist())]
    return todo, counts


def plan_work(videos: Sequence[VideoRef], completed: set[tuple[str, str]], failures: Sequence[dict],
              only_failed: bool = False) -> tuple[list[VideoRef], dict[str, int]]:
    """plan_refs for Python sets and failure dicts (store.completed(), store.failures())."""
    complete = pa.table({"video_id": pa.array([v for v, _ in completed], pa.string()),
                         "content_sha256": pa.array([s for _, s in completed], pa.string())})
    fails = pa.table({"video_id": pa.array([f["video_id"] for f in failures], pa.string()),
                      "content_sha256": pa.array([f.get("content_sha256") or "" for f in failures], pa.string()),
                      "permanent": pa.array([bool(f.get("permanent")) for f in failures], pa.bool_())})
    return plan_refs(videos, complete, fails, only_failed)


def captions_to_embed(store: FeatureStore, extractor_id: str, text_model: str) -> pa.Table:
    """Caption rows of this extractor without a vector from `text_model` (video_id, content_sha256,
    extractor_id, caption), read from the key, text and model columns: never the vectors. A caption
    gets its vector and text_model in one write (flows/refresh.py), so the model column says which
    captions have one."""
    dt = store.table("captions")
    t = store.scan("captions", dt, {"extractor_id": extractor_id}, ["video_id", "content_sha256", "caption", "text_model"])
    model = t.column("text_model")
    need = pc.or_kleene(pc.is_null(model), pc.not_equal(model, text_model))
    t = t.filter(pc.fill_null(need, True))
    return pa.table({"video_id": t.column("video_id"), "content_sha256": t.column("content_sha256"),
                     "extractor_id": pa.array([extractor_id] * t.num_rows, pa.string()), "caption": t.column("caption")})


@dataclass
class ChangeCheck:
    hashed: list[VideoRef]  # every readable file, with its content hash (reused or read), in order
    unreadable: list[tuple[VideoRef, str]]
    reused: int = 0  # hashes taken from the file index: no byte read
    read_files: int = 0  # files hashed by reading them
    read_bytes: int = 0


def check_changes(store: FeatureStore, refs: Sequence[VideoRef], verify: bool = False,
                  verify_days: float = 0.0) -> ChangeCheck:
    """The content hash of every discovered file, reading only those whose signature is not the
    one recorded in the store's file index with their hash (new, changed, never trusted), or all
    of them with `verify`, or those hashed more than `verify_days` ago. Files hashed here whose
    signature can be trusted (not modified within 2 s of hashing, not replaced while read) are
    recorded in the index, one commit."""
    refs = [r if r.problem or not r.uri or "://" not in r.uri or r.object_sig else _with_object_sig(r) for r in refs]
    known: dict[int, VideoRef] = {}
    if not verify:
        index = store.file_index()
        if verify_days > 0:
            since = datetime.now(timezone.utc) - timedelta(days=verify_days)
            index = index.filter(pc.greater_equal(index.column("hashed_at"), pa.scalar(since, index.schema.field("hashed_at").type)))
        sigs = [(i, r.uri, signature(r)) for i, r in enumerate(refs) if not r.problem]
        sigs = [x for x in sigs if x[2]]
        if index.num_rows and sigs:
            found = pa.table({"i": pa.array([i for i, _, _ in sigs], pa.int64()), "uri": [u for _, u, _ in sigs],
                              "signature": [g for _, _, g in sigs]}).join(
                index.select(["uri", "signature", "content_sha256", "bytes"]), keys=["uri", "signature"],
                join_type="inner")
            for i, sha, size in zip(*(found.column(c).to_pylist() for c in ("i", "content_sha256", "bytes")), strict=True):
                r = refs[i]  # a plain constructor: dataclasses.replace cost 2 s per 100k refs
                known[i] = VideoRef(r.video_id, r.uri, size, sha, r.problem, r.stat, r.object_sig)
    fresh, unreadable = hash_videos([r for i, r in enumerate(refs) if i not in known])
    trusted = [r for r in fresh if signature(r)]
    if trusted:
        now = datetime.now(timezone.utc)
        store.record_files(pa.table({"uri": [r.uri for r in trusted], "signature": [signature(r) for r in trusted],
                                     "content_sha256": [r.content_sha256 for r in trusted],
                                     "bytes": pa.array([r.bytes for r in trusted], pa.int64()),
                                     "hashed_at": pa.array([now] * len(trusted), pa.timestamp("us", tz="UTC"))}))
    by_uri = {r.uri: r for r in fresh}
    hashed = [known.get(i) or by_uri.get(r.uri) for i, r in enumerate(refs)]
    return ChangeCheck([r for r in hashed if r is not None], unreadable, reused=len(known), read_files=len(fresh),
                       read_bytes=sum(r.bytes for r in fresh))


def _with_object_sig(ref: VideoRef) -> VideoRef:
    """A remote ref named by a manifest gets its signature from one metadata request."""
    try:
        return replace(ref, object_sig=remote_signature(ref.uri))
    except Exception:  # noqa: BLE001 - unreachable now: hashing reports the error as a read failure
        return ref


@dataclass
class Plan:
    """What a refresh of a source will do: computed once per run (see take_plan)."""
    extractor_id: str
    source: Any
    refs: list[VideoRef]
    check: ChangeCheck
    todo: list[VideoRef]
    counts: dict[str, int]
    captions_to_embed: int
    unreadable_new: int  # unreadable files with no recorded failure yet
    seconds: dict[str, float] = field(default_factory=dict)  # discover, check, plan

    def summary(self) -> dict:
        return {"extractor_id": self.extractor_id, "videos": len(self.refs), "to_extract": len(self.todo),
                "captions_to_embed": self.captions_to_embed, "done": self.counts["done"],
                "known_broken": self.counts["known_broken"], "unreadable": self.unreadable_new,
                "hash_reused": self.check.reused, "hash_read": self.check.read_files,
                "read_bytes": self.check.read_bytes, "seconds": dict(self.seconds)}


def make_plan(cfg: Config, source: Any, only_failed: bool = False, verify: bool = False) -> Plan:
    """Discover `source`, check what changed, and plan against the store, without a model."""
    t0 = time.perf_counter()
    refs = discover_videos(source)
    t1 = time.perf_counter()
    eid = extractor_record(cfg).extractor_id
    store = open_store(cfg.store)
    store.mark_abandoned()  # the next start after a crash, even one with nothing new to do
    check = check_changes(store, refs, verify=verify, verify_days=cfg.refresh.verify_days)
    t2 = time.perf_counter()
    failures = store.failure_keys(eid)
    todo, counts = plan_refs(check.hashed, store.complete_keys(eid), failures, only_failed=only_failed)
    to_embed = captions_to_embed(store, eid, cfg.extract.text_model).num_rows
    failed_ids = set(failures.column("video_id").to_pylist())
    unreadable_new = sum(r.video_id not in failed_ids for r, _ in check.unreadable)
    t3 = time.perf_counter()
    return Plan(eid, source, refs, check, todo, counts, to_embed, unreadable_new,
                {"discover": t1 - t0, "check": t2 - t1, "plan": t3 - t2})


# The plan the CLI's pre-check made, for the flow run that follows in this process: (made at, plan).
_PLANS: dict[tuple, tuple[float, Plan]] = {}
PLAN_REUSE_S = 600.0  # an older plan is made again (a long-lived process, e.g. `mvrec serve`)


def _plan_key(cfg: Config, source: Any, only_failed: bool, verify: bool) -> tuple:
    return (str(cfg.store.path), extractor_record(cfg).extractor_id, repr(source), only_failed, verify)


def _cached(key: tuple) -> Plan | None:
    made, plan = _PLANS.get(key, (0.0, None))
    return plan if plan is not None and time.monotonic() - made < PLAN_REUSE_S else None


def pending_work(cfg: Config, source: Any, only_failed: bool = False, verify: bool = False) -> dict:
    """What a refresh of `source` would do, read from the store without loading a model. The plan
    is kept for the flow that runs next in this process (take_plan): the CLI's pre-check, the
    nightly flow and its extraction share one change check. Returns Plan.summary()."""
    key = _plan_key(cfg, source, only_failed, verify)
    plan = _cached(key)
    if plan is None:
        plan = make_plan(cfg, source, only_failed=only_failed, verify=verify)
        _PLANS.clear()
        _PLANS[key] = (time.monotonic(), plan)
    return plan.summary()


def take_plan(cfg: Config, source: Any, only_failed: bool = False, verify: bool = False) -> Plan:
    """The plan pending_work made for this run (used once), or a new one. Files that change after
    it was made are caught when decoded (tasks.discover.changed_since_hash)."""
    key = _plan_key(cfg, source, only_failed, verify)
    plan = _cached(key)
    _PLANS.pop(key, None)
    return plan or make_plan(cfg, source, only_failed, verify)


def forget_plans() -> None:
    """Drop a kept plan that no flow took (a refresh with nothing to extract)."""
    _PLANS.clear()
