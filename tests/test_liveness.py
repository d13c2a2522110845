"""Every run ends in bounded time and says why in one line (issue 30): the Ray address checked
before anything starts, a stopped data plane, model errors on one line without ANSI codes, a model
directory with no config refused by the pre-flight, and placement said aloud (fewer replicas than
asked) or failed in one line (no node can hold one). The Ray cases run on a local multi-node
cluster (ray.cluster_utils.Cluster); the signal cases run bench/torture_liveness.py's trials, as
real processes signalled by process group, the way a terminal does.

The model is the accelerator stand-in (tasks/lvlm_standin.py) where a model is needed."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mvrec.errors import ModelLoadError, NoReplica, one_line
from tasks.dataplane import PlaneSpec, PlaneStats, ThreadEngine, stream
from tasks.discover import VideoRef
from tasks.extract import DecodeOptions
from tasks.lvlm import ExtractSpec, check_model_dir
from tasks.ray_address import RayUnreachable, check_ray_address
from video_clips import encode_clip

MVREC = str(Path(sys.executable).with_name("mvrec"))
OPTS = DecodeOptions(policy="uniform:4", max_pixels=64 * 64)
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> list[VideoRef]:
    d = tmp_path_factory.mktemp("liveness")
    clips = [encode_clip(d / f"{i}.mp4", "libx264", 224, 224, frames=8, fps=8, seed=i) for i in range(4)]
    return [VideoRef(video_id=f"{c.stem}-{k}", uri=str(c)) for k in range(3) for c in clips]  # 12 videos


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the Ray address, before ray.init ------------------------------------------------------------


def test_an_address_where_nothing_listens_is_refused_at_once_naming_it():
    port = _closed_port()
    with pytest.raises(RayUnreachable, match=rf"^extract\.ray_address: no Ray cluster at 127\.0\.0\.1:{port} "
                                             r"\(connection refused\)"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(RayUnreachable, match=r"'banana' is not host:port"):
        check_ray_address("banana")
    check_ray_address("")  # empty: Ray starts a local instance, nothing to check


def test_a_port_that_accepts_and_never_answers_is_refused_within_the_bound():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)  # accepts (the kernel does), never answers
    try:
        with pytest.raises(RayUnreachable, match=r"no Ray cluster answered at 127\.0\.0\.1:\d+ within 1 s"):
            check_ray_address(f"ray://127.0.0.1:{server.getsockname()[1]}", timeout_s=1.0)
    finally:
        server.close()


def _mvrec(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MVREC_", "PREFECT_"))}
    return subprocess.run([MVREC, *args], env={**base, "MVREC_STORE__PATH": str(tmp_path / "store"),
                                               "MVREC_PREFECT__HOME": str(tmp_path / "prefect"), **env},
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_refresh_against_an_unreachable_cluster_says_so_in_one_line_before_any_work(tmp_path):
    (tmp_path / "videos").mkdir()
    port = _closed_port()
    p = _mvrec(["refresh", str(tmp_path / "videos"), "--engine", "ray"], tmp_path, MVREC_EXTRACT__MODEL="standin:0",
               MVREC_EXTRACT__BACKEND="standin", MVREC_EXTRACT__RAY_ADDRESS=f"127.0.0.1:{port}")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [f"error: extract.ray_address: no Ray cluster at 127.0.0.1:{port} "
                                             "(connection refused); start one (`ray start --head`) or fix the address"]
    assert not (tmp_path / "store").exists()  # refused before any work


# --- model errors -----------------------------------------------------------------------------------


def test_a_model_directory_is_checked_before_any_work(tmp_path):
    model = tmp_path / "model"
    with pytest.raises(FileNotFoundError, match="no model directory at"):
        check_model_dir(str(model))
    model.mkdir()
    with pytest.raises(ValueError, match=r"model has no config\.json"):
        check_model_dir(str(model))
    (model / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not readable JSON"):
        check_model_dir(str(model))
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no weight files"):
        check_model_dir(str(model))
    (model / "model.safetensors").write_bytes(b"")
    check_model_dir(str(model))
    check_model_dir("Qwen/Qwen2.5-VL-3B-Instruct")  # a hub id: the backend's business


def test_refresh_with_an_empty_model_directory_is_refused_in_one_line(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "model").mkdir()
    p = _mvrec(["refresh", str(tmp_path / "videos")], tmp_path, MVREC_EXTRACT__MODEL=str(tmp_path / "model"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: extract.model: {tmp_path / 'model'} has no config.json "
                                             "(not a saved model directory)"]


def test_a_remote_traceback_becomes_its_cause_on_one_line():
    class ActorDiedError(Exception):
        pass

    ray_text = ("The actor died because of an error raised in its creation task, \x1b[36mray::ModelReplica.__init__()"
                "\x1b[39m (pid=1, ip=10.0.0.1)\n  File \"x.py\", line 3, in __init__\n    ^^^^^\n"
                "OSError: /m does not appear to have a file named config.json.\nCheckout the hub for files.")
    assert one_line(ActorDiedError(ray_text)) == ("OSError: /m does not appear to have a file named config.json. "
                                                  "Checkout the hub for files.")
    assert one_line(ValueError("two\nlines")) == "ValueError: two lines"


def test_a_model_that_cannot_load_on_threads_fails_in_one_line(refs):
    plane = PlaneSpec("standin", ExtractSpec(model="standin:x"), OPTS, batch_size=4, replicas=1, decode_workers=1)
    engine = ThreadEngine(plane)
    try:
        with pytest.raises(ModelLoadError) as caught:
            list(stream(refs, plane, engine))
    finally:
        engine.close()
    assert str(caught.value).startswith("model standin:x did not load: ValueError: model: 'standin:x' is not a stand-in")
    assert "\n" not in str(caught.value)


# --- a stopped data plane ---------------------------------------------------------------------------


def test_a_stopped_plane_ends_within_a_poll_and_leaves_the_rest(refs):
    # 0.3 s per video: 12 videos on one replica would take 3.6 s; stopped after the first batch.
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0.3"), OPTS, batch_size=2, replicas=1, decode_workers=1)
    engine, stop, got = ThreadEngine(plane), threading.Event(), []
    try:
        for batch, _ in stream(refs, plane, engine, stop=stop):
            got.append(batch)
            stop.set()
    finally:
        engine.close()  # cancels the queued batches: only the one running is waited for
    assert len(got) == 1 and not engine.queued
    assert all(f.done() for f in engine.replicas.values())


# --- Ray: placement on a local multi-node cluster -----------------------------------------------------

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture
def cluster():
    """Head (the driver, one CPU for decoding) and two 'GPU' nodes with one declared GPU each."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    gpus = [c.add_node(num_cpus=0, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, gpus
    finally:
        ray.shutdown()
        c.shutdown()


@ray.remote(num_gpus=1, num_cpus=0)
class _OtherJob:
    def ready(self) -> bool:
        return True


@pytest.mark.slow
def test_fewer_replicas_placed_than_asked_is_said(refs, cluster):
    from tasks.dataplane import RayEngine

    other = _OtherJob.remote()  # another job holds one of the two GPUs
    ray.get(other.ready.remote())
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0.02"), OPTS, batch_size=2, replicas=2, decode_workers=1)
    engine, stats = RayEngine(plane), PlaneStats()
    try:
        videos = [done.ref.video_id for batch, _ in stream(refs, plane, engine, stats) for done in batch.results]
    finally:
        engine.close()
        ray.kill(other)
    assert sorted(videos) == sorted(r.video_id for r in refs)
    assert (stats.replicas_asked, stats.replicas_placed) == (2, 1)
    assert stats.placement_note().startswith("placed 1 of 2 model replicas: 1 never started")


@pytest.mark.slow
def test_the_only_gpu_node_removed_mid_run_fails_in_one_line_within_the_bound(refs, cluster):
    from tasks.dataplane import RayEngine

    c, (gpu_a, gpu_b) = cluster
    c.remove_node(gpu_b)  # one GPU node left
    plane = PlaneSpec("standin", ExtractSpec(model="standin:0.2"), OPTS, batch_size=2, replicas=1, decode_workers=1,
                      place_timeout_s=3.0)
    engine, got = RayEngine(plane), 0
    try:
        with pytest.raises(NoReplica, match=r"^no model replica could be placed within 3 s to run the remaining \d+ "
                                            r"batches: no live node has the GPU \(or CPU\) one needs"):
            for _batch in stream(refs, plane, engine):
                got += 1
                if got == 1:
                    c.remove_node(gpu_a)
    finally:
        engine.close()
    assert got >= 1


@pytest.mark.slow
def test_a_model_that_cannot_load_on_ray_fails_in_one_line_without_colour(refs, cluster):
    from tasks.dataplane import RayEngine

    plane = PlaneSpec("standin", ExtractSpec(model="standin:x"), OPTS, batch_size=2, replicas=1, decode_workers=1)
    engine = RayEngine(plane)
    try:
        with pytest.raises(ModelLoadError) as caught:
            list(stream(refs, plane, engine))
    finally:
        engine.close()
    message = str(caught.value)
    assert message.startswith("model standin:x did not load: ValueError: model: 'standin:x' is not a stand-in spec")
    assert "\n" not in message and not ANSI.search(message)


# --- signals to the process group, as a terminal sends them -----------------------------------------


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "torture_liveness.py"
    spec = importlib.util.spec_from_file_location("torture_liveness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["torture_liveness"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def liveness(tmp_path_factory):
    torture = _bench()
    return torture, torture.Bench(tmp_path_factory.mktemp("liveness-bench"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_refresh_signalled_as_a_group_ends_fast_failed_and_consistent(liveness, sig):
    # bench/torture_liveness.py's trial: exit 128 + signal, <= 3 lines, the run `failed`, no process
    # left, and a rerun stores every video exactly once in every table. (The bench also holds it to
    # 10 s; a test asserts no wall-clock time.)
    torture, bench = liveness
    got = torture.interrupted_run(bench, "refresh", "refresh", sig, bound_s=None)
    assert got.problems == [] and got.rc == 128 + sig, got

