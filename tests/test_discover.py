import hashlib
import os

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
    assert unreadable[0][1].startswith("MissingFile: ") and "gone.mp4" in unreadable[0][1]


def test_every_path_found_is_a_ref_with_a_problem_or_a_readable_file(tmp_path):
    """Odd entries are refs with a problem (they become failure rows), never silently dropped."""
    d = tmp_path / "d"
    good = _touch(d / "good.mp4", b"good")
    odd = _touch(d / os.fsdecode(b"bad\xffname.mp4"), b"odd")
    (d / "dangling.mp4").symlink_to("nowhere.mp4")
    (d / "loop_a.mp4").symlink_to("loop_b.mp4")
    (d / "loop_b.mp4").symlink_to("loop_a.mp4")
    (d / "sub").mkdir()
    (d / "sub" / "up").symlink_to("..")  # a directory loop: not followed
    _touch(tmp_path / "elsewhere" / "x.mp4")
    (d / "linked").symlink_to(tmp_path / "elsewhere")  # a directory symlink elsewhere: followed
    refs = {r.video_id: r for r in discover_videos(d)}
    kinds = {vid: r.problem.split(":")[0] for vid, r in refs.items()}
    assert kinds == {"good": "", "bad\\xffname": "UndecodableName", "dangling": "DanglingSymlink",
                     "loop_a": "SymlinkLoop", "loop_b": "SymlinkLoop", "sub/up": "SymlinkLoop", "linked/x": ""}
    # The undecodable name keeps its raw bytes, escaped, so the row names the file exactly.
    assert refs["bad\\xffname"].uri == str(d) + "/bad\\xffname.mp4"
    assert os.fsencode(odd.name) == b"bad\xffname.mp4"
    assert refs["good"].uri == str(good)
    hashed, unreadable = hash_videos(list(refs.values()))
    assert sorted(r.video_id for r in hashed) == ["good", "linked/x"]
    assert sorted(why.split(":")[0] for _, why in unreadable) == sorted(k for k in kinds.values() if k)


def test_manifest_line_naming_a_missing_file_is_a_ref_naming_the_line(tmp_path):
    _touch(tmp_path / "v" / "a.mp4")
    (tmp_path / "list.txt").write_bytes(b"v/a.mp4\nv/missing.mp4\nv/bad\xff.mp4\n")
    refs = discover_videos(tmp_path / "list.txt")
    assert [r.video_id for r in refs] == ["a", "missing", "bad\\xff"]
    assert refs[1].problem == f"MissingFile: {tmp_path}/v/missing.mp4 does not exist (named on {tmp_path}/list.txt:2)"
    assert refs[2].problem.startswith("UndecodableName: ")


def test_local_copy_of_a_remote_uri(tmp_path):
    # fsspec's in-memory filesystem stands in for object storage.
    import fsspec

    with fsspec.open("memory://bucket/clip.mp4", "wb") as fh:
        fh.write(b"video-bytes")
    path = local_copy("memory://bucket/clip.mp4", tmp_path / "cache")
    assert open(path, "rb").read() == b"video-bytes"
    assert local_copy(str(tmp_path / "x.mp4"), tmp_path / "cache") == str(tmp_path / "x.mp4")
