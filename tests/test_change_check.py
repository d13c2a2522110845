"""The nightly change check (flows/plan.py check_changes, make_plan): an unchanged file costs a
stat, never a read of its bytes; a changed one is hashed again; --verify and verify_days re-read;
a file modified within 2 s of its hashing is never trusted; one run hashes each file once."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

import tasks.discover as discover
from file_opens import FileOpens
from flows.plan import check_changes, pending_work, take_plan
from mvrec.config import load_config
from storage import FeatureStore
from tasks.discover import discover_videos

PAST_NS = 10**10  # files written 10 s ago: older than the racily-clean window


def _write(path: Path, data: bytes, age_ns: int = PAST_NS) -> None:
    path.write_bytes(data)
    t = time.time_ns() - age_ns
    os.utime(path, ns=(t, t))


@pytest.fixture
def corpus(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        _write(videos / f"{i}.mp4", f"video {i}".encode() * 100)
    return videos


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unchanged_file_is_not_opened_and_keeps_its_hash(tmp_path, corpus):
    store = FeatureStore(tmp_path / "store")
    first = check_changes(store, discover_videos(corpus))
    assert (first.read_files, first.reused) == (5, 0)
    assert store.file_index().num_rows == 5

    watch = FileOpens(corpus)
    again = check_changes(store, discover_videos(corpus))
    assert watch.opened() == []
    assert (again.read_files, again.reused, again.read_bytes) == (0, 5, 0)
    assert {r.video_id: r.content_sha256 for r in again.hashed} == {p.stem: _sha(p) for p in corpus.iterdir()}


def test_a_changed_file_is_read_again_and_only_it(tmp_path, corpus):
    store = FeatureStore(tmp_path / "store")
    check_changes(store, discover_videos(corpus))
    _write(corpus / "2.mp4", b"another content, same folder")
    os.utime(corpus / "3.mp4", ns=(time.time_ns() - 5 * 10**9,) * 2)  # touched: same bytes, new mtime

    watch = FileOpens(corpus)
    check = check_changes(store, discover_videos(corpus))
    assert sorted(p.name for p in watch.opened()) == ["2.mp4", "3.mp4"]
    assert (check.read_files, check.reused) == (2, 3)
    by_id = {r.video_id: r.content_sha256 for r in check.hashed}
    assert by_id["2"] == _sha(corpus / "2.mp4") and by_id["3"] == _sha(corpus / "3.mp4")
    # Both are recorded again: the next check reads nothing.
    assert check_changes(store, discover_videos(corpus)).read_files == 0


def test_verify_and_verify_days_read_every_file(tmp_path, corpus):
    store = FeatureStore(tmp_path / "store")
    check_changes(store, discover_videos(corpus))
    assert check_changes(store, discover_videos(corpus), verify=True).read_files == 5
    # Hashes older than a millisecond's worth of days: every file is read again.
    assert check_changes(store, discover_videos(corpus), verify_days=1e-8).read_files == 5
    assert check_changes(store, discover_videos(corpus), verify_days=30).read_files == 0


def test_a_file_modified_just_before_its_hash_is_never_trusted(tmp_path, corpus):
    """git's racily clean files: a rewrite within the timestamp granularity can keep size and
    mtime, so a file written within 2 s of its hashing is not recorded and is read next time."""
    store = FeatureStore(tmp_path / "store")
    _write(corpus / "new.mp4", b"just written", age_ns=0)
    check_changes(store, discover_videos(corpus))
    assert store.file_index().num_rows == 5
    assert check_changes(store, discover_videos(corpus)).read_files == 1


def test_a_refresh_hashes_each_file_once(tmp_path, corpus, monkeypatch):
    """The CLI's pre-check, the nightly flow's look at pending work and the extraction flow's plan
    are one change check: each new file is hashed once per run."""
    hashed = []
    real = discover.hash_video
    monkeypatch.setattr(discover, "hash_video", lambda ref, **kw: hashed.append(ref.uri) or real(ref, **kw))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config(None, overrides={"store.path": str(tmp_path / "store"), "extract.model": str(model)})
    for _look in range(2):  # mvrec refresh's pre-check, then nightly_refresh's
        assert pending_work(cfg, str(corpus))["to_extract"] == 5
    plan = take_plan(cfg, str(corpus))  # extract_features
    assert len(plan.todo) == 5
    assert sorted(hashed) == sorted(str(p) for p in corpus.iterdir())
