"""tasks.decode on real files encoded here: codecs, containers, rotation, policies, failures."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tasks.decode import (
    DecodeError, NoVideoStream, TooLarge, TooLong, Unreadable, decode, frame_indices, parse_policy, target_size,
)
from video_clips import bad_files, encode_clip


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "h264": encode_clip(d / "h264.mp4", "libx264", 224, 160, frames=24),
        "mpeg4_mkv": encode_clip(d / "mpeg4.mkv", "mpeg4", 160, 288, frames=30, fps=15),
        "av1": encode_clip(d / "av1.mp4", "libsvtav1", 224, 160, frames=20),
        "big": encode_clip(d / "big.mp4", "libx264", 640, 360, frames=12),
        "rot90": encode_clip(d / "rot90.mp4", "libx264", 224, 112, frames=12, rotation=90),
        "one": encode_clip(d / "one.mp4", "libx264", 112, 112, frames=1),
        "dir": d,
    }


def test_uniform_policy_reads_the_planned_frames(clips):
    v = decode(clips["h264"], policy="uniform:8")
    assert v.frames.dtype == np.uint8 and v.frames.shape == (8, 168, 224, 3)  # 160 -> nearest multiple of 28
    assert v.meta.total_num_frames == 24 and v.meta.fps == pytest.approx(12)
    assert v.meta.frames_indices == np.linspace(0, 23, 8).round().astype(int).tolist()
    assert v.meta.backend == "decord" and v.video_id == "h264"
    assert v.meta.duration_s == pytest.approx(2.0, abs=0.1)


def test_decord_and_pyav_agree(clips):
    a = decode(clips["h264"], backend="decord")
    b = decode(clips["h264"], backend="pyav")
    assert a.meta.frames_indices == b.meta.frames_indices
    # Both scale with swscale; allow for a different scaler path, not different frames.
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 3.0


def test_fps_policy_and_max_frames(clips):
    v = decode(clips["mpeg4_mkv"], policy="fps:2")  # 2 s at 15 fps -> 4 frames
    assert len(v.meta.frames_indices) == 4
    v = decode(clips["mpeg4_mkv"], policy="fps:100", max_frames=6)
    assert len(v.meta.frames_indices) == 6 and v.meta.frames_indices[-1] == 29


def test_av1_falls_back_to_pyav(clips):
    v = decode(clips["av1"], policy="uniform:4")
    assert v.meta.backend == "pyav" and v.frames.shape[0] == 4
    assert v.meta.total_num_frames == 20


def test_downscale_keeps_aspect_within_budget(clips):
    v = decode(clips["big"], max_pixels=224 * 224)
    h, w = v.frames.shape[1:3]
    assert h * w <= 224 * 224 and h % 28 == 0 and w % 28 == 0
    assert abs(w / h - 640 / 360) < 0.15
    assert (v.meta.source_width, v.meta.source_height) == (640, 360)


def test_rotation_metadata_is_applied(clips):
    v = decode(clips["rot90"], policy="uniform:2")
    assert v.meta.rotation == 90
    assert v.frames.shape[1] > v.frames.shape[2]  # stored landscape, shown portrait
    # The red top half of the stored frame is on the left after a 90 degree counter-clockwise turn.
    red = v.frames[0, :, :, 0].astype(int)
    assert red[:, : red.shape[1] // 4].mean() > red[:, -red.shape[1] // 4 :].mean() + 100
    p = decode(clips["rot90"], policy="uniform:2", backend="pyav")
    assert p.frames.shape == v.frames.shape
    assert np.abs(p.frames.astype(int) - v.frames.astype(int)).mean() < 3.0


def test_single_frame_video_gives_two_frames(clips):
    v = decode(clips["one"])
    assert v.frames.shape[0] == 2 and v.meta.frames_indices == [0, 0]


def test_bad_files_raise_typed_errors_with_path_and_reason(clips):
    bad = bad_files(clips["dir"], clips["h264"])
    for name, path in bad.items():
        with pytest.raises(Unreadable) as info:
            decode(path)
        assert info.value.path == str(path) and info.value.reason, name
        assert isinstance(info.value, DecodeError) and isinstance(info.value, ValueError)
    with pytest.raises(Unreadable, match="not found"):
        decode(clips["dir"] / "missing.mp4")
    with pytest.raises(TooLarge):
        decode(clips["h264"], max_file_bytes=100)
    with pytest.raises(TooLong):
        decode(clips["h264"], max_duration_s=0.5)
    # errors survive pickling (Prefect may move them between processes)
    err = pickle.loads(pickle.dumps(TooLong("x.mp4", "too long")))
    assert (type(err), err.path, err.reason) == (TooLong, "x.mp4", "too long")


def test_audio_only_file_has_no_video_stream(tmp_path):
    import av

    path = tmp_path / "audio.mka"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(NoVideoStream):
        decode(path)


@pytest.mark.parametrize("bad", ["uniform", "uniform:0", "uniform:2.5", "fps:0", "fps:x", "middle:3"])
def test_bad_policy_names_the_parameter(bad):
    with pytest.raises(ValueError, match="policy"):
        parse_policy(bad)


def test_bad_parameters_name_themselves(clips):
    with pytest.raises(ValueError, match="max_frames"):
        decode(clips["h264"], max_frames=1)
    with pytest.raises(ValueError, match="max_pixels"):
        decode(clips["h264"], max_pixels=10)


def test_index_planning():
    assert frame_indices(parse_policy("uniform:4"), 3, 30.0, 32) == [0, 1, 2]
    assert frame_indices(parse_policy("uniform:4"), 100, 30.0, 32) == [0, 33, 66, 99]
    assert len(frame_indices(parse_policy("fps:1"), 300, 30.0, 32)) == 10
    assert target_size(1280, 720, 224 * 224) == (280, 168)
    assert target_size(100, 100, 224 * 224) == (112, 112)
