"""The feature store's domain API: videos, extractors, captions, hidden states, failures, runs
and named snapshots, over the Delta table mechanics of storage/delta.py.

Each table (storage/schema.py) is one Delta table under `<path>/<name>/`; `path` is a local
directory or an object-store URI (s3://bucket/prefix) with `storage_options` passed to Delta
Lake's object store. Every write is one Delta commit: readers see the table before or after it,
never in between.

Across tables there is no transaction. A batch is written table by table in a fixed order,
videos -> extractors -> captions -> failures -> hidden_states (last), so `hidden_states` is the
source of truth of completeness: a crash part way leaves at most extra rows in the earlier
tables, the video is not `completed()`, and redoing it is an idempotent upsert. For a view that
is consistent across tables, read `as_of` a named snapshot (`tag()`).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.arrow import conform, key_strings, to_arrow, vector_rows, video_extractor_pairs
from deltalake import DeltaTable

from storage.delta import DeltaTables, StoreNotWritableError
from storage.records import AsOf, ExtractionBatch, ExtractorRecord, FeatureMatrix, MissingItemsError
from storage.lease import holder as lease_holder
from storage.maintenance import maintain, tagged_versions
from storage.lease import run_lease
from storage.runs import describe, owner_fields, owner_gone, process_owner
from storage.schema import ALL_TABLES, DATA_TABLES, PIN_ORDER


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _add_attempts(new: pa.Table, existing: pa.Table) -> pa.Table:
    """combine() for failures: attempts accumulate over record_failures calls."""
    if not existing.num_rows:
        return new
    key = ALL_TABLES["failures"].key
    pos = pc.index_in(key_strings(new, key), value_set=key_strings(existing, key))
    old = pc.fill_null(existing.column("attempts").combine_chunks().take(pos), 0)
    i = new.schema.get_field_index("attempts")
    return new.set_column(i, "attempts", pc.add(new.column("attempts"), old))



class FeatureStore(DeltaTables):
    """The mvrec feature tables at `path` (local directory or s3://bucket/prefix).

    create=True makes missing tables (an empty store is valid); create=False raises
    FileNotFoundError when there is no store at `path`.
    """

    def __init__(self, path: str | os.PathLike[str], storage_options: Mapping[str, str] | None = None,
                 create: bool = True):
        super().__init__(path, storage_options)
        if self.is_local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NotADirectoryError(f"store.path: {self.root} is a file, not a feature store directory "
                                     "(point [store] path / MVREC_STORE__PATH at a directory)")
        if create:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
            for spec in ALL_TABLES.values():
                self.ensure(spec)
        elif not self.exists():
            raise FileNotFoundError(f"no feature store at {self.root} (write features first, "
                                    "or point [store] path / MVREC_STORE__PATH at one)")
        elif not DeltaTable.is_deltatable(self.uri("file_index"), self.storage_options):
            try:  # a store from before schema v5: its (empty) file index, where the store is writable
                self.ensure(ALL_TABLES["file_index"])
            except StoreNotWritableError:
                pass

    def __repr__(self) -> str:
        return f"FeatureStore({self.root!r})"

    # -- versions and snapshots -------------------------------------------------------------

    def snapshot(self) -> dict[str, int]:
        """The current Delta version of every data table; record it with a training run."""
        pinned = {name: self.table(name).version() for name in PIN_ORDER if name in DATA_TABLES}
        return {name: pinned[name] for name in DATA_TABLES}

    def tag(self, name: str, note: str = "", versions: Mapping[str, int] | None = None) -> dict[str, int]:
        """Name the current versions of all tables (or `versions`). Tags are immutable.

        Written as one commit to the `snapshots` table, so a tag exists completely or not at all.
        """
        if not name or not name.strip() or name.strip().isdigit():
            raise ValueError(f"tag name {name!r}: must be non-empty and not a number")
        versions = dict(versions) if versions is not None else self.snapshot()
        unknown = set(versions) - set(DATA_TABLES)
        if unknown:
            raise ValueError(f"tag {name!r}: unknown table(s) {sorted(unknown)}")
        spec = ALL_TABLES["snapshots"]
        rows = to_arrow(spec, [{"name": name, "created": utcnow(), "versions": versions, "note": note}])

        def refuse_existing(new: pa.Table, existing: pa.Table) -> pa.Table:
            if existing.num_rows:
                raise ValueError(f"tag {name!r} already exists (tags are immutable; pick another name)")
            return new

        # Checked inside the commit's read: a concurrent tag of the same name makes one of the
        # two commits conflict, and its retry sees the name and refuses.
        self.replace_keys(spec, rows, combine=refuse_existing)
        return versions

    def snapshots(self) -> list[dict[str, Any]]:
        """All tags, oldest first: [{name, created, versions: {table: version}, note}]."""
        rows = self.table("snapshots").to_pyarrow_table().to_pylist()
        for r in rows:
            r["versions"] = dict(r["versions"] or [])
        return sorted(rows, key=lambda r: r["created"])

    def resolve(self, as_of: AsOf) -> dict[str, int] | None:
        """as_of -> {table: version} (None: latest). Accepts a tag name or a snapshot() dict."""
        if as_of is None:
            return None
        if isinstance(as_of, Mapping):
            return {str(k): int(v) for k, v in as_of.items()}
        if isinstance(as_of, str):
            if as_of.strip().lstrip("-").isdigit():
                raise ValueError(f"as_of={as_of!r}: a bare version number is ambiguous across tables; "
                                 "use a tag name or {table: version}")
            dt = self.table("snapshots")
            hit = dt.to_pyarrow_table(filters=[("name", "=", as_of)]).to_pylist()
            if not hit:
                known = [r["name"] for r in self.snapshots()]
                raise ValueError(f"unknown snapshot tag {as_of!r} (known: {', '.join(known) or 'none'})")
            return dict(hit[0]["versions"])
        raise ValueError(f"as_of={as_of!r}: expected a tag name or a {{table: version}} mapping")

    def version_of(self, table: str, as_of: AsOf) -> int | None:
        """The version of one table that `as_of` means (an int is that table's own version)."""
        if isinstance(as_of, (int, np.integer)) and not isinstance(as_of, bool):
            return int(as_of)
        versions = self.resolve(as_of)
        if versions is None:
            return None
        if table not in versions:
            raise ValueError(f"as_of {as_of!r} has no version for table {table!r}")
        return versions[table]

    # -- writes -----------------------------------------------------------------------------

    def upsert_videos(self, rows: Iterable[Any] | pa.Table) -> int:
        """Upsert videos by (video_id, content_sha256); first_seen is kept, last_seen updated."""
        now = utcnow()
        return self.upsert(ALL_TABLES["videos"], rows, defaults={"first_seen": now, "last_seen": now})

    def upsert_extractor(self, rec: ExtractorRecord) -> str:
        """Record an extractor's lineage (idempotent). Returns its extractor_id."""
        eid = rec.extractor_id
        row = {"extractor_id": eid, "model": rec.model, "revision": rec.revision, "prompt": rec.prompt,
               "frame_policy": rec.frame_policy, "pooling": rec.pooling, "code_version": rec.code_version,
               "params": json.dumps(dict(rec.params), sort_keys=True, default=str),
               "dim": rec.dim, "num_layers": rec.num_layers, "created": utcnow()}
        self.upsert(ALL_TABLES["extractors"], [row])
        return eid

    def extractors(self) -> list[dict[str, Any]]:
        """All extractor records."""
        return self.table("extractors").to_pyarrow_table().to_pylist()

    def upsert_captions(self, rows: Iterable[Any] | pa.Table) -> int:
        """Upsert captions by (video_id, content_sha256, extractor_id)."""
        return self.upsert(ALL_TABLES["captions"], rows)

    def upsert_hidden_states(self, rows: Iterable[Any] | pa.Table) -> int:
        """Upsert pooled hidden states by (video_id, content_sha256, extractor_id, layer).

        Every embedding of one extractor in the batch must have the same, non-zero length.
        """
        spec = ALL_TABLES["hidden_states"]
        data = to_arrow(spec, rows)
        if data.num_rows:
            emb = data.column("embedding")
            if emb.null_count:
                raise ValueError("hidden_states.embedding: null embedding in batch")
            lengths = pc.list_value_length(emb)
            by_ex = pa.table({"e": data.column("extractor_id"), "n": lengths}).group_by("e").aggregate(
                [("n", "min"), ("n", "max")])
            for e, lo, hi in zip(*(by_ex.column(c).to_pylist() for c in ("e", "n_min", "n_max")), strict=True):
                if lo != hi or lo == 0:
                    raise ValueError(f"hidden_states.embedding: extractor {e} has embeddings of "
                                     f"length {lo}..{hi} in one batch; expected one hidden size")
        return self.upsert(spec, data)

    def record_failures(self, rows: Iterable[Any] | pa.Table) -> int:
        """Upsert open failures by (video_id, extractor_id, stage); `attempts` add up over calls."""
        return self.upsert(ALL_TABLES["failures"], rows,
                            defaults={"at": utcnow(), "attempts": 1, "extractor_id": "", "content_sha256": "",
                                      "permanent": False},
                            combine=_add_attempts)

    def clear_failures(self, keys: Iterable[tuple[str, str]]) -> int:
        """Delete the failures of (video_id, extractor_id) pairs, plus that video's model-independent
        failures (extractor_id ''), e.g. after it succeeded. One commit; returns the version."""
        keys = [(str(v), str(e)) for v, e in keys]
        pairs = sorted(set(keys) | {(v, "") for v, _ in keys})
        spec = ALL_TABLES["failures"]
        if not pairs:
            return self.table("failures").version()
        # Every stage of each pair: expand to the stored keys, then delete exactly those.
        t = self.table("failures").to_pyarrow_dataset().to_table(
            columns=list(spec.key), filter=pc.field("video_id").isin(sorted({v for v, _ in pairs})))
        want = pa.array([f"{v}\x1f{e}" for v, e in pairs])
        t = t.filter(pc.is_in(key_strings(t, ["video_id", "extractor_id"]), value_set=want))
        return self.replace_keys(spec, t, delete_only=True)

    def failures(self, extractor_id: str | None = None) -> list[dict[str, Any]]:
        """Open failures (optionally of one extractor, including its model-independent ones)."""
        t = conform("failures", self.table("failures").to_pyarrow_table())
        if extractor_id is not None:
            t = t.filter(pc.is_in(t.column("extractor_id"), pa.array([extractor_id, ""])))
        return t.to_pylist()

    def start_run(self, flow: str, extractor_id: str = "", params: Mapping[str, Any] | None = None,
                  run_id: str | None = None) -> str:
        """Record a run as `running`, owned by this process, after marking the runs whose process
        is gone as abandoned. Returns its run_id (generated when not given)."""
        self.mark_abandoned()
        run_id = run_id or f"{utcnow():%Y%m%dT%H%M%S}-{os.urandom(4).hex()}"
        self.upsert(ALL_TABLES["runs"], [{
            "run_id": run_id, "flow": flow, "extractor_id": extractor_id, "started": utcnow(),
            "status": "running", "counts": {}, "params": json.dumps(dict(params or {}), sort_keys=True, default=str),
            "owner": process_owner(),
        }])
        return run_id

    def mark_abandoned(self) -> list[str]:
        """Runs still `running` whose process is gone (storage/runs.py) become `abandoned`, with
        `finished` = when this found them. Returns their run_ids."""
        # Key columns first, straight from the Parquet files (no dataset, no pandas import): every
        # start of a nightly run calls this, and almost always nothing is running.
        keys = conform("runs", self.scan("runs", self.table("runs"), {}, ["run_id", "status"]))
        if not pc.any(pc.equal(keys.column("status"), "running")).as_py():
            return []
        t = self.read("runs")
        rows = [r for r in t.filter(pc.equal(t.column("status"), "running")).to_pylist() if owner_gone(r["owner"])]
        now = utcnow()
        for r in rows:
            r.update(status="abandoned", finished=now,
                     message=f"abandoned: {describe(r['owner'])} was gone when found at {now:%Y-%m-%d %H:%M:%S} UTC")
        if rows:
            self.upsert(ALL_TABLES["runs"], rows)
        return [r["run_id"] for r in rows]

    def lease_path(self, extractor_id: str) -> str:
        return os.path.join(self.root, "_leases", f"extract-{extractor_id}.lease")

    @contextmanager
    def run_lease(self, extractor_id: str) -> Iterator[dict[str, Any]]:
        """Hold this store's run lease for `extractor_id` for the body (storage/lease.py), or raise
        RunLeaseHeld at once, naming the run that holds it. Yields the owner recorded in the lease
        ({host, pid, pid_started, started}). The lease expires when its process dies. An object
        store has no lease: it yields {..., "locked": False} and does not exclude anything."""
        if not self.is_local:
            yield {**owner_fields(), "locked": False}
            return
        with run_lease(self.lease_path(extractor_id), f"extractor {extractor_id} into {self.root}") as owner:
            yield owner

    def lease_holder(self, extractor_id: str) -> dict[str, Any] | None:
        """Who holds the run lease of `extractor_id` ({host, pid, pid_started, started}), or None."""
        return lease_holder(self.lease_path(extractor_id)) if self.is_local else None

    @contextmanager
    def failing_run(self, run_id: str) -> Iterator[None]:
        """An exception inside (a full disk, a bug, Ctrl-C) ends the run `failed` with its message,
        then goes on. If even that write fails, the next start marks the run abandoned."""
        try:
            yield
        except BaseException as e:
            try:
                self.finish_run(run_id, status="failed", message=f"{type(e).__name__}: {e}"[:2000])
            except Exception as also:  # noqa: BLE001 - the first error is the one to raise
                e.add_note(f"the run could not be marked failed: {type(also).__name__}: {also}")
            raise

    def finish_run(self, run_id: str, status: str = "completed", counts: Mapping[str, int] | None = None,
                   message: str = "", stats: Mapping[str, Any] | None = None) -> dict[str, int]:
        """Close a run with its status, counts and stats (JSON-able, e.g. per-layer norm statistics);
        records and returns the table versions it produced."""
        t = self.table("runs").to_pyarrow_table(filters=[("run_id", "=", run_id)]).to_pylist()
        if not t:
            raise ValueError(f"runs: no run with run_id {run_id!r} (call start_run first)")
        row = t[0]
        snap = self.snapshot()
        row.update(finished=utcnow(), status=status, counts=dict(counts or {}),
                   snapshot=json.dumps(snap, sort_keys=True), message=message,
                   stats=json.dumps(dict(stats), sort_keys=True, default=str) if stats else None)
        self.upsert(ALL_TABLES["runs"], [row])
        return snap

    def write_batch(self, batch: ExtractionBatch, clear_failures: bool = True) -> dict[str, int]:
        """Write one extraction batch: videos, captions, failures, then hidden_states, then clear
        the failures of videos whose hidden states landed. Each table is one atomic commit;
        hidden_states goes last because it defines completeness (see the module docstring).
        Returns the table versions after the batch.
        """
        versions: dict[str, int] = {}
        if len(batch.videos):
            versions["videos"] = self.upsert_videos(batch.videos)
        if len(batch.captions):
            versions["captions"] = self.upsert_captions(batch.captions)
        if len(batch.failures):
            versions["failures"] = self.record_failures(batch.failures)
        if len(batch.hidden_states):
            hs = batch.hidden_states
            versions["hidden_states"] = self.upsert_hidden_states(hs)
            if clear_failures:
                failed_now = video_extractor_pairs(batch.failures) if len(batch.failures) else set()
                done = video_extractor_pairs(hs) - failed_now
                if done:
                    versions["failures"] = self.clear_failures(done)
        return versions

    # -- reads ------------------------------------------------------------------------------

    def layers(self, extractor_id: str, as_of: AsOf = None) -> list[int]:
        """The layer indices stored for an extractor (final is -1)."""
        dt = self.table("hidden_states", self.version_of("hidden_states", as_of))
        out = set()
        for part in dt.partitions(file_pruning_predicate=[("extractor_id", "=", extractor_id)]):
            out.add(int(part["layer"]))
        return sorted(out)

    def completed(self, extractor_id: str, layers: Sequence[int] | None = None,
                  as_of: AsOf = None) -> set[tuple[str, str]]:
        """(video_id, content_sha256) pairs that have every layer in `layers` for this extractor and
        are what readers are served for that video (see `served`): a video whose file went back to
        an earlier content is not completed for that content while a later one is served.

        layers=None: every layer stored for this extractor (by any video). Reads only key columns.
        """
        version = self.version_of("hidden_states", as_of)
        dt = self.table("hidden_states", version)
        want = sorted(set(int(k) for k in layers)) if layers is not None else self.layers(extractor_id, version)
        if not want:
            return set()
        # Per layer partition through scan (local files read directly: 3x faster than a dataset
        # over hundreds of small commit files); keys are unique within a partition, so a pair
        # with every layer appears len(want) times.
        keys = pa.concat_tables([self.scan("hidden_states", dt, {"extractor_id": extractor_id, "layer": k},
                                           ["video_id", "content_sha256"]) for k in want])
        counts = keys.group_by(["video_id", "content_sha256"]).aggregate([("video_id", "count")])
        done = counts.filter(pc.equal(counts.column("video_id_count"), len(want)))
        pairs = set(zip(done.column("video_id").to_pylist(), done.column("content_sha256").to_pylist(), strict=True))
        shas: dict[str, set[str]] = {}
        for v, s in pairs:
            shas.setdefault(v, set()).add(s)
        several = {v: c for v, c in shas.items() if len(c) > 1}
        if not several:
            return pairs
        served = self.served(several, as_of)
        return {(v, s) for v, s in pairs if v not in several or served.get(v) == s}

    def served(self, versions: Mapping[str, set[str]], as_of: AsOf = None) -> dict[str, str]:
        """Which of a video's stored content versions readers are served: {video_id: sha}.

        versions: {video_id: the content shas it has rows of} (in one layer, or complete). The
        served one is the version most recently seen (`videos.last_seen`: every extraction of a
        content stamps it), so after a file goes back to an earlier content and that content is
        extracted again, readers get it again. A video none of whose versions has a `videos` row
        is left out. as_of: a tag or {table: version} (an int, a hidden_states version, reads the
        latest `videos`).
        """
        ids = sorted(versions)
        videos_as_of = None if isinstance(as_of, (int, np.integer)) else as_of
        t = self.table("videos", self.version_of("videos", videos_as_of)).to_pyarrow_dataset().to_table(
            columns=["video_id", "content_sha256", "last_seen"])
        t = t.filter(pc.is_in(t.column("video_id"), pa.array(ids, t.schema.field("video_id").type)))
        best: dict[str, tuple[Any, str]] = {}
        for v, s, ts in zip(*(t.column(c).to_pylist() for c in ("video_id", "content_sha256", "last_seen")),
                            strict=True):
            if s not in versions[v]:
                continue
            rank = (ts is not None, ts or datetime.min.replace(tzinfo=timezone.utc), s)  # newest wins; ties by sha
            if v not in best or rank > best[v][0]:
                best[v] = (rank, s)
        return {v: s for v, (_, s) in best.items()}

    def complete_keys(self, extractor_id: str) -> pa.Table:
        """(video_id, content_sha256) of every video complete for this extractor and served, as
        Arrow: what planning anti-joins against. Reads the key columns of ONE layer partition (the
        highest), not all of them: a video's layers are written in one commit (write_batch, and
        replace_keys never splits a video), so a video in one layer is in every layer. A video
        with several contents keeps only the served one (see `served`)."""
        layers = self.layers(extractor_id)
        empty = pa.table({"video_id": pa.array([], pa.string()), "content_sha256": pa.array([], pa.string())})
        if not layers:
            return empty
        dt = self.table("hidden_states")
        keys = self.scan("hidden_states", dt, {"extractor_id": extractor_id, "layer": max(layers)},
                         ["video_id", "content_sha256"]).combine_chunks()
        counts = keys.group_by("video_id").aggregate([("content_sha256", "count")])
        several = counts.filter(pc.greater(counts.column("content_sha256_count"), 1)).column("video_id")
        if not len(several):
            return keys
        multi = keys.filter(pc.is_in(keys.column("video_id"), value_set=several))
        versions: dict[str, set[str]] = {}
        for v, sha in zip(multi.column("video_id").to_pylist(), multi.column("content_sha256").to_pylist(), strict=True):
            versions.setdefault(v, set()).add(sha)
        served = self.served(versions)
        keep = pa.array([f"{v}\x00{s}" for v, s in served.items()], pa.string())
        pair = pc.binary_join_element_wise(keys.column("video_id"), keys.column("content_sha256"), "\x00")
        return keys.filter(pc.or_(pc.invert(pc.is_in(keys.column("video_id"), value_set=several)),
                                  pc.is_in(pair, value_set=keep)))

    def failure_keys(self, extractor_id: str) -> pa.Table:
        """Open failures of this extractor and its model-independent ones, key columns only:
        video_id, content_sha256 ('' when unknown), permanent (False for NULL)."""
        t = conform("failures", self.table("failures").to_pyarrow_table(
            columns=["video_id", "extractor_id", "content_sha256", "permanent"]))
        t = t.filter(pc.is_in(t.column("extractor_id"), pa.array([extractor_id, ""])))
        return pa.table({"video_id": t.column("video_id"),
                         "content_sha256": pc.fill_null(t.column("content_sha256"), ""),
                         "permanent": pc.fill_null(t.column("permanent"), False)})

    def file_index(self) -> pa.Table:
        """The change check's index (storage/schema.py FILE_INDEX): uri, signature, content_sha256,
        bytes, hashed_at."""
        try:  # the Parquet files read directly: lighter than a dataset at 100,000s of rows
            return self.scan("file_index", self.table("file_index"), {}, ALL_TABLES["file_index"].schema.names)
        except FileNotFoundError:  # a read-only store from before schema v5
            return ALL_TABLES["file_index"].schema.empty_table()

    def record_files(self, rows: pa.Table) -> int:
        """Upsert file index rows by uri (hashed files whose signature could be trusted)."""
        return self.upsert(ALL_TABLES["file_index"], rows)

    def _matrix(self, table: pa.Table, column: str, item_ids: Sequence[str], what: str,
                as_of: AsOf, strict: bool, version: int) -> FeatureMatrix:
        item_ids = [str(i) for i in item_ids]
        if table.column(column).null_count:
            table = table.filter(pc.is_valid(table.column(column)))
        vids = table.column("video_id")
        if table.num_rows and pc.count_distinct(vids).as_py() != table.num_rows:
            # A video with several content versions: keep the rows of the one it is served (`served`).
            dup = table.group_by("video_id").aggregate([("video_id", "count")])
            dup_ids = dup.filter(pc.greater(dup.column("video_id_count"), 1)).column("video_id").to_pylist()
            present: dict[str, set[str]] = {v: set() for v in dup_ids}
            for v, sha in zip(vids.to_pylist(), table.column("content_sha256").to_pylist(), strict=True):
                if v in present:
                    present[v].add(sha)
            current = self.served(present, as_of)
            unresolved = [v for v in dup_ids if v not in current]
            if unresolved:
                raise ValueError(f"{what}: several content versions and no `videos` row to pick one for "
                                 f"{', '.join(unresolved[:10])}")
            keep_pairs = pa.array([f"{v}\x00{s}" for v, s in current.items()])
            pair = pc.binary_join_element_wise(vids, table.column("content_sha256"), "\x00")
            is_dup = pc.is_in(vids, pa.array(dup_ids))
            table = table.filter(pc.or_(pc.invert(is_dup), pc.is_in(pair, keep_pairs)))
            vids = table.column("video_id")
        n = len(item_ids)
        # Row blocks straight from the Arrow chunks (no combine_chunks of the list column: that
        # copy, the flatten and a fancy-index temporary were most of the old load time).
        blocks = [vector_rows(c, what) for c in table.column(column).chunks if len(c)]
        dims = {b.shape[1] for b in blocks}
        if len(dims) > 1:
            raise ValueError(f"{what}: embeddings of different lengths in one layer")
        d = dims.pop() if dims else 0
        vset = vids.combine_chunks() if table.num_rows else pa.array([], pa.string())
        if not pa.types.is_string(vset.type):
            vset = vset.cast(pa.string())
        pos = pc.index_in(pa.array(item_ids, pa.string()), value_set=vset)
        present = pos.is_valid().to_numpy(zero_copy_only=False)
        src = pc.fill_null(pos, -1).to_numpy(zero_copy_only=False)
        values = np.empty((n, d), dtype=np.float32) if present.all() else np.zeros((n, d), dtype=np.float32)
        start = 0
        for b in blocks:  # gather each file's rows straight into item order (2x faster than concat + take)
            m = (src >= start) & (src < start + len(b))
            if m.any():
                values[m] = b[src[m] - start]
            start += len(b)
        fm = FeatureMatrix(item_ids, values, present, version)
        if strict and not present.all():
            raise MissingItemsError(what, fm.missing)
        return fm

    def layer_matrix(self, extractor_id: str, layer: int, item_ids: Sequence[str], as_of: AsOf = None,
                     strict: bool = True) -> FeatureMatrix:
        """One layer's embeddings for `item_ids`, float32 (N, D), row i = item_ids[i].

        Reads only that (extractor, layer) partition. Missing items: strict=True raises
        MissingItemsError listing them; strict=False returns zero rows with present=False.
        as_of: a tag, a snapshot() dict, or an int version of hidden_states.
        """
        dt = self.table("hidden_states", self.version_of("hidden_states", as_of))
        # No video_id filter pushdown: ids are unordered strings, file stats would not prune.
        t = self.scan("hidden_states", dt, {"extractor_id": extractor_id, "layer": int(layer)},
                       ["video_id", "content_sha256", "embedding"])
        return self._matrix(t, "embedding", item_ids, f"hidden_states[{extractor_id}, layer {layer}]",
                            as_of, strict, dt.version())

    def caption_matrix(self, extractor_id: str, item_ids: Sequence[str], as_of: AsOf = None,
                       strict: bool = True) -> FeatureMatrix:
        """Caption text embeddings for `item_ids`, like layer_matrix (int as_of: captions version)."""
        dt = self.table("captions", self.version_of("captions", as_of))
        t = self.scan("captions", dt, {"extractor_id": extractor_id},
                       ["video_id", "content_sha256", "text_embedding"])
        return self._matrix(t, "text_embedding", item_ids, f"captions[{extractor_id}].text_embedding",
                            as_of, strict, dt.version())

    def read(self, table: str, as_of: AsOf = None, columns: list[str] | None = None) -> pa.Table:
        """A whole table as Arrow (small tables: videos, runs, failures, extractors, snapshots)."""
        version = self.version_of(table, as_of) if table in DATA_TABLES else None
        dt = self.table(table, version)
        have = {f.name for f in dt.schema().fields}
        cols = None if columns is None else [c for c in columns if c in have]
        out = conform(table, dt.to_pyarrow_table(columns=cols))
        return out if columns is None else out.select(columns)

    # -- maintenance --------------------------------------------------------------------------

    def compact(self, retention_hours: float = 168, dry_run: bool = False) -> dict[str, dict[str, Any]]:
        """Optimize (bin-pack small files) then vacuum files unreferenced for `retention_hours`.

        Versions named by a tag are kept (their files survive vacuum), so as_of=tag keeps working.
        Un-tagged versions older than the retention may become unreadable after a vacuum.
        """
        kept = tagged_versions(self)
        if not dry_run:
            self.check_all_writable()  # refuse before any table changed
        return {name: self.optimize_and_vacuum(name, retention_hours, dry_run, kept.get(name, []))
                for name in ALL_TABLES}

    def maintain(self, max_files: int = 50, max_versions: int = 50,
                 retention_hours: float = 168.0) -> dict[str, dict[str, Any]]:
        """What the nightly flow runs: compact, vacuum and checkpoint each table past these
        thresholds, keeping every tag readable (storage/maintenance.py). Returns, per table, what
        it found and did."""
        return maintain(self, max_files=max_files, max_versions=max_versions, retention_hours=retention_hours)


def open_store(cfg: Any, create: bool = True) -> FeatureStore:
    """A FeatureStore from a StoreConfig (mvrec.config), or from a Config holding one as `.store`."""
    store_cfg = getattr(cfg, "store", cfg)
    return FeatureStore(store_cfg.path, store_cfg.storage_options, create=create)
