"""Where model replicas go (tasks/placement.py): one replica per set of t GPUs, none shared.

THIS FILE FAKES CUDA. No GPU is lent to this project, so the GPU count is faked at the one boundary
that cannot run here: on threads, `tasks.placement.cuda_count` (torch's device count) is patched;
on Ray, the local instance declares GPUs it does not have (`ray.init(num_gpus=N)`), and Ray itself
picks each actor's GPUs and sets its CUDA_VISIBLE_DEVICES. Everything past that boundary runs for
real: the GPU sets, the child processes started with CUDA_VISIBLE_DEVICES, the actors' reservations,
and the batches through each replica. The stand-in model plays vLLM (added to PROCESS_BACKENDS: it
runs in its own child process as a vLLM replica would) and records nothing itself: each replica
reports the pid, CUDA_VISIBLE_DEVICES and device of the process it loaded in.
"""

from __future__ import annotations

import os

import pytest

from tasks import placement
from tasks.dataplane import PlaneSpec, ThreadEngine, stream
from tasks.discover import VideoRef
from tasks.extract import DecodeOptions
from tasks.lvlm import ExtractSpec
from tasks.placement import Unplaceable, gpu_sets, ray_replicas
from video_clips import encode_clip

OPTS = DecodeOptions(policy="uniform:2", max_pixels=64 * 64)
MATRIX = [(t, gpus) for t in (1, 2) for gpus in (1, 2, 8)]


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> list[VideoRef]:
    d = tmp_path_factory.mktemp("placement")
    clip = encode_clip(d / "a.mp4", "libx264", 64, 64, frames=4, fps=4, seed=0)
    return [VideoRef(video_id=f"v{i}", uri=str(clip)) for i in range(16)]


def _plane(t: int) -> PlaneSpec:
    spec = ExtractSpec(model="standin:0", device="auto", options={"tensor_parallel_size": t})
    return PlaneSpec("standin", spec, OPTS, batch_size=1, replicas=0, decode_workers=1)


def _gpus_of(where: dict, visible: list[str], takes_all: bool) -> list[str]:
    """The GPUs a replica's process uses: its CUDA_VISIBLE_DEVICES where it was pinned, else (in
    this process) all visible ones for a backend that takes all, or its cuda:N."""
    if where["cuda_visible_devices"] is not None:
        return where["cuda_visible_devices"].split(",")
    return list(visible) if takes_all else [visible[int(where["device"].split(":")[1])]]


def _assert_disjoint(sets: list[list[str]], t: int, gpus: int) -> None:
    assert len(sets) == gpus // t, sets  # replicas 0: one per t GPUs
    assert all(len(s) == t for s in sets), sets
    used = [g for s in sets for g in s]
    assert len(used) == len(set(used)), f"two replicas share a GPU: {sets}"


@pytest.mark.parametrize("t,gpus", MATRIX)
def test_threads_give_each_vllm_replica_its_own_gpus(t, gpus, refs, monkeypatch):
    monkeypatch.setattr(placement, "cuda_count", lambda: gpus)  # FAKE: this machine has no GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(placement, "PROCESS_BACKENDS", ("vllm", "standin"))  # the stand-in plays vLLM
    visible = [str(i) for i in range(gpus)]
    if t > gpus:
        with pytest.raises(Unplaceable, match=f"tensor_parallel_size={t}: a replica needs {t} GPUs"):
            ThreadEngine(_plane(t))
        print(f"\nthreads t={t} gpus={gpus}: refused")
        return
    engine = ThreadEngine(_plane(t))
    try:
        rows = [done.ref.video_id for batch, _ in stream(refs, _plane(t), engine) for done in batch.results]
        where = [engine.replicas[rid].result().placement() for rid in sorted(engine.replicas)]
    finally:
        engine.close()
    assert sorted(rows) == sorted(r.video_id for r in refs)
    sets = [_gpus_of(w, visible, takes_all=True) for w in where]
    _assert_disjoint(sets, t, gpus)
    if gpus > t:  # each in its own child process, pinned
        assert len({w["pid"] for w in where}) == len(where) and all(w["cuda_visible_devices"] for w in where)
    print(f"\nthreads t={t} gpus={gpus}: {sets}")


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_threads_put_other_backends_on_one_cuda_device_each(gpus, refs, monkeypatch):
    """A backend that honours cuda:N (transformers) stays in this process, one device per replica."""
    monkeypatch.setattr(placement, "cuda_count", lambda: gpus)  # FAKE: this machine has no GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    engine = ThreadEngine(_plane(1))
    try:
        list(stream(refs[:4], _plane(1), engine))
        where = [engine.replicas[rid].result().placement() for rid in sorted(engine.replicas)]
    finally:
        engine.close()
    assert [w["device"] for w in where] == [f"cuda:{i}" for i in range(gpus)]
    _assert_disjoint([_gpus_of(w, [str(i) for i in range(gpus)], takes_all=False) for w in where], 1, gpus)


def test_a_pinned_process_sees_only_its_set_of_the_visible_gpus(monkeypatch):
    """CUDA_VISIBLE_DEVICES=4,5,6,7 in this process: the sets are cut from those ids, not 0..3."""
    monkeypatch.setattr(placement, "cuda_count", lambda: 4)  # FAKE
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(placement, "PROCESS_BACKENDS", ("vllm", "standin"))
    placed = placement.thread_placements(_plane(2))
    assert [p.gpus for p in placed] == [("4", "5"), ("6", "7")]
    monkeypatch.setattr(placement, "PROCESS_BACKENDS", ("vllm",))
    spec = ExtractSpec(model="standin:0", device="cuda:2")  # one device asked for: that one
    assert [p.spec.device for p in placement.thread_placements(PlaneSpec("standin", spec, replicas=0))] == ["cuda:2"]


def test_combinations_that_cannot_be_placed_are_refused_in_one_line():
    cases = [
        (lambda: gpu_sets(["0"], 2, 0), "tensor_parallel_size=2: a replica needs 2 GPUs"),
        (lambda: gpu_sets(["0", "1", "2"], 1, 4), "extract.replicas=4 x vllm.tensor_parallel_size=1 needs 4 GPUs"),
        (lambda: gpu_sets(["0", "1", "2"], 2, 2), "needs 4 GPUs, and the engine sees 3 GPU.* 1 replica"),
        (lambda: gpu_sets([], 1, 0, "cuda"), "extract.device=cuda: no GPU is visible"),
        (lambda: ray_replicas([1, 1], 2, 0), "needs 2 GPUs on one node.* 2 GPU.* on 2 node"),
        (lambda: ray_replicas([4, 2], 2, 4), "extract.replicas=4 .* 3 replica"),
        (lambda: ray_replicas([0, 0], 1, 0, "cuda"), "the Ray cluster has no GPU"),
    ]
    for call, message in cases:
        with pytest.raises(Unplaceable, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    assert gpu_sets([], 2, 3) == [] and ray_replicas([0], 2, 3) == 3  # no GPU: CPU replicas, as many as asked
    assert ray_replicas([8, 2, 1], 2, 0) == 5 and ray_replicas([4], 1, 0, "cpu") == 1


def test_the_cli_refuses_an_unplaceable_run_with_exit_2_before_a_model_loads(tmp_path, monkeypatch, capsys):
    from mvrec.cli import main

    monkeypatch.setattr(placement, "cuda_count", lambda: 1)  # FAKE: one GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MVREC_VLLM__TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("MVREC_PREFECT__HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    loaded = []
    monkeypatch.setattr("tasks.dataplane.load_backend", lambda *a: loaded.append(a))
    (tmp_path / "videos").mkdir()
    with pytest.raises(SystemExit) as code:
        main(["refresh", str(tmp_path / "videos"), "--backend", "vllm", "--model", "Org/model",
              "--store", str(tmp_path / "store"), "--always"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and "\n" not in err and not loaded
    assert err.startswith("error: vllm.tensor_parallel_size=2: a replica needs 2 GPUs"), err
    assert not (tmp_path / "store").exists() and "PREFECT_API_URL" not in os.environ  # Prefect never started


def test_data_parallel_size_is_an_alias_of_replicas_and_says_so(capsys):
    from mvrec.config import load_config

    cfg = load_config(env={"MVREC_VLLM__DATA_PARALLEL_SIZE": "3"})
    assert cfg.extract.replicas == 3
    assert "vllm.data_parallel_size is deprecated" in capsys.readouterr().err
    explicit = load_config(env={"MVREC_VLLM__DATA_PARALLEL_SIZE": "3", "MVREC_EXTRACT__REPLICAS": "2"})
    assert explicit.extract.replicas == 2  # an explicit extract.replicas wins


# ---------------------------------------------------------------------------------------------
# Ray: a local instance that declares GPUs it does not have (FAKE); Ray assigns them to actors

@pytest.fixture(scope="module", params=[1, 2, 8])
def fake_gpu_ray(request):
    """One local node declaring `gpus` GPUs (FAKE: there are none) and one CPU for decoding."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, num_gpus=request.param, include_dashboard=False, log_to_driver=False)
    try:
        yield request.param
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 2])
def test_ray_replica_actors_reserve_t_gpus_each(t, fake_gpu_ray, refs):
    import ray

    from tasks.dataplane import RayEngine

    gpus = fake_gpu_ray
    if t > gpus:
        with pytest.raises(Unplaceable, match=f"tensor_parallel_size={t}: a replica needs {t} GPUs on one node"):
            RayEngine(_plane(t))
        print(f"\nray t={t} gpus={gpus}: refused")
        return
    engine = RayEngine(_plane(t))
    try:
        rows = [done.ref.video_id for batch, _ in stream(refs[:8], _plane(t), engine) for done in batch.results]
        where = ray.get([engine.actors[rid].placement.remote() for rid in sorted(engine.actors)])
    finally:
        engine.close()
    assert sorted(rows) == sorted(r.video_id for r in refs[:8])
    sets = [w["cuda_visible_devices"].split(",") for w in where]  # Ray set it in each actor
    _assert_disjoint(sets, t, gpus)
    assert len({w["pid"] for w in where}) == len(where)
    print(f"\nray t={t} gpus={gpus}: {sets}")
