import hashlib

import pytest

from tasks.discover import discover_videos, hash_videos, local_copy


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_ids_are_relative_paths_without_extension(tmp_path):
    _touch(tmp_path / "videos" / "17.mp4")
    _touch(tmp_path / "videos" / "sub" / "a.MKV")
    _touch(tmp_path / "videos" / "notes.txt")
    refs = discover_videos(tmp_path / "videos")
    assert [r.video_id for r in refs] == ["17", "sub/a"]
    assert all(r.uri.startswith(str(tmp_path)) for r in refs)


def test_manifest_txt_and_csv(tmp_path):
    a = _touch(tmp_path / "v" / "a.mp4")
    _touch(tmp_path / "v" / "b.mp4")
    (tmp_path / "list.txt").write_text("# comment\nv/a.mp4\n\n" + str(tmp_path / "v" / "b.mp4") + "\n")
    assert [r.video_id for r in discover_videos(tmp_path / "list.txt")] == ["a", "b"]
    (tmp_path / "list.csv").write_text("video_id,file\nitem-1,v/a.mp4\n")
    (ref,) = discover_videos(tmp_path / "list.csv")
    assert (ref.video_id, ref.uri) == ("item-1", str(a.resolve()))


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        discover_videos(tmp_path / "nope")
    (tmp_path / "bad.csv").write_text("name\nx\n")
    with pytest.raises(ValueError, match="bad.csv.*'uri'"):
        discover_videos(tmp_path / "bad.csv")
    _touch(tmp_path / "d" / "x.mp4")
    _touch(tmp_path / "d" / "x.mkv")
    with pytest.raises(ValueError, match="duplicate video_id 'x'"):
        discover_videos(tmp_path / "d")


def test_hash_matches_hashlib_and_reports_unreadable(tmp_path):
    data = bytes(range(256)) * 5000
    f = _touch(tmp_path / "a.mp4", data)
    refs = discover_videos([str(f), str(tmp_path / "gone.mp4")])
    hashed, unreadable = hash_videos(refs)
    assert hashed[0].content_sha256 == hashlib.sha256(data).hexdigest()
    assert hashed[0].bytes == len(data)
    assert [r.video_id for r, _ in unreadable] == ["gone"]
    assert "FileNotFoundError" in unreadable[0][1]


def test_local_copy_of_a_remote_uri(tmp_path):
    # fsspec's in-memory filesystem stands in for object storage.
    import fsspec

    with fsspec.open("memory://bucket/clip.mp4", "wb") as fh:
        fh.write(b"video-bytes")
    path = local_copy("memory://bucket/clip.mp4", tmp_path / "cache")
    assert open(path, "rb").read() == b"video-bytes"
    assert local_copy(str(tmp_path / "x.mp4"), tmp_path / "cache") == str(tmp_path / "x.mp4")
