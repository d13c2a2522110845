"""The same store code on S3-compatible object storage: moto in server mode on 127.0.0.1.

moto runs in a child process: deltalake's object store blocks in Rust while it talks to the
endpoint, so an in-process (threaded) server could not answer. Skips when moto cannot start.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
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
