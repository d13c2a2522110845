"""What `mvrec status` shows, as plain data: the last runs, open failures by reason, each
extractor's progress and tags, videos whose file changed since extraction, and the store's size.

    from storage.status import store_status
    s = store_status(FeatureStore(path, create=False), runs=10)   # a JSON-ready dict

Reads metadata and key columns only (never an embedding), so it stays fast on a large store.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from storage.schema import ALL_TABLES

EXAMPLES = 3  # paths listed per failure reason / changed-file reason


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat(timespec="seconds") if ts is not None else None


def last_runs(store, n: int) -> list[dict[str, Any]]:
    """The newest `n` runs: flow, status, counts and duration (None while running)."""
    rows = store.read("runs").to_pylist()
    rows.sort(key=lambda r: r["started"], reverse=True)
    out = []
    for r in rows[:n]:
        done = r["finished"]
        out.append({"run_id": r["run_id"], "flow": r["flow"], "extractor_id": r["extractor_id"],
                    "status": r["status"], "started": _iso(r["started"]), "finished": _iso(done),
                    "duration_s": round((done - r["started"]).total_seconds(), 3) if done else None,
                    "counts": dict(r["counts"] or []), "message": r["message"] or ""})
    return out


def failures_by_reason(store) -> list[dict[str, Any]]:
    """Open failures grouped by (stage, error_type), largest group first, with a few example paths."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for f in store.read("failures", columns=["video_id", "uri", "stage", "error_type", "message"]).to_pylist():
        g = groups.setdefault((f["stage"], f["error_type"]),
                              {"stage": f["stage"], "error_type": f["error_type"], "count": 0, "examples": []})
        g["count"] += 1
        if len(g["examples"]) < EXAMPLES:
            g["examples"].append({"video_id": f["video_id"], "uri": f["uri"], "message": f["message"][:200]})
    return sorted(groups.values(), key=lambda g: (-g["count"], g["stage"], g["error_type"]))


def _extractors_in(store, version: int) -> set[str]:
    """Extractor ids with rows in hidden_states at `version` (from the log's partition values)."""
    dt = store.table("hidden_states", version)
    return {p["extractor_id"] for p in dt.partitions()}


def extractor_progress(store, max_tags: int = 20) -> list[dict[str, Any]]:
    """Per extractor: videos with every stored layer, partial ones among them, its newest run
    and the tags (newest first) whose snapshot holds its features."""
    tags = sorted(store.snapshots(), key=lambda s: s["created"], reverse=True)[:max_tags]
    tagged: dict[str, list[str]] = {}
    for s in tags:
        v = s["versions"].get("hidden_states")
        for eid in _extractors_in(store, v) if v is not None else ():
            tagged.setdefault(eid, []).append(s["name"])
    runs = store.read("runs", columns=["extractor_id", "finished", "status", "run_id"]).to_pylist()
    partial = partial_videos(store)
    out = []
    for e in sorted(store.extractors(), key=lambda e: e["created"]):
        eid = e["extractor_id"]
        done = store.completed(eid)
        mine = [r for r in runs if r["extractor_id"] == eid and r["finished"] is not None]
        last = max(mine, key=lambda r: r["finished"]) if mine else None
        out.append({"extractor_id": eid, "model": e["model"], "frame_policy": e["frame_policy"],
                    "dim": e["dim"], "layers": store.layers(eid), "videos_done": len(done),
                    "partial": len(done & partial),
                    "last_run": {"run_id": last["run_id"], "status": last["status"],
                                 "finished": _iso(last["finished"])} if last else None,
                    "newest_tag": (tagged.get(eid) or [None])[0], "tags": tagged.get(eid, [])})
    return out


def partial_videos(store) -> set[tuple[str, str]]:
    """(video_id, content_sha256) of videos decoded from fewer frames than their header promised."""
    t = store.read("videos", columns=["video_id", "content_sha256", "partial"])
    t = t.filter(pc.fill_null(t.column("partial"), False))
    return set(zip(t.column("video_id").to_pylist(), t.column("content_sha256").to_pylist()))


def latest_videos(store) -> pa.Table:
    """One row per video_id: its most recently seen content version."""
    t = store.read("videos", columns=["video_id", "uri", "content_sha256", "bytes", "last_seen"])
    if not t.num_rows:
        return t
    t = t.sort_by([("video_id", "ascending"), ("last_seen", "descending")])
    ids = t.column("video_id").combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), first])
    return t.filter(keep)


def changed_files(store, hash_file: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Videos whose local file differs from the content that was extracted.

    A missing file or another size is a change. A file modified after it was last seen is hashed
    with `hash_file(path) -> sha256 hex` when given (only those files, so the cost follows the
    number of touched files), else reported as `modified` (unverified). Object-store URIs are
    not checked.
    """
    out = []
    for r in latest_videos(store).to_pylist():
        uri = r["uri"] or ""
        if "://" in uri and not uri.startswith("file://"):
            continue
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        try:
            st = os.stat(path)
        except OSError:
            out.append({"video_id": r["video_id"], "uri": uri, "reason": "missing"})
            continue
        if r["bytes"] is not None and st.st_size != r["bytes"]:
            out.append({"video_id": r["video_id"], "uri": uri, "reason": "size"})
        elif r["last_seen"] is not None and st.st_mtime > r["last_seen"].timestamp():
            if hash_file is None:
                out.append({"video_id": r["video_id"], "uri": uri, "reason": "modified"})
            elif hash_file(path) != r["content_sha256"]:
                out.append({"video_id": r["video_id"], "uri": uri, "reason": "content"})
    return out


def store_size(store) -> dict[str, Any]:
    """Per table: version, live files, rows and bytes (from the Delta log); plus the bytes on disk
    under the store, old versions and logs included (local stores only)."""
    tables, live = {}, 0
    for name in ALL_TABLES:
        dt: DeltaTable = store.table(name)
        adds = pa.table(dt.get_add_actions(flatten=True))
        size = int(pc.sum(adds.column("size_bytes")).as_py() or 0) if adds.num_rows else 0
        rows = int(pc.sum(adds.column("num_records")).as_py() or 0) if adds.num_rows else 0
        tables[name] = {"version": dt.version(), "files": adds.num_rows, "rows": rows, "bytes": size}
        live += size
    on_disk = None
    if store.is_local:
        on_disk = 0
        for root, _, files in os.walk(store.root):
            for f in files:
                try:
                    on_disk += os.lstat(os.path.join(root, f)).st_size
                except OSError:  # removed by a concurrent vacuum
                    pass
    return {"live_bytes": live, "bytes_on_disk": on_disk, "tables": tables}


def store_status(store, runs: int = 10, check_files: bool = True,
                 hash_file: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Everything `mvrec status` shows, as a JSON-ready dict."""
    failures = failures_by_reason(store)
    changed = changed_files(store, hash_file) if check_files else None
    return {
        "store": store.root,
        "runs": last_runs(store, runs),
        "failures": {"open": sum(g["count"] for g in failures), "by_reason": failures},
        "extractors": extractor_progress(store),
        "partial_videos": len(partial_videos(store)),
        "changed_files": None if changed is None else {"count": len(changed), "videos": changed},
        "size": store_size(store),
    }
