"""Planning an extraction run, without Prefect: which extractor, which videos still need the model.

Kept free of Prefect imports so `mvrec refresh` can check for new work in about a second and skip
starting an orchestrator when there is none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow.compute as pc

import mvrec
from mvrec.config import Config
from storage import ExtractorRecord, FeatureStore, open_store
from tasks.discover import VideoRef, discover_videos, hash_videos
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


def plan_work(videos: Sequence[VideoRef], completed: set[tuple[str, str]], failures: Sequence[dict],
              only_failed: bool = False) -> tuple[list[VideoRef], dict[str, int]]:
    """Which videos need the model: those whose content on disk now is not the content the store
    serves for them (`completed` is `store.completed(eid)`: pairs with every layer that readers are
    served, see FeatureStore.served; so a file reverted to an earlier content is extracted again,
    which makes that content the served one), and not known to be permanently broken (unless
    only_failed, which takes exactly the videos with open failures). Failure rows written before the
    `permanent` column existed read as not permanent: tried once more."""
    failed_ids = {f["video_id"] for f in failures}
    permanent = {(f["video_id"], f.get("content_sha256") or "") for f in failures if f.get("permanent")}
    todo, counts = [], {"done": 0, "known_broken": 0, "not_failed": 0}
    for ref in videos:
        if (ref.video_id, ref.content_sha256) in completed:
            counts["done"] += 1
        elif only_failed and ref.video_id not in failed_ids:
            counts["not_failed"] += 1
        elif not only_failed and ((ref.video_id, ref.content_sha256) in permanent or (ref.video_id, "") in permanent):
            counts["known_broken"] += 1
        else:
            todo.append(ref)
    return todo, counts


def captions_to_embed(store: FeatureStore, extractor_id: str, text_model: str) -> list[dict]:
    """Caption rows of this extractor without a vector from `text_model`."""
    t = store.read("captions")
    rows = t.filter(pc.equal(t.column("extractor_id"), extractor_id)).to_pylist()
    return [r for r in rows if r.get("text_embedding") is None or r.get("text_model") != text_model]


def pending_work(cfg: Config, source: str, only_failed: bool = False) -> dict:
    """What a refresh of `source` would do, read from the store without loading a model.

    Returns {"extractor_id", "videos", "to_extract", "captions_to_embed", "done", "known_broken",
    "unreadable" (files that cannot be read and have no recorded failure yet)}.
    """
    refs = discover_videos(source)
    hashed, unreadable = hash_videos(refs)
    eid = extractor_record(cfg).extractor_id
    store = open_store(cfg.store)
    store.mark_abandoned()  # the next start after a crash, even one with nothing new to do
    failures = store.failures(eid)
    todo, counts = plan_work(hashed, store.completed(eid), failures, only_failed=only_failed)
    to_embed = len(captions_to_embed(store, eid, cfg.extract.text_model))
    known_unreadable = {f["video_id"] for f in failures}
    return {"extractor_id": eid, "videos": len(refs), "to_extract": len(todo), "captions_to_embed": to_embed,
            "done": counts["done"], "known_broken": counts["known_broken"],
            "unreadable": len([r for r, _ in unreadable if r.video_id not in known_unreadable])}
