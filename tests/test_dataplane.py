"""The data plane (tasks/dataplane.py): replicas run at the same time, queues stay bounded, and on a
local multi-node Ray cluster rows match threads, frames stay out of the driver, and a node removed
mid-run loses nothing.

The model here is the accelerator stand-in (tasks/lvlm_standin.py): it holds a batch without using
the CPU and returns features computed from the frames, so what arrives where can be checked."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from tasks.dataplane import PlaneSpec, PlaneStats, ThreadEngine, run_plane, stream
from tasks.discover import VideoRef
from tasks.extract import DecodeOptions
from tasks.lvlm import ExtractSpec
from tasks.lvlm_standin import StandinBackend, parse_standin
from video_clips import encode_clip, write_corrupt_files

OPTS = DecodeOptions(policy="uniform:4", max_pixels=64 * 64)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("plane")
    return [encode_clip(d / f"{i}.mp4", "libx264", 288 + 16 * (i % 3), 224, frames=8, fps=8, seed=i) for i in range(6)]


def _refs(clips: list[Path], copies: int = 1) -> list[VideoRef]:
    return [VideoRef(video_id=f"{c.stem}-{k}", uri=str(c)) for k in range(copies) for c in clips]


def _rows(batches) -> dict[str, tuple[str, np.ndarray]]:
    rows = {}
    for batch, _ in batches:
        for done in batch.results:
            assert done.ref.video_id not in rows, f"{done.ref.video_id} came back twice"
            rows[done.ref.video_id] = (done.features.caption, done.features.hidden)
    return rows


def test_standin_spec_is_parsed_and_refused_with_one_line():
    assert parse_standin("standin:0.25:37x2048") == (0.25, 36, 2048)
    assert parse_standin("standin:0") == (0.0, 5, 64)
    for bad in ("standin", "standin:x", "standin:-1", "standin:0.1:37", "qwen:0.1"):
        with pytest.raises(ValueError, match="is not a stand-in spec"):
            parse_standin(bad)


class _Rendezvous(StandinBackend):
    """Every batch waits until `parties` batches are inside the model at once: with fewer replicas
    running at the same time the barrier breaks (BrokenBarrierError) instead of passing."""

    barrier: threading.Barrier

    def extract(self, batch):
        self.barrier.wait()
        return super().extract(batch)


def test_threads_run_replicas_at_the_same_time_and_keep_every_video_once(clips):
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0"), OPTS, batch_size=2, replicas=2, decode_workers=2)
    backends = [_Rendezvous(plane.spec) for _ in range(2)]
    _Rendezvous.barrier = threading.Barrier(2, timeout=60)
    refs = _refs(clips, copies=2)  # 12 videos, 6 batches: every batch meets one on the other replica
    stats = PlaneStats()
    rows = _rows(run_plane(refs, plane, backends=backends, stats=stats))
    assert sorted(rows) == sorted(r.video_id for r in refs)
    assert sorted(stats.replica_busy_s) == [0, 1] and stats.batches == 6


class _CountingEngine(ThreadEngine):
    """Counts decode submissions; each model batch checks how far decoding has run ahead of it."""

    def __init__(self, plane):
        super().__init__(plane)
        self.decodes, self.models, self.ahead = 0, 0, []

    def decode(self, chunk):
        self.decodes += 1
        return super().decode(chunk)

    def model(self, rid, decoded):
        self.models += 1
        self.ahead.append(self.decodes - self.models)
        return super().model(rid, decoded)


def test_decoding_runs_a_bounded_number_of_batches_ahead(clips):
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0.02"), OPTS, batch_size=1, replicas=1, decode_workers=2,
                      queue_per_replica=2)
    engine = _CountingEngine(plane)
    try:
        rows = _rows(stream(_refs(clips, copies=4), plane, engine))
    finally:
        engine.close()
    assert len(rows) == 24 and engine.models == 24
    # decoding (or decoded, not yet sent) never exceeds decode_workers + replicas * queue_per_replica
    assert max(engine.ahead) <= plane.decode_workers + plane.queue_per_replica
    assert max(engine.ahead) >= 1  # and it does run ahead


def test_decode_failures_come_back_as_rows(clips, tmp_path):
    bad = write_corrupt_files(tmp_path / "bad")[:2]
    refs = _refs(clips[:3]) + [VideoRef(video_id=p.stem, uri=str(p)) for p in bad]
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0"), OPTS, batch_size=2, replicas=1, decode_workers=1)
    batches = list(run_plane(refs, plane))
    failures = [f for b, _ in batches for f in b.failures]
    assert sorted(f.video_id for f in failures) == sorted(p.stem for p in bad)
    assert all(f.stage == "decode" for f in failures) and len(_rows(batches)) == 3


def test_a_file_changed_after_hashing_is_not_stored_under_its_old_hash(clips, tmp_path):
    import shutil

    from tasks.discover import hash_videos

    videos = [shutil.copy(c, tmp_path / c.name) for c in clips[:3]]
    hashed, _ = hash_videos([VideoRef(video_id=Path(v).stem, uri=str(v)) for v in videos])
    shutil.copy(clips[4], videos[1])  # swapped between the hash and the decode
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0"), OPTS, batch_size=4, replicas=1, decode_workers=1)
    batches = list(run_plane(hashed, plane))
    failures = [f for b, _ in batches for f in b.failures]
    assert sorted(_rows(batches)) == ["0", "2"]
    assert [(f.video_id, f.stage, f.error_type, f.permanent) for f in failures] == [("1", "read", "ContentChanged", False)]


# ---------------------------------------------------------------------------------------------
# a local multi-node Ray cluster (ray.cluster_utils.Cluster: several raylets on this machine)

def test_a_lagging_commit_group_grows_only_up_to_its_bound():
    """Results that pile up while the caller commits come back as groups of at most max_videos
    videos (whole batches, in order): a slow commit never makes one unbounded commit."""
    from tasks.dataplane import in_background
    from tasks.extract import Batch
    from tasks.lvlm import Failure, ModelInfo

    info = ModelInfo(model="m", revision="", arch="a", num_layers=1, hidden_size=4, is_test_model=True,
                     dtype="float32", device="cpu")
    batches = [(Batch([], [Failure(f"v{b}-{i}", "", "model", "E", "") for i in range(3)]), info) for b in range(10)]
    first_taken, all_sent = threading.Event(), threading.Event()

    def results():
        yield batches[0]
        first_taken.wait(30)
        yield from batches[1:]  # all of these arrive while the caller still commits the first group
        all_sent.set()

    groups = []
    for group in in_background(results(), min_videos=1, max_videos=7):
        groups.append([f.video_id for b, _ in group for f in b.failures])
        if len(groups) == 1:
            first_taken.set()
            all_sent.wait(30)
    assert [v for g in groups for v in g] == [f.video_id for b, _ in batches for f in b.failures]
    assert [len(g) for g in groups] == [3, 6, 6, 6, 6, 3]  # 27 waiting: whole batches, at most 7 a group


ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture
def cluster():
    """Head (the driver, no CPU for tasks), a decode node with 1 CPU, two 'GPU' nodes with one
    declared GPU each and no CPU: decode runs on one node, replicas on the others."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {"decode": c.add_node(num_cpus=1), "gpu_a": c.add_node(num_cpus=0, num_gpus=1),
             "gpu_b": c.add_node(num_cpus=0, num_gpus=1)}
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


def _recording_ray_engine(plane):
    """A RayEngine that keeps every decoded batch's reference, so the test can ask where it lives."""
    from tasks.dataplane import RayEngine

    class Recording(RayEngine):
        def decode(self, chunk):
            ref = super().decode(chunk)
            self.refs.append(ref)
            return ref

    engine = Recording(plane)
    engine.refs = []
    return engine


@pytest.mark.slow
def test_ray_rows_match_threads_and_frames_never_reach_the_driver(clips, cluster):
    # Frames of a realistic size: Ray hands a result under 100 KiB to its owner (this process)
    # inline; a decoded batch here is about 1 MB, so it lives in the object store.
    opts = DecodeOptions(policy="uniform:4", max_pixels=224 * 224)
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0.01"), opts, batch_size=2, replicas=2, decode_workers=1)
    refs = _refs(clips, copies=2)
    on_threads = _rows(run_plane(refs, plane))
    engine = _recording_ray_engine(plane)
    stats = PlaneStats()
    try:
        on_ray = _rows(stream(refs, plane, engine, stats))
        head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("node:__internal_head__"))
        located = ray.experimental.get_object_locations(engine.refs)
    finally:
        engine.close()
    assert sorted(on_ray) == sorted(on_threads)
    for video_id, (caption, hidden) in on_threads.items():
        assert on_ray[video_id][0] == caption
        np.testing.assert_array_equal(on_ray[video_id][1], hidden)
    held = [loc for loc in located.values() if loc["node_ids"]]
    assert held and all(head not in loc["node_ids"] for loc in held), "decoded frames were copied to the driver"


@pytest.mark.slow
def test_a_node_removed_mid_run_loses_and_duplicates_nothing(clips, cluster):
    c, nodes = cluster
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0.05"), OPTS, batch_size=2, replicas=2, decode_workers=1)
    refs = _refs(clips, copies=4)  # 24 videos, 12 batches
    stats = PlaneStats()
    rows, failures, removed = {}, [], False
    for batch, _ in run_plane(refs, plane, engine="ray", stats=stats):
        for done in batch.results:
            assert done.ref.video_id not in rows, f"{done.ref.video_id} came back twice"
            rows[done.ref.video_id] = done.features.hidden
        failures += batch.failures
        if not removed:  # after the first batch: one replica's node goes, with its batches in flight
            c.remove_node(nodes["gpu_b"])
            removed = True
    assert sorted(rows) == sorted(r.video_id for r in refs) and not failures
    assert stats.replicas_lost >= 1 and stats.resent >= 1
    assert stats.batches == 12  # each batch yielded exactly once
