"""Partial decodes: a clip whose NAL units are damaged after some frame (like decord's own
corrupted.mp4) is decoded from the frames that exist, flagged `partial`, and stored with the
frame count and duration of what decoded; refused with PartialVideo when asked. Real files and a
real Delta store; nothing is mocked."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from storage import FeatureStore, VideoRow
from storage.schema import ALL_TABLES, SCHEMA_VERSION
from tasks.decode import DecodeError, PartialVideo, decode
from video_clips import damage_after, encode_clip, write_corrupt_files

FRAMES, FPS, FIRST_BAD = 50, 10, 28


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("partial")
    good = encode_clip(d / "good.mp4", frames=FRAMES, fps=FPS)
    return {"good": good, "damaged": damage_after(good, d / "corrupted.mp4", FIRST_BAD), "dir": d}


def test_a_whole_clip_is_not_partial(clips):
    v = decode(clips["good"])
    assert not v.meta.partial
    assert v.meta.total_num_frames == FRAMES and v.meta.duration_s == pytest.approx(5.0)


def test_damaged_clip_is_flagged_and_counted_on_what_decoded(clips):
    v = decode(clips["damaged"], policy="uniform:8")
    m = v.meta
    assert m.partial and m.backend == "pyav"  # decord refuses the damaged packets
    # Packets are in decode order (B-frames), so a few frames before FIRST_BAD are lost too.
    assert FIRST_BAD - 4 <= m.total_num_frames <= FIRST_BAD
    assert m.duration_s == pytest.approx(m.total_num_frames / FPS)  # not the header's 5.0 s
    assert len(m.frames_indices) == 8 and max(m.frames_indices) == m.total_num_frames - 1
    assert v.frames.shape[0] == 8


def test_partial_videos_can_be_refused(clips):
    with pytest.raises(PartialVideo) as err:
        decode(clips["damaged"], allow_partial=False)
    assert isinstance(err.value, DecodeError)  # permanent: the file fails the same way again
    assert f"of the {FRAMES} frames the header promises" in str(err.value)
    assert not decode(clips["good"], allow_partial=False).meta.partial


def test_a_truncated_stream_without_a_frame_count_is_partial_by_its_duration(clips):
    mkv = [p for p in write_corrupt_files(clips["dir"] / "corrupt") if p.suffix == ".mkv"][0]
    v = decode(mkv)  # 45 frames promised by the header's 3.0 s at 15 fps; 40% of the bytes kept
    assert v.meta.partial and v.meta.total_num_frames < 45
    assert v.meta.duration_s == pytest.approx(v.meta.total_num_frames / v.meta.fps)


def test_videos_store_frame_count_and_partial(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.upsert_videos([VideoRow("a", "/a.mp4", "s1", 10, 2.6, 10.0, 224, 168, frame_count=26, partial=True),
                         VideoRow("b", "/b.mp4", "s2", 10, 5.0, 10.0, 224, 168, frame_count=50, partial=False)])
    rows = {r["video_id"]: r for r in store.read("videos").to_pylist()}
    assert (rows["a"]["frame_count"], rows["a"]["partial"]) == (26, True)
    assert (rows["b"]["frame_count"], rows["b"]["partial"]) == (50, False)


def test_v2_videos_and_runs_tables_are_upgraded_in_place(tmp_path):
    root = tmp_path / "store"
    FeatureStore(root)
    v2 = {}
    for name, added in (("videos", {"frame_count", "partial"}), ("runs", {"stats", "owner"})):
        v2[name] = pa.schema([f for f in ALL_TABLES[name].schema if f.name not in added])
        shutil.rmtree(root / name)
        DeltaTable.create(str(root / name), v2[name], name=name, description=f"mvrec {name} schema v2")
    write_deltalake(str(root / "videos"), pa.Table.from_pylist(
        [{"video_id": "old", "uri": "/o.mp4", "content_sha256": "s"}], schema=v2["videos"]), mode="append")

    reader = FeatureStore(root, create=False)  # readers see the new columns as NULL
    old = reader.read("videos").to_pylist()
    assert [(r["video_id"], r["frame_count"], r["partial"]) for r in old] == [("old", None, None)]

    writer = FeatureStore(root)  # a writer adds the columns: one metadata commit per table
    for name in ("videos", "runs"):
        dt = DeltaTable(str(root / name))
        assert [f.name for f in dt.schema().fields] == ALL_TABLES[name].schema.names
        assert dt.metadata().description == f"mvrec {name} schema v{SCHEMA_VERSION}"
    writer.upsert_videos([VideoRow("new", "/n.mp4", "t", frame_count=26, partial=True)])
    run = writer.start_run("extract-features")
    writer.finish_run(run, stats={"norms": {"-1": {"count": 1, "mean": 2.0}}})
    got = {r["video_id"]: r["partial"] for r in writer.read("videos").to_pylist()}
    assert got == {"old": None, "new": True}
    assert '"mean": 2.0' in writer.read("runs").to_pylist()[0]["stats"]
