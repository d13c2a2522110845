"""`mvrec status` and `mvrec store diff` on real Delta stores built through the FeatureStore API
(synthetic vectors, no model): every section is checked against what was written."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake

from storage import ExtractionBatch, ExtractorRecord, FailureRow, FeatureStore, HiddenStateRow, VideoRow
from storage.diff import cosine_rows, diff_snapshots
from storage.status import store_status
from tasks.discover import VideoRef, hash_video

D, LAYERS = 8, [0, 1, -1]


def _ext(store: FeatureStore, prompt: str = "Describe.") -> str:
    return store.upsert_extractor(ExtractorRecord("tiny-qwen", "abc", prompt, "uniform:8", "video", "1",
                                                  dim=D, num_layers=1))


def _vec(i: int, layer: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(1000 * i + layer + 1)
    return (rng.standard_normal(D) + shift).astype(np.float32)


def _write(store, eid, files: dict[str, str], partial: set[str] = frozenset(), shift: float = 0.0,
           seen: datetime | None = None) -> None:
    """One batch: a video row per file (sha of its real bytes) and LAYERS hidden states each."""
    refs = [hash_video(VideoRef(v, p)) for v, p in files.items()]
    store.write_batch(ExtractionBatch(
        videos=[VideoRow(r.video_id, r.uri, r.content_sha256, r.bytes, 2.0, 10.0, 8, 8, last_seen=seen,
                         frame_count=10 if r.video_id in partial else 20, partial=r.video_id in partial)
                for r in refs],
        hidden_states=[HiddenStateRow(r.video_id, r.content_sha256, eid, k, _vec(int(r.video_id[1:]), k, shift))
                       for r in refs for k in LAYERS]))


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    files = {}
    for i in range(6):
        p = d / f"v{i}.mp4"
        p.write_bytes(os.urandom(64 + i))
        files[f"v{i}"] = str(p)
    return files


def test_status_reports_runs_failures_extractors_changes_and_size(tmp_path, corpus):
    store = FeatureStore(tmp_path / "store")
    eid = _ext(store)
    run = store.start_run("extract-features", extractor_id=eid)
    _write(store, eid, corpus, partial={"v2"})
    store.record_failures([FailureRow("v8", "decode", "Unreadable", "empty file", uri="/x/v8.mp4"),
                           FailureRow("v9", "decode", "Unreadable", "not media", uri="/x/v9.mp4"),
                           FailureRow("v7", "quality", "NonFiniteEmbedding", "layer 0: 8 NaN", extractor_id=eid)])
    store.finish_run(run, counts={"extracted": 6, "failed": 3})
    store.tag("nightly-1")
    store.start_run("extract-features", extractor_id=eid)  # still running
    # v0: rewritten with another size; v1: same size, new bytes, later mtime; v3: removed; v4: touched only
    open(corpus["v0"], "ab").write(b"more")
    future = time.time() + 60
    open(corpus["v1"], "r+b").write(b"X" * 8)
    os.utime(corpus["v1"], (future, future))
    os.remove(corpus["v3"])
    os.utime(corpus["v4"], (future, future))

    s = store_status(FeatureStore(tmp_path / "store", create=False), runs=5,
                     hash_file=lambda p: hash_video(VideoRef("", p)).content_sha256)
    assert [r["status"] for r in s["runs"]] == ["running", "completed"]
    assert s["runs"][1]["counts"] == {"extracted": 6, "failed": 3} and s["runs"][1]["duration_s"] >= 0
    assert s["runs"][0]["duration_s"] is None
    assert s["failures"]["open"] == 3
    top = s["failures"]["by_reason"][0]
    assert (top["stage"], top["error_type"], top["count"]) == ("decode", "Unreadable", 2)
    assert sorted(e["video_id"] for e in top["examples"]) == ["v8", "v9"]
    (e,) = s["extractors"]
    assert (e["extractor_id"], e["videos_done"], e["partial"], e["layers"]) == (eid, 6, 1, [-1, 0, 1])
    assert e["newest_tag"] == "nightly-1" and e["last_run"]["status"] == "completed"
    assert s["partial_videos"] == 1
    changed = {c["video_id"]: c["reason"] for c in s["changed_files"]["videos"]}
    assert changed == {"v0": "size", "v1": "content", "v3": "missing"}  # v4: same bytes, not reported
    size = s["size"]
    assert size["tables"]["hidden_states"]["rows"] == 6 * len(LAYERS)
    assert size["tables"]["runs"]["rows"] == 2
    assert 0 < size["live_bytes"] <= size["bytes_on_disk"]
    json.dumps(s)  # JSON-ready as it is


def test_status_without_hashing_reports_touched_files_as_modified(tmp_path, corpus):
    store = FeatureStore(tmp_path / "store")
    _write(store, _ext(store), corpus)
    future = time.time() + 60
    os.utime(corpus["v4"], (future, future))
    s = store_status(store, hash_file=None)
    assert [(c["video_id"], c["reason"]) for c in s["changed_files"]["videos"]] == [("v4", "modified")]
    assert store_status(store, check_files=False)["changed_files"] is None


def test_status_of_an_empty_store(tmp_path):
    s = store_status(FeatureStore(tmp_path / "store"))
    assert s["runs"] == [] and s["extractors"] == [] and s["failures"]["open"] == 0
    assert s["changed_files"]["count"] == 0 and s["partial_videos"] == 0


def test_cosine_rows():
    a = np.array([[1, 0], [1, 1], [0, 0]], np.float32)
    b = np.array([[1, 0], [-1, -1], [1, 0]], np.float32)
    got = cosine_rows(a, b)
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(-1.0) and np.isnan(got[2])


def test_diff_counts_added_removed_changed_and_cosines(tmp_path, corpus):
    store = FeatureStore(tmp_path / "store")
    eid = _ext(store)
    t0 = datetime.now(timezone.utc) - timedelta(days=1)
    _write(store, eid, {v: corpus[v] for v in ("v0", "v1", "v2", "v3")}, seen=t0)
    store.tag("before")
    # v4 added; v3 removed; v0 new content (so a new key) with moved vectors; v1, v2 untouched
    open(corpus["v0"], "ab").write(b"more")
    _write(store, eid, {"v0": corpus["v0"], "v4": corpus["v4"]}, shift=3.0)
    for layer in LAYERS:  # the store has no delete: drop v3 by rewriting each partition without it
        dt = store.table("hidden_states")
        t = dt.to_pyarrow_table(filters=[("extractor_id", "=", eid), ("layer", "=", layer)])
        t = t.filter(pc.not_equal(t.column("video_id"), "v3"))
        write_deltalake(dt, t, mode="overwrite", predicate=f"extractor_id = '{eid}' AND layer = {layer}")
    store.tag("after")

    diffs = diff_snapshots(store, "before", "after")
    assert [d.layer for d in diffs] == [-1, 0, 1]
    for d in diffs:
        assert (d.videos_a, d.videos_b, d.added, d.removed, d.common) == (4, 4, 1, 1, 3)
        assert d.changed == 1 and d.examples_changed == ["v0"]
        assert d.examples_added == ["v4"] and d.examples_removed == ["v3"]
        # v1 and v2 are identical (cosine 1); v0's current content is the shifted vector
        assert d.cos_median == pytest.approx(1.0) and d.cos_min < 0.99
        assert d.below == pytest.approx(1 / 3)
    same = diff_snapshots(store, "after", "latest", layers=[0])
    assert len(same) == 1 and same[0].added == same[0].removed == same[0].changed == 0 and same[0].below == 0.0


def test_diff_between_two_extractors_after_a_prompt_change(tmp_path, corpus):
    store = FeatureStore(tmp_path / "store")
    old, new = _ext(store), _ext(store, prompt="Summarise.")
    _write(store, old, corpus)
    store.tag("v1")
    refs = [hash_video(VideoRef(v, p)) for v, p in corpus.items()]
    store.upsert_hidden_states([HiddenStateRow(r.video_id, r.content_sha256, new, k, -_vec(int(r.video_id[1:]), k))
                                for r in refs for k in LAYERS])
    (d,) = diff_snapshots(store, "v1", "latest", pairs=[(old, new)], layers=[-1])
    assert (d.extractor_a, d.extractor_b, d.common, d.added) == (old, new, 6, 0)
    assert d.cos_median == pytest.approx(-1.0) and d.below == 1.0
    by_id = diff_snapshots(store, "v1", "latest")  # per extractor: `new` is all added
    assert {(d.extractor_a, d.layer): d.added for d in by_id}[(new, 0)] == 6
    with pytest.raises(ValueError, match="has no hidden states in snapshot 'v1'"):
        diff_snapshots(store, "v1", "latest", pairs=[(new, old)])
    with pytest.raises(ValueError, match="unknown snapshot tag 'nope'"):
        diff_snapshots(store, "nope", "latest")
    with pytest.raises(ValueError, match="hidden_states has versions"):
        diff_snapshots(store, "999", "latest")


def _cli(argv: list[str], capsys, monkeypatch, store_path) -> tuple[int, str, str]:
    from test_cli import run_in_process

    monkeypatch.setenv("MVREC_STORE__PATH", str(store_path))
    monkeypatch.setenv("COLUMNS", "200")
    return run_in_process(argv, capsys)


def test_cli_status_and_diff(tmp_path, corpus, capsys, monkeypatch):
    store = FeatureStore(tmp_path / "store")
    eid = _ext(store)
    run = store.start_run("extract-features", extractor_id=eid)
    _write(store, eid, corpus, partial={"v1"})
    store.record_failures([FailureRow("v9", "decode", "Unreadable", "empty file")])
    store.finish_run(run, counts={"extracted": 6})
    store.tag("t1")

    code, out, err = _cli(["status", "--json"], capsys, monkeypatch, store.root)
    assert code == 0, err
    s = json.loads(out)
    assert s["extractors"][0]["videos_done"] == 6 and s["partial_videos"] == 1 and s["failures"]["open"] == 1
    code, out, err = _cli(["status"], capsys, monkeypatch, store.root)
    assert code == 0, err
    assert "last 1 runs" in out and "open failures: 1" in out and "Unreadable" in out and eid in out
    assert "partial videos (fewer frames decoded than the header promises): 1" in out

    code, out, err = _cli(["store", "diff", "t1", "latest", "--json"], capsys, monkeypatch, store.root)
    assert code == 0, err
    assert [(d["layer"], d["common"], d["below"]) for d in json.loads(out)] == [(-1, 6, 0.0), (0, 6, 0.0), (1, 6, 0.0)]
    code, out, err = _cli(["store", "diff", "t1", "--layers", "0"], capsys, monkeypatch, store.root)
    assert code == 0 and "store diff t1 → latest" in out

    for argv, names in ((["store", "diff", "nope"], "nope"), (["store", "diff", "t1", "--pair", "x"], "--pair"),
                        (["store", "diff", "t1", "--layers", "a,b"], "--layers")):
        code, out, err = _cli(argv, capsys, monkeypatch, store.root)
        assert code == 2 and len(err.strip().splitlines()) == 1 and names in err, (argv, err)
    code, out, err = _cli(["status"], capsys, monkeypatch, tmp_path / "no-store")
    assert code == 2 and "no feature store" in err and len(err.strip().splitlines()) == 1


def test_store_info_prints_each_tables_version_rows_and_files(tmp_path, corpus, monkeypatch, capsys):
    from mvrec.cli import main

    store = FeatureStore(tmp_path / "store")
    _write(store, _ext(store), corpus)
    monkeypatch.setenv("MVREC_STORE__PATH", str(tmp_path / "store"))
    main(["store", "info"])
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in capsys.readouterr().out.splitlines() if line.count("│") == 5}
    assert rows["hidden_states"][1] == str(len(corpus) * len(LAYERS)) and rows["videos"][1] == str(len(corpus))
    assert rows["snapshots"] == ["0", "0", "0"]
