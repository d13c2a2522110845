"""The same store code on S3-compatible object storage: moto in server mode on 127.0.0.1.

moto runs in a child process: deltalake's object store blocks in Rust while it talks to the
endpoint, so an in-process (threaded) server could not answer. Skips when moto cannot start.
"""

from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing as mp
import threading
import time

import numpy as np
import pytest

from storage import ExtractionBatch, FeatureStore, HiddenStateRow, VideoRow, connect

BUCKET = "mvrec-test"


def _serve(queue) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    queue.put(server.get_host_and_port())
    while True:
        time.sleep(3600)


@pytest.fixture(scope="module")
def s3_options():
    # Only check that moto is there: importing moto.server here would import Flask into this process,
    # and Flask's context proxies break vLLM's CPU start-up scan of sys.modules in later tests.
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto is not installed")
    boto3 = pytest.importorskip("boto3")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(queue,), daemon=True)
    proc.start()
    try:
        host, port = queue.get(timeout=60)
    except Exception as e:  # noqa: BLE001
        proc.kill()
        pytest.skip(f"moto server did not start: {e}")
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",  # plain http on loopback
    }
    proc.kill()
    proc.join(5)


def test_store_on_s3_roundtrip(s3_options):
    store = FeatureStore(f"s3://{BUCKET}/store", s3_options)
    batch = ExtractionBatch(
        videos=[VideoRow(f"v{i}", f"s3://{BUCKET}/videos/v{i}.mp4", f"sha{i}") for i in range(4)],
        hidden_states=[HiddenStateRow(f"v{i}", f"sha{i}", "e", k, np.full(8, i + k, np.float32))
                       for i in range(4) for k in (0, -1)],
    )
    store.write_batch(batch)
    store.tag("one")
    store.write_batch(batch)  # idempotent on S3 too
    assert store.table("hidden_states").to_pyarrow_dataset().count_rows() == 8
    assert store.completed("e") == {(f"v{i}", f"sha{i}") for i in range(4)}
    fm = store.layer_matrix("e", -1, ["v3", "v0"])
    assert fm.values[:, 0].tolist() == [2.0, -1.0]

    store.upsert_hidden_states([HiddenStateRow("v9", "sha9", "e", 0, np.ones(8))])
    with connect(store, as_of="one") as con:
        assert con.execute("SELECT count(*) FROM hidden_states WHERE layer = 0").fetchone() == (4,)
    with connect(f"s3://{BUCKET}/store", storage_options=s3_options) as con:
        assert con.execute("SELECT count(*) FROM hidden_states WHERE layer = 0").fetchone() == (5,)
        # All layer-0 vectors are positive multiples of ones (v0's is zero: no direction, left out).
        top = con.top_k_similar("v1", "e", 0, k=5)
        assert sorted(v for v, _ in top) == ["v2", "v3", "v9"]
        np.testing.assert_allclose([s for _, s in top], 1.0, rtol=1e-6)
    stats = store.compact(retention_hours=0)
    assert stats["hidden_states"]["version_after"] >= stats["hidden_states"]["version_before"]
    assert store.layer_matrix("e", 0, ["v9"], as_of="one", strict=False).missing == ["v9"]
    # The nightly maintenance on S3: the checkpoint is found through the object store.
    done = store.maintain(max_files=0, max_versions=1, retention_hours=0)
    assert done["hidden_states"]["action"] == "maintained" and done["hidden_states"]["after"]["since_checkpoint"] == 0
    assert store.layer_matrix("e", 0, ["v9"], as_of="one", strict=False).missing == ["v9"]


def test_concurrent_commits_with_conditional_put(s3_options, monkeypatch, tmp_path):
    """aws_conditional_put = "etag" (what docs/store.md advises for MinIO or R2): a writer that read
    the table before another writer committed must not overwrite that commit's log entry. Writer A
    is held after its read (the before-write pause point) while B commits; then A goes on. Put-if-
    absent makes A's log entry collide with B's, so A commits after it and both keep their rows."""
    options = {**s3_options, "aws_conditional_put": "etag"}
    store = FeatureStore(f"s3://{BUCKET}/conditional", options)

    def batch(prefix: str) -> ExtractionBatch:
        return ExtractionBatch(
            videos=[VideoRow(f"{prefix}{i}", f"s3://{BUCKET}/videos/{prefix}{i}.mp4", f"sha{prefix}{i}") for i in range(3)],
            hidden_states=[HiddenStateRow(f"{prefix}{i}", f"sha{prefix}{i}", "e", k, np.full(8, i, np.float32))
                           for i in range(3) for k in (0, -1)])

    store.write_batch(batch("first"))
    marker = tmp_path / "paused"
    monkeypatch.setenv("MVREC_TEST_PAUSE_AT", "hidden_states:before-write")
    monkeypatch.setenv("MVREC_TEST_PAUSE_FILE", str(marker))
    versions = {}
    writer = threading.Thread(target=lambda: versions.update(a=store.write_batch(batch("a"))["hidden_states"]))
    writer.start()
    while not marker.exists():  # A has read the table and waits before writing
        assert writer.is_alive(), "writer A finished without pausing"
        time.sleep(0.01)
    monkeypatch.delenv("MVREC_TEST_PAUSE_AT")  # B, in this thread, does not pause
    versions["b"] = FeatureStore(f"s3://{BUCKET}/conditional", options).write_batch(batch("b"))["hidden_states"]
    marker.unlink()
    writer.join(timeout=120)
    assert not writer.is_alive() and "a" in versions, "writer A did not finish"
    assert versions["a"] > versions["b"]  # A's commit went after B's instead of over it
    done = FeatureStore(f"s3://{BUCKET}/conditional", options).completed("e")
    assert done == {(f"{p}{i}", f"sha{p}{i}") for p in ("first", "a", "b") for i in range(3)}
    with connect(f"s3://{BUCKET}/conditional", storage_options=options) as con:
        assert con.execute("SELECT count(*), count(DISTINCT (video_id, layer)) FROM hidden_states").fetchone() == (18, 18)


def test_an_s3_prefix_is_a_video_source_with_a_change_check_that_reads_only_changed_objects(
        s3_options, tmp_path, monkeypatch):
    """s3:// sources through s3fs: the prefix is listed with each object's ETag, size and
    last-modified; an unchanged object is not downloaded again, a replaced one is."""
    boto3 = pytest.importorskip("boto3")
    from flows.plan import check_changes
    from tasks.discover import discover_videos

    for k, v in {"AWS_ENDPOINT_URL": s3_options["AWS_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=s3_options["AWS_ENDPOINT_URL"], region_name="us-east-1")
    for name in ("a.mp4", "sub/b.mkv", "c.mp4", "notes.txt"):
        s3.put_object(Bucket=BUCKET, Key=f"videos/{name}", Body=f"bytes of {name}".encode())

    refs = discover_videos(f"s3://{BUCKET}/videos/")
    assert sorted(r.video_id for r in refs) == ["a", "c", "sub/b"]
    assert all(r.uri.startswith(f"s3://{BUCKET}/videos/") and r.object_sig for r in refs)
    store = FeatureStore(tmp_path / "store")  # the file index lives in a local store here
    first = check_changes(store, refs)
    assert (first.read_files, first.reused) == (3, 0)
    again = check_changes(store, discover_videos(f"s3://{BUCKET}/videos/"))
    assert (again.read_files, again.reused, again.read_bytes) == (0, 3, 0)

    s3.put_object(Bucket=BUCKET, Key="videos/c.mp4", Body=b"a new content for c")
    changed = check_changes(store, discover_videos(f"s3://{BUCKET}/videos/"))
    assert (changed.read_files, changed.reused) == (1, 2)
    assert {r.video_id: r.content_sha256 for r in changed.hashed}["c"] == hashlib.sha256(b"a new content for c").hexdigest()
