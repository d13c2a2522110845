import hashlib
import os

import pytest

from tasks.discover import VideoRef, changed_since_hash, discover_videos, hash_video, hash_videos, is_transient, \
    local_copy


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
    os.mkfifo(tmp_path / "fifo-source")
    with pytest.raises(ValueError, match="fifo-source is a FIFO"):
        discover_videos(tmp_path / "fifo-source")


def test_two_files_with_one_video_id_are_one_failure_ref_and_the_rest_goes_on(tmp_path):
    _touch(tmp_path / "d" / "x.mp4")
    _touch(tmp_path / "d" / "x.mkv")
    _touch(tmp_path / "d" / "y.mp4")
    refs = discover_videos(tmp_path / "d")
    assert [r.video_id for r in refs] == ["x", "y"] and refs[1].problem == ""
    assert refs[0].problem.startswith("DuplicateVideoId: ") and "x.mkv and " in refs[0].problem
    assert "x.mp4" in refs[0].problem and "neither is extracted" in refs[0].problem
    hashed, unreadable = hash_videos(refs)
    assert [r.video_id for r in hashed] == ["y"] and [r.video_id for r, _ in unreadable] == ["x"]
    # The same file named twice in a manifest is one video, not a clash.
    (tmp_path / "list.txt").write_text("d/y.mp4\nd/y.mp4\n")
    assert [(r.video_id, r.problem) for r in discover_videos(tmp_path / "list.txt")] == [("y", "")]


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


def test_fifos_and_devices_are_failure_refs_and_never_opened(tmp_path):
    """A FIFO blocks open() until a writer comes and /dev/zero never ends: either would hang the
    hash step. Both are refs with a NotARegularFile problem; the good file is hashed."""
    d = tmp_path / "d"
    _touch(d / "good.mp4", b"good")
    os.mkfifo(d / "fifo.mp4")
    (d / "zero.mp4").symlink_to("/dev/zero")
    refs = {r.video_id: r for r in discover_videos(d)}
    assert refs["fifo"].problem.startswith("NotARegularFile: ") and "is a FIFO" in refs["fifo"].problem
    assert refs["zero"].problem.startswith("NotARegularFile: ") and "/dev/zero is a character device" in refs[
        "zero"].problem
    hashed, unreadable = hash_videos(list(refs.values()))
    assert [r.video_id for r in hashed] == ["good"]
    assert sorted((r.video_id, why.split(":")[0]) for r, why in unreadable) == [
        ("fifo", "NotARegularFile"), ("zero", "NotARegularFile")]
    assert not any(is_transient(why) for _, why in unreadable)


def test_a_file_swapped_for_a_fifo_after_discovery_is_refused_unread(tmp_path):
    f = _touch(tmp_path / "v.mp4", b"video")
    (ref,) = discover_videos([str(f)])
    f.unlink()
    os.mkfifo(f)  # no writer: a blocking open would wait forever
    hashed, unreadable = hash_videos([ref])
    assert hashed == [] and unreadable[0][1].startswith("NotARegularFile: ") and "FIFO" in unreadable[0][1]


@pytest.fixture()
def stalled_url(tmp_path):
    """A URL whose server accepts the connection and never answers: a real stalled network read
    (a stalled NFS mount cannot be made here; hashing watches local and remote reads alike)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}/stalled.mp4"
    server.close()  # the stuck read then fails and its thread ends


def test_a_stalled_read_is_a_transient_read_timeout_and_the_rest_is_hashed(tmp_path, stalled_url):
    good = _touch(tmp_path / "good.mp4", b"good")
    refs = [VideoRef("stalled", stalled_url), VideoRef("good", str(good)), VideoRef("also", str(good))]
    hashed, unreadable = hash_videos(refs, workers=1, read_timeout_s=0.5)
    assert [r.video_id for r in hashed] == ["good", "also"]  # one worker: its replacement hashed these
    ((ref, why),) = unreadable
    assert ref.video_id == "stalled" and why.startswith("ReadTimeout: no progress reading http://127.0.0.1:")
    assert is_transient(why)


def _old(path, data):
    """`path` holding `data`, its mtime a day old (a file hashed seconds after it was written has
    an untrusted stat; see _RACY_NS)."""
    path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 86400 * 10**9))
    return path


def test_changed_since_hash_trusts_an_unchanged_stat_and_rehashes_only_a_changed_one(tmp_path):
    f = _old(tmp_path / "v.mp4", b"A" * 1000)
    ref = hash_video(VideoRef("v", str(f)))
    assert ref.stat is not None and ref.stat[0] == 1000
    calls = []

    def rehash(r):
        calls.append(r.uri)
        return hash_video(r)

    assert changed_since_hash(ref, rehash) is None and calls == []  # one stat, no read
    os.utime(f)  # touched, same bytes: rehashed once, not a change
    assert changed_since_hash(ref, rehash) is None and calls == [str(f)]
    _old(f, b"B" * 1000)  # same size, another content, an old mtime again (cp -p): ctime tells
    why = changed_since_hash(ref, rehash)
    assert why.startswith("ContentChanged: ") and "changed while it was processed" in why and is_transient(why)
    f.unlink()
    assert changed_since_hash(ref).startswith("ContentChanged: ")
    assert changed_since_hash(VideoRef("r", "s3://bucket/v.mp4", content_sha256="abc")) is None  # not checked


def test_a_recently_written_file_is_always_rehashed(tmp_path):
    f = _touch(tmp_path / "v.mp4", b"A" * 10)  # written just now: its stat cannot prove anything
    ref = hash_video(VideoRef("v", str(f)))
    assert ref.stat is None and ref.content_sha256 == hashlib.sha256(b"A" * 10).hexdigest()
    assert changed_since_hash(ref) is None
    f.write_bytes(b"B" * 10)
    assert changed_since_hash(ref).startswith("ContentChanged: ")
