"""The extraction flows against Prefect's real API (a temporary server via the test harness),
real encoded videos, the local test LVLM and a real Delta store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvrec.devtools.demo_data import make_demo_corpus
from mvrec.devtools.test_model import build_test_model
from video_clips import write_corrupt_files

pytestmark = pytest.mark.slow

N_LAYERS = 2  # test model decoder layers -> stored layers 0..2 and final


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("flows")
    make_demo_corpus(root / "corpus", videos=23, users=40, seed=3, max_duration_s=3.0)
    build_test_model(root / "model", layers=N_LAYERS)
    return root


def _videos_dir(corpus: Path, tmp: Path, n: int, corrupt: bool) -> Path:
    """A fresh directory with the first n corpus videos (plus 2 corrupt files)."""
    d = tmp / "videos"
    d.mkdir(exist_ok=True)
    for i in range(1, n + 1):
        src = next((corpus / "corpus" / "videos").glob(f"{i}.*"))
        shutil.copy(src, d / src.name)
    if corrupt:
        for p in write_corrupt_files(tmp / "bad")[:3:2]:  # zero-byte and text-as-mp4
            shutil.copy(p, d / p.name)
    return d


def _overrides(corpus: Path, store: Path, **extra) -> dict:
    return {"extract.model": str(corpus / "model"), "store.path": str(store), "extract.batch_size": 4,
            "extract.commit_size": 8, "extract.frames": "uniform:4", "prefect.retry_delay_s": 0.1, **extra}


def _counts(store_path: Path):
    from storage import connect

    with connect(open_store_path(store_path)) as con:
        per_layer = dict(con.sql("SELECT layer, count(*) FROM hidden_states GROUP BY layer").fetchall())
        dupes = con.sql("SELECT count(*) FROM (SELECT video_id, content_sha256, extractor_id, layer, count(*) c "
                        "FROM hidden_states GROUP BY ALL HAVING c > 1)").fetchall()[0][0]
        failures = con.sql("SELECT video_id, stage, error_type FROM failures ORDER BY video_id").fetchall()
    return per_layer, dupes, failures


def open_store_path(path: Path):
    from storage import FeatureStore

    return FeatureStore(str(path))


def test_extract_skip_and_incremental(prefect_harness, corpus, tmp_path):
    from flows.extract import extract_features

    videos = _videos_dir(corpus, tmp_path, 20, corrupt=True)
    store = tmp_path / "store"
    ov = _overrides(corpus, store)

    first = extract_features(str(videos), overrides=ov)
    assert first["processed"] == 20 and first["failed"] == 2
    per_layer, dupes, failures = _counts(store)
    assert per_layer == {k: 20 for k in [*range(N_LAYERS + 1), -1]}
    assert dupes == 0
    assert sorted(f[2] for f in failures) == ["Unreadable", "Unreadable"]

    # Unchanged corpus: no model work at all, and the broken files are not retried.
    second = extract_features(str(videos), overrides=ov)
    assert second["lvlm_batches"] == 0
    assert (second["processed"], second["skipped_done"], second["skipped_broken"]) == (0, 20, 2)

    # Three new videos: exactly those three go through the model.
    for i in (21, 22, 23):
        src = next((corpus / "corpus" / "videos").glob(f"{i}.*"))
        shutil.copy(src, videos / src.name)
    third = extract_features(str(videos), overrides=ov)
    assert third["processed"] == 3 and third["lvlm_batches"] == 1  # 3 videos, batch_size 4
    per_layer, dupes, _ = _counts(store)
    assert per_layer == {k: 23 for k in [*range(N_LAYERS + 1), -1]} and dupes == 0

    # A changed file (new content under the same id) is extracted again.
    changed = next(videos.glob("1.*"))
    shutil.copy(next(videos.glob("2.*")), changed)
    fourth = extract_features(str(videos), overrides=ov)
    assert fourth["processed"] == 1


def test_transient_failure_is_retried_and_lands_once(prefect_harness, corpus, tmp_path, monkeypatch):
    import flows.extract as fx
    import tasks.extract as tx

    videos = _videos_dir(corpus, tmp_path, 3, corrupt=False)
    real_decode, attempts = tx.decode, {"n": 0}

    def flaky_decode(path, **kw):
        # Fault injection: a network filesystem hiccup cannot be produced on demand here, so the
        # first two reads of video 2 raise the OSError such a hiccup gives; then the real decoder runs.
        if kw.get("video_id") == "2" and attempts["n"] < 2:
            attempts["n"] += 1
            raise OSError(5, "Input/output error (injected)")
        return real_decode(path, **kw)

    monkeypatch.setattr(tx, "decode", flaky_decode)
    result = fx.extract_features(str(videos), overrides=_overrides(corpus, tmp_path / "store"))
    assert attempts["n"] == 2
    assert result["processed"] == 3 and result["failed"] == 0
    per_layer, dupes, failures = _counts(tmp_path / "store")
    assert set(per_layer.values()) == {3} and dupes == 0 and failures == []


def test_transient_failure_after_retries_fails_the_run_and_rerun_failed_fixes_it(prefect_harness, corpus, tmp_path,
                                                                                 monkeypatch):
    import flows.extract as fx
    import tasks.extract as tx

    videos = _videos_dir(corpus, tmp_path, 3, corrupt=False)
    real_decode = tx.decode
    broken = {"on": True}

    def flaky_decode(path, **kw):
        # Fault injection (see above): video 3 keeps failing until the "filesystem" recovers.
        if kw.get("video_id") == "3" and broken["on"]:
            raise OSError(5, "Input/output error (injected)")
        return real_decode(path, **kw)

    monkeypatch.setattr(tx, "decode", flaky_decode)
    ov = _overrides(corpus, tmp_path / "store", **{"prefect.task_retries": 1})
    state = fx.extract_features(str(videos), overrides=ov, return_state=True)
    assert state.is_failed()
    _, _, failures = _counts(tmp_path / "store")
    assert [(f[0], f[2]) for f in failures] == [("3", "OSError")]

    broken["on"] = False
    rerun = fx.extract_features(str(videos), overrides=ov, only_failed=True)
    assert rerun["processed"] == 1 and rerun["lvlm_batches"] == 1
    per_layer, dupes, failures = _counts(tmp_path / "store")
    assert set(per_layer.values()) == {3} and dupes == 0 and failures == []


MVREC = str(Path(sys.executable).with_name("mvrec"))


def _wait_for(marker: Path, proc: subprocess.Popen, log: Path) -> None:
    """Until the writer is paused at its pause point (it wrote `marker`); fails if it exits first.
    No deadline here: pytest-timeout bounds the test."""
    while not marker.exists():
        assert proc.poll() is None, f"mvrec exited ({proc.returncode}) before its pause point: {log.read_text()[-2000:]}"
        time.sleep(0.05)  # polling interval only; nothing is asserted on time


def test_killed_flow_is_followed_by_a_complete_run(prefect_harness, corpus, tmp_path, no_orphans):
    from flows.extract import extract_features
    from processes import describe, survivors, tagged_env
    from storage import FeatureStore

    videos = _videos_dir(corpus, tmp_path, 8, corrupt=False)
    store = tmp_path / "store"
    ov = _overrides(corpus, store, **{"extract.commit_size": 4})
    # A real `mvrec refresh` in its own process, with its own Prefect API, paused right after its
    # first batch's hidden_states commit (storage/delta.py pause points), then SIGKILLed there.
    marker = tmp_path / "paused"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVREC_", "PREFECT_"))}
    env.update({"MVREC_EXTRACT__MODEL": str(corpus / "model"), "MVREC_STORE__PATH": str(store),
                "MVREC_EXTRACT__FRAMES": "uniform:4", "MVREC_EXTRACT__COMMIT_SIZE": "4",
                "MVREC_EXTRACT__BATCH_SIZE": "4", "MVREC_PREFECT__HOME": str(tmp_path / "ph"),
                "MVREC_TEST_PAUSE_AT": "hidden_states:after-commit", "MVREC_TEST_PAUSE_FILE": str(marker)})
    log = tmp_path / "refresh.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([MVREC, "refresh", str(videos)], env=tagged_env(no_orphans, env), stdout=out,
                                stderr=subprocess.STDOUT)
    _wait_for(marker, proc, log)
    assert marker.read_text().split() == [str(proc.pid), "hidden_states:after-commit"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = survivors(no_orphans)  # its Prefect API server dies with it
    assert not left, f"orphans after SIGKILL: {describe(left)}"
    assert len(FeatureStore(str(store)).completed(_eid(ov))) == 4  # exactly the first batch
    (killed,) = FeatureStore(str(store)).read("runs").to_pylist()
    assert killed["status"] == "running"

    result = extract_features(str(videos), overrides=ov)
    assert result["processed"] == 4  # exactly the rest
    per_layer, dupes, failures = _counts(store)
    assert set(per_layer.values()) == {8} and dupes == 0 and failures == []
    runs = {r["run_id"]: r for r in FeatureStore(str(store)).read("runs").to_pylist()}
    assert runs[killed["run_id"]]["status"] == "abandoned"
    assert runs[result["run_id"]]["status"] == "completed"


def _eid(ov):
    from flows.extract import extractor_record
    from mvrec.config import load_config

    return extractor_record(load_config(overrides=ov)).extractor_id


def _feature_rows(store_path: Path) -> dict:
    from storage import connect

    with connect(open_store_path(store_path)) as con:
        hidden = con.sql("SELECT video_id, layer, embedding FROM hidden_states ORDER BY ALL").fetchall()
        captions = dict(con.sql("SELECT video_id, caption FROM captions").fetchall())
    return {"hidden": {(v, layer): emb for v, layer, emb in hidden}, "captions": captions}


def test_threads_and_a_multi_node_ray_cluster_store_the_same_rows(prefect_harness, corpus, tmp_path):
    """The same corpus through the flow on threads and on a local Ray cluster (a decode node and two
    nodes declaring one GPU each; the replicas run the test model on their CPU)."""
    import numpy as np

    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from flows.extract import extract_features

    videos = _videos_dir(corpus, tmp_path, 9, corrupt=True)
    on_threads = extract_features(str(videos), overrides=_overrides(corpus, tmp_path / "threads"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=0, num_gpus=1)
    cluster.add_node(num_cpus=0, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        on_ray = extract_features(str(videos), overrides=_overrides(corpus, tmp_path / "ray", **{
            "extract.engine": "ray", "extract.replicas": 0}))  # 0: one replica per GPU the cluster has
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert (on_ray["processed"], on_ray["failed"]) == (on_threads["processed"], on_threads["failed"]) == (9, 2)
    a, b = _feature_rows(tmp_path / "threads"), _feature_rows(tmp_path / "ray")
    assert a["captions"] == b["captions"] and sorted(a["hidden"]) == sorted(b["hidden"])
    for key, embedding in a["hidden"].items():
        np.testing.assert_allclose(b["hidden"][key], embedding, atol=1e-5, rtol=0)


def test_a_second_run_on_the_same_store_and_extractor_stops_at_once(prefect_harness, corpus, tmp_path):
    """The run lease: while a run holds it (here this process, as a first run would), the flow stops
    before any work with one line naming the owner, and writes no run record."""
    from flows.extract import extract_features
    from storage import FeatureStore, RunLeaseHeld

    videos = _videos_dir(corpus, tmp_path, 2, corrupt=False)
    ov = _overrides(corpus, tmp_path / "store")
    store = FeatureStore(str(tmp_path / "store"))
    with store.run_lease(_eid(ov)):
        state = extract_features(str(videos), overrides=ov, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, RunLeaseHeld) and str(os.getpid()) in str(error) and "\n" not in str(error)
    assert store.read("runs").num_rows == 0
    assert extract_features(str(videos), overrides=ov)["processed"] == 2  # the lease is free again
