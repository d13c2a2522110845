"""Store maintenance as Delta's auto-optimize does it: what the nightly flow runs after its
commits (`maintain-store` in flows/refresh.py), plain and testable without Prefect.

    from storage.maintenance import maintain
    done = maintain(store, max_files=50, max_versions=50, retention_hours=168)

Each table is judged from its Delta log alone (no data read):
- small files: live files under the compaction target (100 MiB, deltalake's default) in the
  partition that has the most of them (the whole table when it has no partitions), which is what
  a reader of that partition opens;
- versions since the last checkpoint: the commits a reader replays after loading it.

A table past `max_files` or `max_versions` (0 turns that check off) is compacted (small files
bin-packed in one commit, the rows unchanged), vacuumed (files unreferenced for
`retention_hours` deleted, except the files of every version a tag names, so `as_of=TAG` keeps
working), and checkpointed at its new version. Log entries older than the log retention (30
days) are deleted as well, but only for a table that no tag pins below the checkpoint: deltalake
cannot load a version whose log entries are gone (tests/test_maintenance.py shows it).

A run that did something is recorded in `runs` (flow `maintain-store`, per-table results in its
stats), which is what `mvrec status` shows as each table's last maintenance.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from storage.schema import ALL_TABLES

TARGET_FILE_BYTES = 100 * 2**20  # optimize.compact's default target (delta.targetFileSize unset)
FLOW = "maintain-store"


def table_health(store, name: str, dt: DeltaTable | None = None) -> dict[str, Any]:
    """{version, files, small_files, checkpoint, since_checkpoint} of one table at dt's version
    (latest when dt is None); small_files is the most in one partition (see the module doc)."""
    dt = dt or store.table(name)
    adds = pa.table(dt.get_add_actions(flatten=True))
    small = adds.filter(pc.less(adds.column("size_bytes"), TARGET_FILE_BYTES)) if adds.num_rows else adds
    parts = [c for c in small.column_names if c.startswith("partition.")]
    if parts and small.num_rows:
        per = small.group_by(parts).aggregate([("size_bytes", "count")])
        most = int(pc.max(per.column("size_bytes_count")).as_py())
    else:
        most = small.num_rows
    checkpoint = store.last_checkpoint(dt)
    version = dt.version()
    return {"version": version, "files": adds.num_rows, "small_files": most, "checkpoint": checkpoint,
            "since_checkpoint": version - (checkpoint if checkpoint is not None else -1)}


def due(health: dict[str, Any], max_files: int, max_versions: int) -> list[str]:
    """Why a table needs maintenance ([] when it does not); a threshold of 0 is off."""
    why = []
    if max_files > 0 and health["small_files"] > max_files:
        why.append(f"{health['small_files']} small files in one partition > {max_files}")
    if max_versions > 0 and health["since_checkpoint"] > max_versions:
        why.append(f"{health['since_checkpoint']} versions since the last checkpoint > {max_versions}")
    return why


def tagged_versions(store) -> dict[str, list[int]]:
    """{table: the versions some tag names}, for vacuum and log cleanup to keep."""
    kept: dict[str, set[int]] = {}
    for snap in store.snapshots():
        for t, v in snap["versions"].items():
            kept.setdefault(t, set()).add(int(v))
    return {t: sorted(vs) for t, vs in kept.items()}


def maintain_table(store, name: str, retention_hours: float, keep_versions: list[int]) -> dict[str, Any]:
    """Compact, vacuum and checkpoint one table (see the module doc). A commit by another writer
    during the compaction makes it give up for now: {"action": "conflict"} (next night again)."""
    try:
        stats = store.optimize_and_vacuum(name, retention_hours, False, keep_versions, full=True)
    except CommitFailedError as e:
        return {"action": "conflict", "message": str(e).splitlines()[0][:300]}
    clean = not [v for v in keep_versions if v < store.table(name).version()]
    checkpoint = store.checkpoint(name, clean_logs=clean)
    return {"action": "maintained", "files_added": stats.get("files_added", 0),
            "files_removed": stats.get("files_removed", 0), "files_vacuumed": stats["files_vacuumed"],
            "checkpoint": checkpoint, "logs_cleaned": clean}


def maintain(store, max_files: int = 50, max_versions: int = 50, retention_hours: float = 168.0,
             record: bool = True) -> dict[str, dict[str, Any]]:
    """Maintain every table past a threshold; returns {table: {before, due, action, ...,
    after}} for every table (action "none" when it was not due). record: write a `maintain-store`
    run when any table was due."""
    if max_files < 0 or max_versions < 0 or retention_hours < 0:
        raise ValueError(f"maintain: thresholds and retention must be >= 0 (max_files={max_files}, "
                         f"max_versions={max_versions}, retention_hours={retention_hours})")
    out: dict[str, dict[str, Any]] = {}
    for name in ALL_TABLES:
        before = table_health(store, name)
        out[name] = {"before": before, "due": due(before, max_files, max_versions), "action": "none"}
    todo = [name for name, r in out.items() if r["due"]]
    if not todo:
        return out
    store.check_all_writable()  # refuse before any table changed
    params = {"max_files": max_files, "max_versions": max_versions, "retention_hours": retention_hours}
    run_id = store.start_run(FLOW, params=params) if record else None
    kept = tagged_versions(store)
    with store.failing_run(run_id) if run_id else nullcontext():
        for name in todo:
            out[name].update(maintain_table(store, name, retention_hours, kept.get(name, [])))
            out[name]["after"] = table_health(store, name)
    if run_id:
        done = [out[n] for n in todo]
        counts = {"tables": sum(r["action"] == "maintained" for r in done),
                  "conflicts": sum(r["action"] == "conflict" for r in done),
                  "files_removed": sum(r.get("files_removed", 0) for r in done),
                  "files_vacuumed": sum(r.get("files_vacuumed", 0) for r in done)}
        store.finish_run(run_id, counts=counts, stats={"tables": {n: out[n] for n in todo}})
    return out


def last_maintenance(runs: pa.Table) -> dict[str, dict[str, Any]]:
    """{table: {run_id, finished, action, ...}} of the newest finished `maintain-store` run that
    touched each table (runs: the runs table's rows with flow, status, finished, stats)."""
    rows = [r for r in runs.to_pylist() if r["flow"] == FLOW and r["finished"] is not None and r.get("stats")]
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["finished"], reverse=True):
        for name, result in (json.loads(r["stats"]).get("tables") or {}).items():
            if name not in out:
                out[name] = {"run_id": r["run_id"], "finished": r["finished"].isoformat(timespec="seconds"),
                             "action": result.get("action"), "before": result.get("before"),
                             "after": result.get("after")}
    return out


def maintenance_status(store, dts: dict[str, DeltaTable], runs: pa.Table) -> dict[str, dict[str, Any]]:
    """{table: {version, files, small_files, checkpoint, since_checkpoint, last}} for `mvrec
    status`: each table now (from its loaded log) and its last maintenance (None: never)."""
    last = last_maintenance(runs)
    return {name: {**table_health(store, name, dts[name]), "last": last.get(name)} for name in ALL_TABLES}
