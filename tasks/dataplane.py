"""The data plane: decoding and preprocessing on a pool of CPU workers, the model on R long-lived
replicas (one per accelerator, each loaded once), model batches streamed from one to the other.

    refs -> [decode + preprocess, decode_workers at a time, any node] -> [replica 1..R] -> Batch
                                                                            (rows, no frames)

One scheduler (`stream`) drives two engines through the same five calls:
- ThreadEngine: this process. Decode workers are threads (decord, PyAV and the processor release
  the GIL for most of their work); each replica is one thread that owns its model.
- RayEngine: a Ray cluster. Decode workers are one-CPU Ray tasks on any node; replicas are Ray
  actors that each declare one GPU (one CPU where the cluster has no GPU). A decoded batch goes
  from its decode worker to a replica through Ray's object store: the scheduler holds only its
  reference, so frames never enter this process. Only the rows come back.

Queues are bounded: at most `queue_per_replica` model batches wait at each replica (one running,
the next already there), and decoding runs at most decode_workers + R × queue_per_replica batches
ahead of the replicas. Memory does not grow with the corpus.

Faults: a replica that dies (its node is gone, its process crashed) is replaced and its batches
are decoded again and sent elsewhere, up to MAX_ATTEMPTS times each; Ray retries a decode task
whose node died. Batches come back in completion order, each exactly once.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Sequence

from mvrec.config import ENGINES
from tasks.discover import VideoRef, changed_since_hash
from tasks.extract import Batch, DecodeOptions, Extracted, decode_one, run_model
from tasks.lvlm import ExtractSpec, Failure, LVLMBackend, ModelInfo, VideoFeatures, VideoMeta, load_backend, \
    load_preprocessor

MAX_ATTEMPTS = 3  # times one batch is sent to a replica that then died
REPLICA_START_TIMEOUT_S = 600.0  # how long to wait for a replacement replica to be placed


@dataclass(frozen=True)
class PlaneSpec:
    """What to run and how wide; the same for both engines."""

    backend: str
    spec: ExtractSpec
    opts: DecodeOptions = DecodeOptions()
    batch_size: int = 4  # videos per model call: the unit that flows through the plane
    replicas: int = 1
    decode_workers: int = 2
    retries: int = 0  # per video, for transient decode errors
    retry_delay_s: float = 1.0
    queue_per_replica: int = 2


@dataclass
class ReplicaOut:
    """What a replica sends back for one batch: features and failures, never frames."""

    results: list[tuple[int, VideoFeatures, VideoMeta, float]]  # (index in batch, features, meta, decode s)
    failures: list[Failure]
    info: ModelInfo
    replica: int
    busy_s: float  # seconds this replica spent on the batch
    decode_s: float  # seconds the decode worker spent on it


@dataclass
class PlaneStats:
    """Where the time went, for benches and the run record."""

    wall_s: float = 0.0
    startup_s: float = 0.0  # until the first replica could take batches (model load)
    batches: int = 0
    resent: int = 0  # batches sent again after their replica died
    replicas_lost: int = 0
    decode_workers: int = 0
    decode_busy_s: float = 0.0
    replica_busy_s: dict[int, float] = field(default_factory=dict)

    def busy_shares(self) -> dict[str, Any]:
        """Replicas: busy seconds over the time they served (from the first one ready to the end).
        Decode workers: over the whole run (they start at once, while the replicas load)."""
        serving = max(self.wall_s - self.startup_s, 1e-9)
        return {"replicas": {r: busy / serving for r, busy in sorted(self.replica_busy_s.items())},
                "decode": self.decode_busy_s / (max(self.wall_s, 1e-9) * max(1, self.decode_workers))}


# ---------------------------------------------------------------------------------------------
# the two stages (run inside decode workers and replicas, on whatever node)

_PREPROCESSORS: dict[str, Any] = {}  # one per worker process and model
# Loads in one process take turns: transformers' lazy imports are not thread-safe (two threads
# importing at once can see "cannot import name 'AutoProcessor'"), and one load of each is enough.
_LOAD_LOCK = threading.Lock()


def _preprocessor_key(plane: PlaneSpec) -> str:
    return json.dumps([plane.backend, asdict(plane.spec) if plane.spec else None], sort_keys=True, default=str)


def decode_and_prepare(chunk: Sequence[VideoRef], plane: PlaneSpec) -> list[tuple[Any, float]]:
    """Decode each video, then run the model's processor on it: (prepared video or Failure, seconds)."""
    key = _preprocessor_key(plane)
    with _LOAD_LOCK:
        if key not in _PREPROCESSORS:
            _PREPROCESSORS[key] = load_preprocessor(plane.backend, plane.spec)
    preprocessor = _PREPROCESSORS[key]
    out = []
    for ref in chunk:
        t0 = time.perf_counter()
        video, _ = decode_one(ref, plane.opts, plane.retries, plane.retry_delay_s)
        if not isinstance(video, Failure) and (changed := changed_since_hash(ref)):
            # the frames may be another content than the hash the rows would be stored under
            kind, _, why = changed.partition(": ")
            video = Failure(ref.video_id, ref.uri, "read", kind, why, permanent=False)
        if preprocessor is not None and not isinstance(video, Failure):
            try:
                video = preprocessor.preprocess(video)
            except Exception as e:  # noqa: BLE001 - the model's input step refused this video alone
                video = Failure.of(ref.video_id, ref.uri, "model", e)
        out.append((video, time.perf_counter() - t0))
    return out


class ModelReplica:
    """One loaded model. `run` takes a decoded batch and returns its rows (ReplicaOut)."""

    def __init__(self, plane: PlaneSpec, replica: int, backend: LVLMBackend | None = None):
        with _LOAD_LOCK:
            self.backend = backend or load_backend(plane.backend, plane.spec)
        self.extract = getattr(self.backend, "extract_prepared", None) or self.backend.extract
        self.batch_size, self.replica = plane.batch_size, replica

    def ready(self) -> ModelInfo:
        return self.backend.info

    def run(self, decoded: list[tuple[Any, float]]) -> ReplicaOut:
        t0 = time.perf_counter()
        ok = [(i, video) for i, (video, _) in enumerate(decoded) if not isinstance(video, Failure)]
        features, failures = run_model(self.extract, [video for _, video in ok], self.batch_size) if ok else ([], [])
        results = [(i, feats, video.meta, decoded[i][1])
                   for (i, video), feats in zip(ok, features, strict=True) if feats is not None]
        return ReplicaOut(results, [v for v, _ in decoded if isinstance(v, Failure)] + failures, self.backend.info,
                          self.replica, time.perf_counter() - t0, sum(s for _, s in decoded))

    def close(self) -> None:
        self.backend.close()


# ---------------------------------------------------------------------------------------------
# engines: the same calls on threads and on Ray


class ThreadEngine:
    """Everything in this process. `backends` reuses models the caller already loaded."""

    def __init__(self, plane: PlaneSpec, backends: Sequence[LVLMBackend] = ()):
        self.plane, self.backends = plane, list(backends)
        if self.backends:  # the loaded model's own processor: decode workers need not load another
            _PREPROCESSORS[_preprocessor_key(plane)] = getattr(self.backends[0], "preprocessor", None)
        self.decoders = ThreadPoolExecutor(plane.decode_workers, thread_name_prefix="decode")
        self.threads: dict[int, ThreadPoolExecutor] = {}
        self.replicas: dict[int, Future] = {}

    def start_replica(self, rid: int) -> Future:
        """Load replica `rid` in its own thread; the future is ready when it can take batches."""
        self.threads[rid] = ThreadPoolExecutor(1, thread_name_prefix=f"replica-{rid}")
        backend = self.backends[rid] if rid < len(self.backends) else None
        spec = self.plane.spec
        if backend is None and spec.device in ("auto", "cuda") and _cuda_count() > 1:
            spec = replace(spec, device=f"cuda:{rid % _cuda_count()}")  # one GPU per replica
        self.replicas[rid] = self.threads[rid].submit(ModelReplica, replace(self.plane, spec=spec), rid, backend)
        return self.replicas[rid]

    def decode(self, chunk: list[VideoRef]) -> Future:
        return self.decoders.submit(decode_and_prepare, chunk, self.plane)

    def model(self, rid: int, decoded: Future) -> Future:
        return self.threads[rid].submit(lambda: self.replicas[rid].result().run(decoded.result()))

    def wait(self, handles: list, timeout: float | None) -> list:
        return list(wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def get(self, handle: Future) -> Any:
        return handle.result()

    def is_lost(self, error: BaseException) -> bool:
        return False  # a thread does not die alone: an error here is a bug, raised

    def replica_died(self, error: BaseException) -> bool:
        return False

    def stop_replica(self, rid: int) -> None:
        pass

    def close(self) -> None:
        self.decoders.shutdown(wait=True, cancel_futures=True)
        for rid, thread in self.threads.items():
            loaded = self.replicas[rid]
            if rid >= len(self.backends) and loaded.done() and loaded.exception() is None:
                thread.submit(loaded.result().close).result()
            thread.shutdown(wait=True)

    def replica_count(self) -> int:
        return max(1, _cuda_count())


_RAY_STARTED_HERE = [False]  # this process called ray.init: ray.shutdown after the run


def connect_ray(address: str = ""):
    """The ray module, connected: to `address`, else to the cluster this process already joined,
    else to a local instance it starts. RayEngine.close undoes what this did."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=False)
        _RAY_STARTED_HERE[0] = True  # a local instance is stopped, a joined cluster only disconnected
    return ray


def runs_on_gpu(device: str, engine: str, ray_address: str = "") -> bool:
    """Whether the replicas will run on CUDA: a cuda device, or `auto` where the engine sees a GPU
    (this machine for threads, the cluster for Ray)."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    if engine == "ray":
        return connect_ray(ray_address).cluster_resources().get("GPU", 0) >= 1
    return _cuda_count() > 0


class RayEngine:
    """Decode tasks and replica actors on a Ray cluster (`address`; empty: join the one this
    process is connected to, or start a local one)."""

    def __init__(self, plane: PlaneSpec, address: str = ""):
        self.ray, self.plane = connect_ray(address), plane
        ray = self.ray
        has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        # A GPU replica takes no CPU slot: those are the decode workers'.
        self.replica_resources = {"num_gpus": 1, "num_cpus": 0} if has_gpu else {"num_cpus": 1}
        # A decode task whose node dies is run again elsewhere (Ray's task retries).
        self._decode = ray.remote(num_cpus=1, max_retries=MAX_ATTEMPTS)(decode_and_prepare)
        self._replica = ray.remote(max_restarts=0, max_task_retries=0, **self.replica_resources)(ModelReplica)
        self.plane_ref = ray.put(plane)
        self.actors: dict[int, Any] = {}

    def start_replica(self, rid: int):
        self.actors[rid] = self._replica.remote(self.plane_ref, rid)
        return self.actors[rid].ready.remote()

    def decode(self, chunk: list[VideoRef]):
        return self._decode.remote(chunk, self.plane_ref)

    def model(self, rid: int, decoded):
        return self.actors[rid].run.remote(decoded)  # the replica fetches the frames, not this process

    def wait(self, handles: list, timeout: float | None) -> list:
        done, rest = self.ray.wait(handles, num_returns=1, timeout=timeout, fetch_local=False)
        if done and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
            done += more
        return done

    def get(self, handle) -> Any:
        return self.ray.get(handle)

    def is_lost(self, error: BaseException) -> bool:
        """A node, actor or object gone: send the batch again. An error inside our own code is not."""
        if getattr(error, "actor_init_failed", False):  # the model did not load: no retry will fix that
            return False
        return isinstance(error, self.ray.exceptions.RayError) and not isinstance(error, self.ray.exceptions.RayTaskError)

    def replica_died(self, error: BaseException) -> bool:
        """The actor itself is gone (not only a batch's frames): start another in its place."""
        return isinstance(error, self.ray.exceptions.RayActorError)

    def stop_replica(self, rid: int) -> None:
        try:
            self.ray.kill(self.actors.pop(rid))  # frees its GPU if the actor is still half alive
        except (KeyError, ValueError, self.ray.exceptions.RayError):
            pass

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        if _RAY_STARTED_HERE[0]:
            self.ray.shutdown()
            _RAY_STARTED_HERE[0] = False

    def replica_count(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("GPU", 0)))


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


# ---------------------------------------------------------------------------------------------
# the scheduler


@dataclass
class _Replica:
    ready: bool = False
    inflight: int = 0


def stream(refs: Sequence[VideoRef], plane: PlaneSpec, engine: Any, stats: PlaneStats | None = None
           ) -> Iterator[tuple[Batch, ModelInfo]]:
    """Run every ref through decode -> replica; yield (Batch, the replica's ModelInfo) per model batch,
    in completion order. `plane.replicas` 0 asks the engine (one per GPU it sees)."""
    stats = stats if stats is not None else PlaneStats()
    stats.decode_workers, started = plane.decode_workers, time.perf_counter()
    refs = list(refs)
    todo = deque(refs[i:i + plane.batch_size] for i in range(0, len(refs), plane.batch_size))
    replicas = {rid: _Replica() for rid in range(plane.replicas or engine.replica_count())}
    starting = {engine.start_replica(rid): rid for rid in replicas}

    def replace_lost(rid: int) -> None:
        """A new replica with a new id, so late errors of the dead one stay its own."""
        stats.replicas_lost += 1
        del replicas[rid]
        engine.stop_replica(rid)
        new = max([*replicas, *starting.values(), rid]) + 1
        replicas[new] = _Replica()
        starting[engine.start_replica(new)] = new

    decoding: dict[Any, list[VideoRef]] = {}
    decoded: deque[tuple[list[VideoRef], Any]] = deque()
    running: dict[Any, tuple[list[VideoRef], int]] = {}
    attempts: dict[str, int] = {}
    ahead = plane.decode_workers + len(replicas) * plane.queue_per_replica
    waiting_for_replica_since: float | None = None
    while todo or decoding or decoded or running:
        while todo and len(decoding) + len(decoded) < ahead:
            chunk = todo.popleft()
            decoding[engine.decode(chunk)] = chunk
        while decoded:
            free = [rid for rid, r in replicas.items() if r.ready and r.inflight < plane.queue_per_replica]
            if not free:
                break
            rid = min(free, key=lambda r: replicas[r].inflight)
            chunk, handle = decoded.popleft()
            running[engine.model(rid, handle)] = (chunk, rid)
            replicas[rid].inflight += 1
        if not (decoding or running) and not any(r.ready for r in replicas.values()):
            waiting_for_replica_since = waiting_for_replica_since or time.perf_counter()
            if not starting or time.perf_counter() - waiting_for_replica_since > REPLICA_START_TIMEOUT_S:
                raise RuntimeError("no model replica is left to run the remaining batches "
                                   f"({len(decoded) + len(todo)} batches); the cluster has no free accelerator")
        else:
            waiting_for_replica_since = None
        for handle in engine.wait([*starting, *decoding, *running], timeout=10.0):
            if handle in starting:
                rid = starting.pop(handle)
                try:
                    engine.get(handle)  # a model that cannot load raises here, naming why
                    replicas[rid].ready = True
                    stats.startup_s = stats.startup_s or time.perf_counter() - started
                except Exception as e:
                    if not engine.is_lost(e):
                        raise
                    replace_lost(rid)  # its node went while it loaded
            elif handle in decoding:
                decoded.append((decoding.pop(handle), handle))
            else:
                chunk, rid = running.pop(handle)
                if rid in replicas:
                    replicas[rid].inflight -= 1
                try:
                    out: ReplicaOut = engine.get(handle)
                except Exception as e:
                    if not engine.is_lost(e):
                        raise
                    key = chunk[0].video_id
                    attempts[key] = attempts.get(key, 0) + 1
                    if attempts[key] >= MAX_ATTEMPTS:
                        raise RuntimeError(f"batch starting at {key!r} was lost {MAX_ATTEMPTS} times: {e}") from e
                    todo.appendleft(chunk)  # decoded again: its frames may have gone with the node
                    stats.resent += 1
                    if rid in replicas and engine.replica_died(e):  # replace it once: its other batches fail too
                        replace_lost(rid)
                    continue
                stats.batches += 1
                stats.decode_busy_s += out.decode_s
                stats.replica_busy_s[out.replica] = stats.replica_busy_s.get(out.replica, 0.0) + out.busy_s
                stats.wall_s = time.perf_counter() - started
                yield Batch([Extracted(chunk[i], feats, meta, s) for i, feats, meta, s in out.results],
                            out.failures), out.info
    stats.wall_s = time.perf_counter() - started


def make_engine(name: str, plane: PlaneSpec, ray_address: str = "", backends: Sequence[LVLMBackend] = ()):
    """threads | ray: the engine that runs `plane`."""
    if name == "threads":
        return ThreadEngine(plane, backends)
    if name == "ray":
        return RayEngine(plane, ray_address)
    raise ValueError(f"extract.engine: {name!r} is not one of {', '.join(ENGINES)}")


def run_plane(refs: Sequence[VideoRef], plane: PlaneSpec, engine: str = "threads", ray_address: str = "",
              backends: Sequence[LVLMBackend] = (), stats: PlaneStats | None = None
              ) -> Iterator[tuple[Batch, ModelInfo]]:
    """stream() on a fresh engine, closed (replicas freed) when the iteration ends or is abandoned."""
    runner = make_engine(engine, plane, ray_address, backends)
    try:
        yield from stream(refs, plane, runner, stats)
    finally:
        runner.close()


def in_background(results: Iterator[tuple[Batch, ModelInfo]], min_videos: int
                  ) -> Iterator[list[tuple[Batch, ModelInfo]]]:
    """Run the data plane in a background thread and hand the caller every result that has arrived
    once at least `min_videos` videos wait (or the plane is done). While the caller commits one
    group the plane keeps every replica fed, and a slow commit only makes the next group bigger."""
    arrived: queue.Queue = queue.Queue()
    stop, finished = threading.Event(), object()

    def pump() -> None:
        try:
            for item in results:
                arrived.put(item)
                if stop.is_set():
                    break
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            arrived.put(_Raised(error))
        finally:
            results.close()  # frees the replicas (run_plane's engine) in this thread
            arrived.put(finished)

    thread = threading.Thread(target=pump, name="data-plane", daemon=True)
    thread.start()
    try:
        waiting, done = [], False
        while not done:
            items = [arrived.get()]
            while not arrived.empty():
                items.append(arrived.get_nowait())
            for item in items:
                if item is finished:
                    done = True
                elif isinstance(item, _Raised):
                    raise item.error
                else:
                    waiting.append(item)
            if waiting and (done or sum(len(b.results) + len(b.failures) for b, _ in waiting) >= min_videos):
                yield waiting
                waiting = []
    finally:
        stop.set()
        thread.join()


@dataclass
class _Raised:
    error: BaseException
