"""Feature store: idempotent upserts, atomic commits under SIGKILL and concurrent readers,
layer matrices in item order, snapshots. Real Delta tables in tmp_path; nothing is mocked."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from storage import (
    CaptionRow,
    ExtractionBatch,
    ExtractorRecord,
    FailureRow,
    FeatureStore,
    HiddenStateRow,
    MissingItemsError,
    VideoRow,
    extractor_id,
)

ROOT = Path(__file__).resolve().parents[1]
D = 16
LAYERS = [0, 1, 2, -1]


def _vec(video: int, layer: int) -> np.ndarray:
    """A deterministic embedding, so reads can be checked value by value."""
    return (np.arange(D, dtype=np.float32) + 100 * video + layer).astype(np.float32)


def _batch(eid: str, videos: range) -> ExtractionBatch:
    return ExtractionBatch(
        videos=[VideoRow(f"v{i}", f"/data/v{i}.mp4", f"sha{i}", 1000 + i, 3.0, 30.0, 224, 224) for i in videos],
        captions=[CaptionRow(f"v{i}", f"sha{i}", eid, f"video {i}", "minilm", np.full(4, i, np.float32))
                  for i in videos],
        hidden_states=[HiddenStateRow(f"v{i}", f"sha{i}", eid, k, _vec(i, k)) for i in videos for k in LAYERS],
    )


def _counts(store: FeatureStore) -> dict[str, int]:
    return {name: store.table(name).to_pyarrow_dataset().count_rows()
            for name in ("videos", "captions", "hidden_states", "failures", "extractors")}


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


@pytest.fixture()
def eid(store) -> str:
    return store.upsert_extractor(ExtractorRecord("tiny-qwen", "abc", "Describe.", "uniform:8", "video", "1",
                                                  params={"dtype": "float32"}, dim=D, num_layers=2))


def test_same_batch_twice_leaves_counts_unchanged(store, eid):
    first = store.write_batch(_batch(eid, range(5)))
    before = _counts(store)
    assert before == {"videos": 5, "captions": 5, "hidden_states": 20, "failures": 0, "extractors": 1}
    second = store.write_batch(_batch(eid, range(5)))
    assert _counts(store) == before
    assert second["hidden_states"] == first["hidden_states"] + 1  # a new commit, same rows
    store.upsert_extractor(ExtractorRecord("tiny-qwen", "abc", "Describe.", "uniform:8", "video", "1",
                                           params={"dtype": "float32"}, dim=D, num_layers=2))
    assert _counts(store)["extractors"] == 1
    # Overlapping batch: only the new videos add rows.
    store.write_batch(_batch(eid, range(3, 8)))
    assert _counts(store)["hidden_states"] == 8 * len(LAYERS)


def test_duplicate_keys_inside_one_batch_keep_the_last(store, eid):
    rows = [HiddenStateRow("v1", "s", eid, 0, np.zeros(D)), HiddenStateRow("v1", "s", eid, 0, np.ones(D))]
    store.upsert_hidden_states(rows)
    fm = store.layer_matrix(eid, 0, ["v1"])
    assert fm.values.tolist() == [[1.0] * D]


def test_upsert_is_exact_when_in_lists_overmatch(store, eid):
    # (v1, a) and (v2, b) stored; upserting (v1, b) and (v2, a) must not touch them.
    store.upsert_hidden_states([HiddenStateRow("v1", "a", eid, 0, np.full(D, 1.0)),
                                HiddenStateRow("v2", "b", eid, 0, np.full(D, 2.0))])
    store.upsert_hidden_states([HiddenStateRow("v1", "b", eid, 0, np.full(D, 3.0)),
                                HiddenStateRow("v2", "a", eid, 0, np.full(D, 4.0))])
    t = store.read("hidden_states").to_pylist()
    got = {(r["video_id"], r["content_sha256"]): r["embedding"][0] for r in t}
    assert got == {("v1", "a"): 1.0, ("v2", "b"): 2.0, ("v1", "b"): 3.0, ("v2", "a"): 4.0}


def test_videos_keep_first_seen_and_failures_accumulate_then_clear(store, eid):
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    store.upsert_videos([VideoRow("v1", "/a.mp4", "s1", first_seen=t0, last_seen=t0)])
    store.upsert_videos([VideoRow("v1", "/a.mp4", "s1", first_seen=t0 + timedelta(days=9),
                                  last_seen=t0 + timedelta(days=9))])
    (row,) = store.read("videos").to_pylist()
    assert row["first_seen"] == t0 and row["last_seen"] == t0 + timedelta(days=9)

    fail = FailureRow("v1", "extract", "RuntimeError", "boom", extractor_id=eid, run_id="r1")
    store.record_failures([fail])
    store.record_failures([fail, FailureRow("v1", "decode", "ValueError", "bad header")])
    rows = {(r["stage"], r["extractor_id"]): r["attempts"] for r in store.failures(eid)}
    assert rows == {("extract", eid): 2, ("decode", ""): 1}
    # Success for v1 under eid clears its failures for eid and its model-independent ones.
    store.write_batch(ExtractionBatch(hidden_states=[HiddenStateRow("v1", "s1", eid, 0, np.ones(D))]))
    assert store.failures() == []


def test_failures_of_a_batch_are_not_cleared_by_the_same_batch(store, eid):
    batch = _batch(eid, range(2))
    batch.failures = [FailureRow("v9", "decode", "ValueError", "bad"),
                      FailureRow("v1", "caption_embed", "OSError", "x", extractor_id=eid)]
    store.write_batch(batch)
    assert sorted(r["video_id"] for r in store.failures()) == ["v1", "v9"]


def test_completed_requires_every_layer(store, eid):
    store.write_batch(_batch(eid, range(3)))
    store.upsert_hidden_states([HiddenStateRow("v7", "sha7", eid, 0, _vec(7, 0))])  # one layer only
    assert store.completed(eid) == {("v0", "sha0"), ("v1", "sha1"), ("v2", "sha2")}
    assert ("v7", "sha7") in store.completed(eid, layers=[0])
    assert store.completed("other-extractor") == set()
    assert store.layers(eid) == [-1, 0, 1, 2]


def test_layer_matrix_in_item_order_with_missing_report(store, eid):
    store.write_batch(_batch(eid, range(6)))
    ids = ["v4", "v0", "v5", "v2"]
    fm = store.layer_matrix(eid, 1, ids)
    assert fm.values.dtype == np.float32 and fm.values.shape == (4, D)
    np.testing.assert_array_equal(fm.values, np.stack([_vec(4, 1), _vec(0, 1), _vec(5, 1), _vec(2, 1)]))
    final = store.layer_matrix(eid, -1, ["v3"])
    np.testing.assert_array_equal(final.values[0], _vec(3, -1))

    with pytest.raises(MissingItemsError) as e:
        store.layer_matrix(eid, 1, ["v1", "nope", "v2", "gone"])
    assert e.value.missing == ["nope", "gone"] and "nope" in str(e.value)

    fm = store.layer_matrix(eid, 1, ["v1", "nope", "v2"], strict=False)
    assert fm.present.tolist() == [True, False, True] and fm.missing == ["nope"]
    assert not fm.values[1].any()
    values, missing = fm  # unpacks as (values, missing)
    assert missing == ["nope"] and values.shape == (3, D)

    cm = store.caption_matrix(eid, ["v5", "v1"])
    assert cm.values.tolist() == [[5.0] * 4, [1.0] * 4]


def test_layer_matrix_picks_the_current_content_version(store, eid):
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    store.upsert_videos([VideoRow("v1", "/a.mp4", "old", first_seen=t0, last_seen=t0),
                         VideoRow("v1", "/a.mp4", "new", first_seen=t0, last_seen=t0 + timedelta(days=1))])
    store.upsert_hidden_states([HiddenStateRow("v1", "old", eid, 0, np.zeros(D)),
                                HiddenStateRow("v1", "new", eid, 0, np.ones(D))])
    assert store.layer_matrix(eid, 0, ["v1"]).values.tolist() == [[1.0] * D]


def _content(eid: str, video: str, sha: str, value: float, seen: datetime) -> ExtractionBatch:
    return ExtractionBatch(videos=[VideoRow(video, f"/data/{video}.mp4", sha, 10, first_seen=seen, last_seen=seen)],
                           captions=[CaptionRow(video, sha, eid, sha, "minilm", np.full(4, value, np.float32))],
                           hidden_states=[HiddenStateRow(video, sha, eid, k, np.full(D, value)) for k in LAYERS])


def test_a_file_reverted_to_earlier_content_is_extracted_again_and_then_served(store, eid):
    """Issue 23: extract A, the file becomes B (extracted), then goes back to A. A's rows are still
    stored, but readers are served B (the content seen last), so A is not `completed` and the
    planner takes the video; once A is extracted again, readers get A and it is complete again."""
    from flows.plan import plan_work
    from tasks.discover import VideoRef

    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    store.write_batch(_content(eid, "2", "shaA", 1.0, t0))
    store.write_batch(_content(eid, "2", "shaB", 5.0, t0 + timedelta(days=1)))
    assert store.completed(eid) == {("2", "shaB")}
    assert store.layer_matrix(eid, 0, ["2"]).values.tolist() == [[5.0] * D]
    todo, counts = plan_work([VideoRef("2", "/data/2.mp4", content_sha256="shaA")], store.completed(eid), [])
    assert [r.video_id for r in todo] == ["2"] and counts["done"] == 0  # A was seen once: not enough
    store.write_batch(_content(eid, "2", "shaA", 1.0, t0 + timedelta(days=2)))  # extracted again
    assert store.completed(eid) == {("2", "shaA")}
    assert store.layer_matrix(eid, 0, ["2"]).values.tolist() == [[1.0] * D]
    assert store.caption_matrix(eid, ["2"]).values.tolist() == [[1.0] * 4]
    todo, counts = plan_work([VideoRef("2", "/data/2.mp4", content_sha256="shaA")], store.completed(eid), [])
    assert todo == [] and counts["done"] == 1
    assert store.served({"2": {"shaA", "shaB"}}) == {"2": "shaA"}


def test_a_content_version_without_a_videos_row_is_not_served(store, eid):
    # hidden_states rows of a content whose videos row is missing (an older store): the other wins.
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    store.write_batch(_content(eid, "v", "seen", 1.0, t0))
    store.upsert_hidden_states([HiddenStateRow("v", "unseen", eid, k, np.full(D, 9.0)) for k in LAYERS])
    assert store.completed(eid) == {("v", "seen")}
    assert store.layer_matrix(eid, 0, ["v"]).values.tolist() == [[1.0] * D]


def test_snapshots_tags_and_as_of(store, eid):
    store.write_batch(_batch(eid, range(2)))
    snap = store.snapshot()
    store.tag("before", note="two videos")
    store.write_batch(_batch(eid, range(2, 5)))
    with pytest.raises(ValueError, match="already exists"):
        store.tag("before")
    assert [s["name"] for s in store.snapshots()] == ["before"]
    assert store.snapshots()[0]["versions"] == snap

    assert store.completed(eid, as_of="before") == {("v0", "sha0"), ("v1", "sha1")}
    assert len(store.completed(eid)) == 5
    with pytest.raises(MissingItemsError):
        store.layer_matrix(eid, 0, ["v3"], as_of="before")
    assert store.layer_matrix(eid, 0, ["v3"], as_of=snap, strict=False).missing == ["v3"]
    np.testing.assert_array_equal(store.layer_matrix(eid, 0, ["v1"], as_of=snap["hidden_states"]).values[0],
                                  _vec(1, 0))
    with pytest.raises(ValueError, match="unknown snapshot tag"):
        store.layer_matrix(eid, 0, ["v1"], as_of="nope")


def test_extractor_id_is_stable_and_sensitive():
    a = extractor_id("m", "r", "p", "uniform:8", "video", "1", dtype="float32", max_pixels=50176)
    b = extractor_id("m", "r", "p", "uniform:8", "video", "1", max_pixels=50176, dtype="float32")
    assert a == b and len(a) == 16
    assert a != extractor_id("m", "r", "another prompt", "uniform:8", "video", "1", dtype="float32",
                             max_pixels=50176)
    assert a != extractor_id("m", "r", "p", "uniform:8", "video", "1", dtype="bfloat16", max_pixels=50176)
    # dim and num_layers describe the model; they do not change the id.
    rec = ExtractorRecord("m", "r", "p", "uniform:8", "video", "1", {"dtype": "float32", "max_pixels": 50176}, dim=8)
    assert rec.extractor_id == a


def test_bad_rows_name_the_table_and_column(store, eid):
    with pytest.raises(ValueError, match=r"hidden_states: unknown column\(s\) \['colour'\]"):
        store.upsert_hidden_states([{"video_id": "v", "content_sha256": "s", "extractor_id": eid, "layer": 0,
                                     "embedding": [1.0], "colour": "red"}])
    with pytest.raises(ValueError, match="hidden_states.video_id: key column has null"):
        store.upsert_hidden_states([{"video_id": None, "content_sha256": "s", "extractor_id": eid, "layer": 0,
                                     "embedding": [1.0]}])
    with pytest.raises(ValueError, match="one hidden size"):
        store.upsert_hidden_states([HiddenStateRow("a", "s", eid, 0, np.ones(4)),
                                    HiddenStateRow("b", "s", eid, 0, np.ones(5))])
    with pytest.raises(FileNotFoundError, match="no feature store"):
        FeatureStore(store.root + "-missing", create=False)


def test_runs_record_counts_and_versions(store, eid):
    run = store.start_run("extract-features", extractor_id=eid, params={"batch_size": 4})
    store.write_batch(_batch(eid, range(2)))
    versions = store.finish_run(run, "completed", counts={"ok": 2, "failed": 0})
    (row,) = store.read("runs").to_pylist()
    assert row["status"] == "completed" and dict(row["counts"]) == {"ok": 2, "failed": 0}
    assert json.loads(row["snapshot"]) == versions and row["finished"] >= row["started"]
    with pytest.raises(ValueError, match="no run with run_id"):
        store.finish_run("nope")


def test_compact_keeps_tagged_versions_readable(store, eid):
    for i in range(4):
        store.write_batch(_batch(eid, range(i, i + 1)))
    store.tag("t")
    store.write_batch(_batch(eid, range(0, 1)))  # rewrites v0's rows: old files become garbage
    stats = store.compact(retention_hours=0)
    assert stats["hidden_states"]["files_removed"] > 0
    assert len(store.completed(eid, as_of="t")) == 4
    assert store.layer_matrix(eid, 0, ["v0", "v3"], as_of="t").present.all()


def test_concurrent_writers_of_the_same_keys_leave_no_duplicates(store, eid):
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            for _ in range(4):
                store.upsert_hidden_states([HiddenStateRow(f"v{i}", "s", eid, 0, np.full(D, seed, np.float32))
                                            for i in range(10)])
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.table("hidden_states").to_pyarrow_dataset().count_rows() == 10


# --- crash and isolation ------------------------------------------------------------------------
# Writers run as subprocesses that stop at a named point inside a commit (the test-only pause hook
# of storage/delta.py); the test acts on events (a marker file, a line printed), never on time.

BLOCK = 3000  # rows per commit in the crash test (about 18 MB of float32 at D = 1536)
WAIT = 120  # seconds before a missing event fails the test (a hang guard, not a speed check)

WRITER = textwrap.dedent("""
    import sys, numpy as np, pyarrow as pa
    from storage import FeatureStore
    store = FeatureStore(sys.argv[1])
    b, n, d = int(sys.argv[2]), int(sys.argv[3]), 1536
    flat = np.random.default_rng(b).random(n * d, dtype=np.float32)
    emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32)), pa.array(flat))
    t = pa.table({"video_id": [f"b{b}-{i}" for i in range(n)], "content_sha256": ["s"] * n,
                  "extractor_id": ["e"] * n, "layer": pa.array([0] * n, pa.int32()), "embedding": emb})
    store.upsert_hidden_states(t)
""")


def _rows(path: Path) -> int:
    return FeatureStore(path).table("hidden_states").to_pyarrow_dataset().count_rows()


def _wait_for(marker: Path, proc: subprocess.Popen) -> None:
    """Until `marker` exists (the writer paused there); fails if the writer exits first."""
    deadline = time.monotonic() + WAIT
    while not marker.exists():
        assert proc.poll() is None, f"writer exited ({proc.returncode}) before reaching its pause point"
        assert time.monotonic() < deadline, f"writer did not reach its pause point in {WAIT} s"
        time.sleep(0.01)


def _pause_env(point: str, marker: Path) -> dict[str, str]:
    return {**os.environ, "MVREC_TEST_PAUSE_AT": point, "MVREC_TEST_PAUSE_FILE": str(marker)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point, committed", [("before-write", False), ("mid-write", False),
                                              ("after-commit", True)])
def test_sigkill_inside_a_commit_leaves_one_whole_version(tmp_path, point, committed):
    path = tmp_path / "store"
    FeatureStore(path).upsert_hidden_states([HiddenStateRow("first", "s", "e", 0, np.ones(1536))])
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "1", str(BLOCK)], cwd=ROOT,
                            env=_pause_env(f"hidden_states:{point}", marker))
    try:
        _wait_for(marker, proc)
        assert marker.read_text().split() == [str(proc.pid), f"hidden_states:{point}"]
    finally:
        proc.kill()
        proc.wait()
    after = _rows(path)  # readable, and whole commits only
    assert after == 1 + (BLOCK if committed else 0), (point, after)
    # The next write succeeds (data files of the killed commit are just unreferenced garbage).
    FeatureStore(path).upsert_hidden_states([HiddenStateRow("next", "s", "e", 0, np.ones(1536))])
    assert _rows(path) == after + 1


READER = textwrap.dedent("""
    import sys, os, json
    from storage import connect
    path, stop, paused = sys.argv[1], sys.argv[2], sys.argv[3]
    while not os.path.exists(stop):
        during_pause = os.path.exists(paused)  # a writer is held inside a commit as this read starts
        with connect(path) as con:
            n, = con.execute("SELECT count(*) FROM hidden_states WHERE extractor_id = 'e'").fetchone()
            k, = con.execute("SELECT count(DISTINCT video_id) FROM hidden_states WHERE layer = 0").fetchone()
        print(json.dumps([n, k, during_pause]), flush=True)
""")


class _Lines:
    """A subprocess's stdout lines, read by a thread so that waiting for one can time out."""

    def __init__(self, proc: subprocess.Popen):
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[list] = []
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def next(self) -> list:
        line = self.queue.get(timeout=WAIT)
        assert line is not None, "the reader exited"
        self.seen.append(json.loads(line))
        return self.seen[-1]

    def until(self, n: int) -> None:
        """Read until the reader has reported a read that saw n rows."""
        while self.next()[0] != n:
            pass


def _block(c: int, value: float) -> list[HiddenStateRow]:
    return [HiddenStateRow(f"c{c}-{i}", "s", "e", k, np.full(64, value, np.float32)) for i in range(50) for k in LAYERS]


@pytest.mark.timeout(300)
def test_reader_never_sees_a_partial_commit(tmp_path, monkeypatch):
    path = tmp_path / "store"
    store = FeatureStore(path)
    stop, marker = tmp_path / "stop", tmp_path / "paused"
    block = 200  # 50 videos x 4 layers per commit
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop), str(marker)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        lines = _Lines(reader)
        lines.next()  # the reader is up
        for c in range(10):
            store.upsert_hidden_states(_block(c, c))
            # Rewrite an earlier block too: replacing rows must not show a gap or a double either.
            if c:
                store.upsert_hidden_states(_block(c - 1, 0))
            lines.until((c + 1) * block)  # the reader saw this version: every version is observed
        # A writer held inside a commit (rows handed to Delta, no log entry): readers that start
        # meanwhile see the previous version, whole.
        for c, point in ((10, "mid-write"), (11, "before-write")):
            monkeypatch.setenv("MVREC_TEST_PAUSE_AT", f"hidden_states:{point}")
            monkeypatch.setenv("MVREC_TEST_PAUSE_FILE", str(marker))
            writer = threading.Thread(target=store.upsert_hidden_states, args=(_block(c, c),))
            writer.start()
            while not marker.exists():
                assert writer.is_alive(), "the writer finished without pausing"
                time.sleep(0.01)
            while not (read := lines.next())[2]:
                pass
            assert read[0] == c * block  # a read that began while the writer was held
            monkeypatch.delenv("MVREC_TEST_PAUSE_AT")
            marker.unlink()
            writer.join(timeout=WAIT)
            assert not writer.is_alive()
            lines.until((c + 1) * block)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=WAIT)
    assert reader.returncode == 0
    seen = lines.seen + [json.loads(x) for x in out.splitlines() if x]
    assert len({n for n, _, _ in seen}) >= 12  # every version was observed
    for n, k, _ in seen:
        assert n % block == 0 and k * len(LAYERS) == n, (n, k)
    assert [n for n, _, _ in seen] == sorted(n for n, _, _ in seen)  # never goes back
    assert seen[-1][0] == 12 * block


# --- a read-only store: one line, exit 2, no Rust panic --------------------------------------------

def _unprivileged(cmd: list[str]) -> list[str]:
    """`cmd` run so that file permission bits apply. chmod does not stop root (CAP_DAC_OVERRIDE),
    so as root the command runs without the capabilities that bypass them (setpriv); nothing is
    mocked: the kernel refuses the writes."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable"] if setpriv else None
    if drop is None or subprocess.run(drop + ["true"], capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (setpriv): chmod cannot make a store read-only")
    return drop + cmd


@pytest.fixture()
def read_only_store(tmp_path, eid, store):
    store.write_batch(_batch(eid, range(3)))
    store.tag("t0")
    subprocess.run(["chmod", "-R", "a-w", store.root], check=True)
    yield store
    subprocess.run(["chmod", "-R", "u+w", store.root], check=True)  # so that tmp_path can be removed


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args", [["store", "tag", "t1"], ["store", "compact", "--retention-hours", "0"]])
def test_read_only_store_is_one_line_and_exit_2(read_only_store, args):
    before = {p: p.stat().st_mtime_ns for p in Path(read_only_store.root).rglob("*")}
    env = {**os.environ, "MVREC_STORE__PATH": read_only_store.root}
    proc = subprocess.run(_unprivileged([sys.executable, "-c", "from mvrec.cli import main; main()", *args]),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: store not writable: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "panicked" not in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in Path(read_only_store.root).rglob("*")} == before
    # Reads still work.
    proc = subprocess.run(_unprivileged([sys.executable, "-c", "from mvrec.cli import main; main()", "query",
                                         "SELECT count(*) AS n FROM hidden_states", "-f", "csv"]),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["n", str(3 * len(LAYERS))], proc.stderr


READ_ONLY_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from storage import FeatureStore, HiddenStateRow, StoreNotWritableError
    store = FeatureStore(sys.argv[1])  # create=True: every table exists, nothing to write
    for write in (lambda: store.upsert_hidden_states([HiddenStateRow("x", "s", "e", 0, np.ones(16))]),
                  lambda: store.start_run("refresh"), lambda: store.tag("t1")):
        try:
            write()
            print("wrote")
        except StoreNotWritableError as e:
            print(type(e).__name__, isinstance(e, PermissionError), str(e).count("\\n"))
""")


@pytest.mark.timeout(300)
def test_writes_to_a_read_only_store_raise_a_named_error(read_only_store):
    proc = subprocess.run(_unprivileged([sys.executable, "-c", READ_ONLY_WRITER, read_only_store.root]),
                          cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["StoreNotWritableError True 0"] * 3
    assert "panicked" not in proc.stderr


# --- schema v2: failures.content_sha256, upgrade of a v1 store, fast layer reads -----------------

def test_failures_carry_content_sha256(store, eid):
    store.record_failures([FailureRow("v1", "extract", "RuntimeError", "boom", extractor_id=eid,
                                      content_sha256="sha-old"),
                           FailureRow("v2", "decode", "ValueError", "bad")])
    rows = {r["video_id"]: r for r in store.failures()}
    assert rows["v1"]["content_sha256"] == "sha-old" and rows["v2"]["content_sha256"] == ""
    # Same key (video, extractor, stage), new content: one row, the new sha, attempts add up.
    store.record_failures([FailureRow("v1", "extract", "RuntimeError", "again", extractor_id=eid,
                                      content_sha256="sha-new")])
    (row,) = [r for r in store.failures() if r["video_id"] == "v1"]
    assert (row["content_sha256"], row["attempts"]) == ("sha-new", 2)


def test_v1_store_is_read_as_is_and_upgraded_by_a_writer(tmp_path):
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from storage.schema import ALL_TABLES, SCHEMA_VERSION

    root = tmp_path / "store"
    FeatureStore(root)  # a store with every table, then turn `failures` back into v1
    spec = ALL_TABLES["failures"]
    v1 = pa.schema([f for f in spec.schema if f.name not in dict(spec.added_columns)])
    uri = str(root / "failures")
    import shutil
    shutil.rmtree(uri)
    DeltaTable.create(uri, v1, name="failures", description="mvrec failures schema v1")
    write_deltalake(uri, pa.Table.from_pylist([{"video_id": "old", "uri": "u", "extractor_id": "", "stage": "decode",
                                                "error_type": "E", "message": "m", "attempts": 1, "run_id": "r",
                                                "at": datetime.now(timezone.utc)}], schema=v1), mode="append")

    reader = FeatureStore(root, create=False)  # readers do not write: the column reads as NULL
    assert [r["content_sha256"] for r in reader.failures()] == [None]
    assert reader.read("failures").column_names == spec.schema.names
    assert "content_sha256" not in {f.name for f in DeltaTable(uri).schema().fields}
    from storage import connect

    with connect(reader) as con:
        assert con.execute("SELECT video_id, content_sha256 FROM failures").fetchall() == [("old", None)]

    writer = FeatureStore(root)  # create=True upgrades in place: one add-column commit
    dt = DeltaTable(uri)
    assert [f.name for f in dt.schema().fields] == spec.schema.names
    assert dt.metadata().description == f"mvrec failures schema v{SCHEMA_VERSION}"
    writer.record_failures([FailureRow("new", "decode", "E", "m", content_sha256="abc")])
    assert {r["video_id"]: r["content_sha256"] for r in writer.failures()} == {"old": None, "new": "abc"}


def test_v1_store_opened_read_only_is_upgraded_by_its_first_failure_write(tmp_path):
    import shutil

    import pyarrow as pa
    from deltalake import DeltaTable

    from storage.schema import ALL_TABLES

    root = tmp_path / "store"
    FeatureStore(root)
    uri = str(root / "failures")
    shutil.rmtree(uri)
    spec = ALL_TABLES["failures"]
    DeltaTable.create(uri, pa.schema([f for f in spec.schema if f.name not in dict(spec.added_columns)]),
                      name="failures", description="mvrec failures schema v1")
    st = FeatureStore(root, create=False)
    st.record_failures([FailureRow("v", "decode", "E", "m", content_sha256="s")])
    assert [r["content_sha256"] for r in st.failures()] == ["s"]


def test_layer_matrix_direct_file_read_equals_the_dataset_read(store, eid, monkeypatch):
    # Several commits -> several files (Arrow chunks) for one layer; a replaced row; a missing item.
    store.write_batch(_batch(eid, range(0, 6)))
    store.write_batch(_batch(eid, range(6, 12)))
    store.upsert_hidden_states([HiddenStateRow("v3", "sha3", eid, 1, np.full(D, 7.0, np.float32))])
    ids = ["v11", "v3", "nope", "v0", "v7"]
    direct = store.layer_matrix(eid, 1, ids, strict=False)
    assert direct.missing == ["nope"]
    np.testing.assert_array_equal(direct.values[0], _vec(11, 1))
    np.testing.assert_array_equal(direct.values[1], np.full(D, 7.0, np.float32))
    assert not direct.values[2].any()
    monkeypatch.setattr(FeatureStore, "plain_files", lambda *a, **k: None)  # force the pyarrow dataset
    via_dataset = store.layer_matrix(eid, 1, ids, strict=False)
    np.testing.assert_array_equal(direct.values, via_dataset.values)
    assert direct.present.tolist() == via_dataset.present.tolist()


def test_plain_files_are_exactly_one_versions_add_actions(store, eid):
    store.write_batch(_batch(eid, range(0, 3)))
    v1 = store.table("hidden_states").version()
    store.write_batch(_batch(eid, range(0, 3)))  # replaces every row: new files, old ones removed
    old = store.plain_files("hidden_states", store.table("hidden_states", v1), {"extractor_id": eid, "layer": 0})
    new = store.plain_files("hidden_states", store.table("hidden_states"), {"extractor_id": eid, "layer": 0})
    assert old and new and not {p for p, _ in old} & {p for p, _ in new}
    assert all(part == {"extractor_id": eid, "layer": 0} for _, part in new)
    assert all(os.path.exists(p) for p, _ in old + new)  # not vacuumed yet: time travel still works


# --- concurrent writers and readers: consistent snapshots across tables ----------------------------

@pytest.mark.parametrize("how", ["connect", "snapshot"])
def test_a_batch_committed_while_a_reader_pins_versions_is_never_half_seen(store, eid, monkeypatch, how):
    from storage import connect

    store.write_batch(_batch(eid, range(2)))
    other = FeatureStore(store.root)  # a second writer
    real, injected = FeatureStore.table, []

    def table(self, name, version=None):
        dt = real(self, name, version)
        if self is store and not injected:  # the reader has pinned its first table: a batch lands
            injected.append(name)
            other.write_batch(_batch(eid, range(2, 4)))
        return dt

    monkeypatch.setattr(FeatureStore, "table", table)
    if how == "connect":
        with connect(store) as con:
            orphans = con.execute("SELECT count(*) FROM hidden_states ANTI JOIN videos USING (video_id, content_sha256)"
                                  ).fetchone()[0]
            orphans += con.execute("SELECT count(*) FROM hidden_states ANTI JOIN captions "
                                   "USING (video_id, content_sha256, extractor_id)").fetchone()[0]
    else:
        snap = store.snapshot()
        monkeypatch.setattr(FeatureStore, "table", real)
        done = {v for v, _ in store.completed(eid, as_of=snap)}
        orphans = len(done - set(store.read("videos", as_of=snap).column("video_id").to_pylist()))
    assert injected and orphans == 0


@pytest.mark.timeout(600)
def test_two_writer_processes_and_a_reader_stay_consistent(tmp_path):
    # A small trial of bench/torture_concurrency.py (run it by hand for many trials).
    import importlib.util

    spec = importlib.util.spec_from_file_location("torture_concurrency", ROOT / "bench" / "torture_concurrency.py")
    torture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torture)
    got = torture.trial(tmp_path / "t", videos=16, batch=4, shared=2, readers=1)
    assert got["problems"] == [] and got["orphans"] == 0 and got["reads"] >= 1


@pytest.mark.slow
def test_one_upsert_call_of_100000_keys_commits_in_bounded_commits(tmp_path):
    """A backfill or a lagging commit group can hand the store any number of rows in one call:
    deltalake segfaults on a replace-where of ~30,000 keys, so the call is split by video into
    commits of at most MAX_KEYS_PER_COMMIT videos, each with all of its videos' rows."""
    import pyarrow as pa

    from storage.delta import MAX_KEYS_PER_COMMIT

    n = 100_000
    store = FeatureStore(tmp_path / "store")
    ids = [f"v{i:06d}" for i in range(n)]
    rows = pa.table({"video_id": ids, "content_sha256": [f"{i:064x}" for i in range(n)],
                     "extractor_id": ["e"] * n, "caption": [f"caption {i}" for i in range(n)]})
    before = store.table("captions").version()
    store.upsert_captions(rows)
    commits = store.table("captions").version() - before
    assert commits == -(-n // MAX_KEYS_PER_COMMIT)
    stored = store.read("captions", columns=["video_id", "caption"])
    assert stored.num_rows == n and len(set(stored.column("video_id").to_pylist())) == n
    # Again for 20,000 of them (three commits), with new captions: an exact upsert, one row per key.
    again = rows.slice(40_000, 20_000)
    store.upsert_captions(again.set_column(3, "caption", pa.array([f"new {i}" for i in range(20_000)])))
    stored = store.read("captions", columns=["video_id", "caption"])
    assert stored.num_rows == n and len(set(stored.column("video_id").to_pylist())) == n
    assert sum(c.startswith("new ") for c in stored.column("caption").to_pylist()) == 20_000
