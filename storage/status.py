"""What `mvrec status` shows, as plain data: the last runs, open failures by reason, each
extractor's progress and tags, videos whose file changed since extraction, the store's size, and
each table's files, versions since its checkpoint and last maintenance.

    from storage.status import store_status
    s = store_status(FeatureStore(path, create=False), runs=10)   # a JSON-ready dict

Reads metadata and key columns only (never an embedding), and loads each table's Delta log once,
so it stays fast on a large store (bench/status.py).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from storage.arrow import conform
from storage.maintenance import maintenance_status
from storage.runs import describe, owner_gone
from storage.schema import ALL_TABLES

EXAMPLES = 3  # paths listed per failure reason


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat(timespec="seconds") if ts is not None else None


class _Tables:
    """Every table loaded once at its latest version; small reads straight from their files."""

    def __init__(self, store):
        self.store = store
        self.dt: dict[str, DeltaTable] = {name: store.table(name) for name in ALL_TABLES}

    def read(self, name: str, columns: list[str]) -> pa.Table:
        dt = self.dt[name]
        have = {f.name for f in dt.schema().fields}  # an older schema: the added columns read as NULL
        return conform(name, self.store.scan(name, dt, {}, [c for c in columns if c in have])).select(columns)


def last_runs(runs: pa.Table, n: int) -> list[dict[str, Any]]:
    """The newest `n` runs: flow, status, counts and duration (None while running). A run still
    recorded `running` whose process is gone (killed, storage/runs.py) shows as `abandoned`;
    status only reads, so the row itself is marked by the next run that starts."""
    rows = sorted(runs.to_pylist(), key=lambda r: r["started"], reverse=True)
    out = []
    for r in rows[:n]:
        done, status, message = r["finished"], r["status"], r["message"] or ""
        if status == "running" and owner_gone(r.get("owner")):
            status, message = "abandoned", f"abandoned: {describe(r['owner'])} is gone (not yet recorded by a run)"
        out.append({"run_id": r["run_id"], "flow": r["flow"], "extractor_id": r["extractor_id"],
                    "status": status, "started": _iso(r["started"]), "finished": _iso(done),
                    "duration_s": round((done - r["started"]).total_seconds(), 3) if done else None,
                    "counts": dict(r["counts"] or []), "message": message})
    return out


def failures_by_reason(failures: pa.Table) -> list[dict[str, Any]]:
    """Open failures grouped by (stage, error_type), largest group first, with a few examples."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for f in failures.to_pylist():
        g = groups.setdefault((f["stage"], f["error_type"]),
                              {"stage": f["stage"], "error_type": f["error_type"], "count": 0, "examples": []})
        g["count"] += 1
        if len(g["examples"]) < EXAMPLES:
            g["examples"].append({"video_id": f["video_id"], "uri": f["uri"], "message": f["message"][:200]})
    return sorted(groups.values(), key=lambda g: (-g["count"], g["stage"], g["error_type"]))


def _layers_by_extractor(dt: DeltaTable) -> dict[str, list[int]]:
    """{extractor_id: stored layers} of hidden_states at dt's version (from the log, no data read)."""
    out: dict[str, set[int]] = {}
    for p in dt.partitions():
        out.setdefault(p["extractor_id"], set()).add(int(p["layer"]))
    return {e: sorted(ls) for e, ls in out.items()}


def extractor_progress(store, t: _Tables, runs: pa.Table, partial: set[tuple[str, str]],
                       max_tags: int = 20) -> list[dict[str, Any]]:
    """Per extractor: videos with every stored layer, the `partial` ones among them, its newest
    run, and the tags (newest first) whose snapshot holds its features."""
    hs = t.dt["hidden_states"]
    stored = _layers_by_extractor(hs)
    snaps = t.read("snapshots", ["name", "created", "versions"]).to_pylist()
    tagged: dict[str, list[str]] = {}
    for s in sorted(snaps, key=lambda s: s["created"], reverse=True)[:max_tags]:
        v = dict(s["versions"] or []).get("hidden_states")
        if v is not None:
            for eid in _layers_by_extractor(store.table("hidden_states", v)):
                tagged.setdefault(eid, []).append(s["name"])
    finished = [r for r in runs.to_pylist() if r["finished"] is not None]
    out = []
    extractors = t.read("extractors", ["extractor_id", "model", "frame_policy", "dim", "created"]).to_pylist()
    for e in sorted(extractors, key=lambda e: e["created"]):
        eid = e["extractor_id"]
        layers = stored.get(eid, [])
        done = store.completed(eid, layers=layers, as_of=hs.version()) if layers else set()
        mine = [r for r in finished if r["extractor_id"] == eid]
        last = max(mine, key=lambda r: r["finished"]) if mine else None
        out.append({"extractor_id": eid, "model": e["model"], "frame_policy": e["frame_policy"],
                    "dim": e["dim"], "layers": layers, "videos_done": len(done), "partial": len(done & partial),
                    "last_run": {"run_id": last["run_id"], "status": last["status"],
                                 "finished": _iso(last["finished"])} if last else None,
                    "newest_tag": (tagged.get(eid) or [None])[0], "tags": tagged.get(eid, [])})
    return out


def partial_videos(videos: pa.Table) -> set[tuple[str, str]]:
    """(video_id, content_sha256) of videos decoded from fewer frames than their header promised."""
    t = videos.filter(pc.fill_null(videos.column("partial"), False))
    return set(zip(t.column("video_id").to_pylist(), t.column("content_sha256").to_pylist(), strict=True))


def latest_videos(t: pa.Table) -> pa.Table:
    """One row per video_id: its most recently seen content version."""
    if not t.num_rows:
        return t
    t = t.sort_by([("video_id", "ascending"), ("last_seen", "descending")])
    ids = t.column("video_id").combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    return t.filter(pa.concat_arrays([pa.array([True]), first]))


def changed_files(videos: pa.Table, hash_file: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Videos whose local file differs from the content that was extracted (`videos` rows:
    video_id, uri, content_sha256, bytes, last_seen).

    A missing file or another size is a change. A file modified after it was last seen is hashed
    with `hash_file(path) -> sha256 hex` when given (only those files, so the cost follows the
    number of touched files), else reported as `modified` (unverified). Object-store URIs are
    not checked.
    """
    out = []
    for r in latest_videos(videos).to_pylist():
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


def store_size(store, dts: dict[str, DeltaTable] | None = None) -> dict[str, Any]:
    """Per table: version, live files, rows and bytes (from the Delta log); plus the bytes on disk
    under the store, old versions and logs included (local stores only)."""
    tables, live = {}, 0
    for name in ALL_TABLES:
        dt = dts[name] if dts else store.table(name)
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
    t = _Tables(store)
    videos = t.read("videos", ["video_id", "uri", "content_sha256", "bytes", "last_seen", "partial"])
    run_rows = t.read("runs", ["run_id", "flow", "extractor_id", "status", "started", "finished", "counts", "message",
                               "owner"])
    partial = partial_videos(videos)
    failures = failures_by_reason(t.read("failures", ["video_id", "uri", "stage", "error_type", "message"]))
    changed = changed_files(videos, hash_file) if check_files else None
    maintenance = maintenance_status(store, t.dt, t.read("runs", ["run_id", "flow", "finished", "stats"]))
    return {
        "store": store.root,
        "runs": last_runs(run_rows, runs),
        "failures": {"open": sum(g["count"] for g in failures), "by_reason": failures},
        "extractors": extractor_progress(store, t, run_rows, partial),
        "partial_videos": len(partial),
        "changed_files": None if changed is None else {"count": len(changed), "videos": changed},
        "size": store_size(store, t.dt),
        "maintenance": maintenance,
    }
