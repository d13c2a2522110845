"""The data plane: decoding and preprocessing on a pool of CPU workers, the model on R long-lived
replicas (one per accelerator, each loaded once), model batches streamed from one to the other.

    refs -> [decode + preprocess, decode_workers at a time, any node] -> [replica 1..R] -> Batch
                                                                            (rows, no frames)

One scheduler (`stream`) drives two engines through the same five calls:
- ThreadEngine: this process. Decode workers are threads (decord, PyAV and the processor release
  the GIL for most of their work); each replica is one thread that owns its model, on its own set
  of t GPUs (a vLLM replica in a child process pinned to its set; tasks/placement.py).
- RayEngine: a Ray cluster. Decode workers are one-CPU Ray tasks on any node; replicas are Ray
  actors that each reserve t GPUs (one CPU where the cluster has no GPU). A decoded batch goes
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
import signal
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from mvrec.config import ENGINES
from mvrec.errors import ModelLoadError, NoReplica, one_line
from tasks.discover import VideoRef, changed_since_hash
from tasks.extract import Batch, DecodeOptions, Extracted, decode_one, run_model
from tasks.lvlm import ExtractSpec, Failure, LVLMBackend, ModelInfo, VideoFeatures, VideoMeta, load_backend, \
    load_preprocessor
from tasks.placement import cuda_count, gpus_per_replica, ray_node_gpus, ray_replicas, thread_placements
from tasks.replica_process import ProcessBackend, placement_here

MAX_ATTEMPTS = 3  # times one batch is sent to a replica that then died
REPLICA_START_TIMEOUT_S = 600.0  # how long to wait for a replica to be placed and loaded
STOP_POLL_S = 0.5  # how often a run that can be stopped looks at its stop event


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
    # With no replica ready and no node that could ever hold one (the only GPU node gone), how
    # long to wait for such a node before failing (REPLICA_START_TIMEOUT_S while one could).
    place_timeout_s: float = 120.0
    # This replica's GPU set when it runs in its own child process (tasks/placement.py): the
    # process starts with CUDA_VISIBLE_DEVICES set to these ids. Empty: it loads in this process.
    gpus: tuple[str, ...] = ()


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
    replicas_asked: int = 0
    replicas_placed: int = 0  # the most that were ready at once
    decode_workers: int = 0
    decode_busy_s: float = 0.0
    replica_busy_s: dict[int, float] = field(default_factory=dict)

    def busy_shares(self) -> dict[str, Any]:
        """Replicas: busy seconds over the time they served (from the first one ready to the end).
        Decode workers: over the whole run (they start at once, while the replicas load)."""
        serving = max(self.wall_s - self.startup_s, 1e-9)
        return {"replicas": {r: busy / serving for r, busy in sorted(self.replica_busy_s.items())},
                "decode": self.decode_busy_s / (max(self.wall_s, 1e-9) * max(1, self.decode_workers))}

    def placement_note(self) -> str:
        """One line when fewer replicas ran at once than were asked for (a cluster whose GPUs are
        taken, a node lost and not replaced), else ''."""
        missing = self.replicas_asked - self.replicas_placed
        if missing <= 0:
            return ""
        return (f"placed {self.replicas_placed} of {self.replicas_asked} model replicas: {missing} never started, "
                "no node had the free GPU (or CPU) one needs; the run went on with fewer")


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
        if backend is None and plane.gpus:  # loads in its own process: no lock to hold meanwhile
            backend = ProcessBackend(plane.backend, plane.spec, {"CUDA_VISIBLE_DEVICES": ",".join(plane.gpus)})
        with _LOAD_LOCK:
            self.backend = backend or load_backend(plane.backend, plane.spec)
        self.device = plane.spec.device if plane.spec else ""
        self.extract = getattr(self.backend, "extract_prepared", None) or self.backend.extract
        self.batch_size, self.replica = plane.batch_size, replica

    def ready(self) -> ModelInfo:
        return self.backend.info

    def placement(self) -> dict[str, Any]:
        """Where the model runs: pid, CUDA_VISIBLE_DEVICES and device of its process."""
        return getattr(self.backend, "placement", None) or placement_here(self.device)

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
        self.queued: set[Future] = set()  # model batches not yet finished: cancelled by close()
        # One plane per GPU set (Unplaceable before any model loads); none on CPU or for given models.
        self.placed = [] if self.backends or plane.spec is None else thread_placements(plane)

    def start_replica(self, rid: int) -> Future:
        """Load replica `rid` in its own thread; the future is ready when it can take batches."""
        self.threads[rid] = ThreadPoolExecutor(1, thread_name_prefix=f"replica-{rid}")
        backend = self.backends[rid] if rid < len(self.backends) else None
        plane = self.placed[rid] if backend is None and rid < len(self.placed) else self.plane
        self.replicas[rid] = self.threads[rid].submit(ModelReplica, plane, rid, backend)
        return self.replicas[rid]

    def decode(self, chunk: list[VideoRef]) -> Future:
        return self.decoders.submit(decode_and_prepare, chunk, self.plane)

    def model(self, rid: int, decoded: Future) -> Future:
        done = self.threads[rid].submit(lambda: self.replicas[rid].result().run(decoded.result()))
        self.queued.add(done)
        done.add_done_callback(self.queued.discard)
        return done

    def wait(self, handles: list, timeout: float | None) -> list:
        return list(wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def get(self, handle: Future) -> Any:
        return handle.result()

    def is_lost(self, error: BaseException) -> bool:
        return False  # a thread does not die alone: an error here is a bug, raised

    def replica_died(self, error: BaseException) -> bool:
        return False

    def can_place(self) -> bool:
        return True  # this process holds its replicas

    def stop_replica(self, rid: int) -> None:
        pass

    def close(self) -> None:
        # A run stopped early (Ctrl-C) waits only for the batches already running, not the queued.
        for queued in list(self.queued):
            queued.cancel()
        self.decoders.shutdown(wait=True, cancel_futures=True)
        for rid, thread in self.threads.items():
            loaded = self.replicas[rid]
            if rid >= len(self.backends) and loaded.done() and loaded.exception() is None:
                thread.submit(loaded.result().close).result()
            thread.shutdown(wait=True)

    def replica_count(self) -> int:
        return max(1, len(self.placed))


_RAY_STARTED_HERE = [False]  # this process called ray.init: ray.shutdown after the run


def connect_ray(address: str = ""):
    """The ray module, connected: to `address`, else to the cluster this process already joined,
    else to a local instance it starts. RayEngine.close undoes what this did."""
    import ray

    if not ray.is_initialized():
        from tasks.ray_address import check_ray_address

        check_ray_address(address)  # ray.init alone waits for ever where nothing answers
        # ray.init makes SIGTERM a bare sys.exit(15); keep the handler this process chose (the CLI's).
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=False)
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
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
    return cuda_count() > 0


class RayEngine:
    """Decode tasks and replica actors on a Ray cluster (`address`; empty: join the one this
    process is connected to, or start a local one)."""

    def __init__(self, plane: PlaneSpec, address: str = ""):
        self.ray, self.plane = connect_ray(address), plane
        ray = self.ray
        spec, self.actors = plane.spec or ExtractSpec(model=""), {}
        node_gpus, t = ray_node_gpus(ray), gpus_per_replica(spec.options)
        try:  # how many fit, t GPUs each on one node: Unplaceable before any actor starts
            self.replicas_placed = ray_replicas(node_gpus, t, plane.replicas, spec.device)
        except ValueError:
            self.close()
            raise
        # A GPU replica takes no CPU slot: those are the decode workers'.
        on_gpu = spec.device != "cpu" and any(node_gpus)
        self.replica_resources = {"num_gpus": t, "num_cpus": 0} if on_gpu else {"num_cpus": 1}
        # A decode task whose node dies is run again elsewhere (Ray's task retries).
        self._decode = ray.remote(num_cpus=1, max_retries=MAX_ATTEMPTS)(decode_and_prepare)
        self._replica = ray.remote(max_restarts=0, max_task_retries=0, **self.replica_resources)(ModelReplica)
        self.plane_ref = ray.put(plane)

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

    def can_place(self) -> bool:
        """Whether a live node has the resources one replica asks for (maybe taken by now)."""
        need = {"GPU": self.replica_resources.get("num_gpus", 0), "CPU": self.replica_resources.get("num_cpus", 0)}
        return any(all(node["Resources"].get(k, 0) >= v for k, v in need.items())
                   for node in self.ray.nodes() if node.get("Alive"))

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
        return self.replicas_placed


# ---------------------------------------------------------------------------------------------
# the scheduler


@dataclass
class _Replica:
    ready: bool = False
    inflight: int = 0


def stream(refs: Sequence[VideoRef], plane: PlaneSpec, engine: Any, stats: PlaneStats | None = None,
           stop: threading.Event | None = None) -> Iterator[tuple[Batch, ModelInfo]]:
    """Run every ref through decode -> replica; yield (Batch, the replica's ModelInfo) per model batch,
    in completion order. `plane.replicas` 0 asks the engine (one per GPU it sees). `stop` set (from
    any thread) ends the iteration within STOP_POLL_S, leaving the rest undone."""
    stats = stats if stats is not None else PlaneStats()
    stats.decode_workers, started = plane.decode_workers, time.perf_counter()
    refs = list(refs)
    todo = deque(refs[i:i + plane.batch_size] for i in range(0, len(refs), plane.batch_size))
    replicas = {rid: _Replica() for rid in range(plane.replicas or engine.replica_count())}
    starting = {engine.start_replica(rid): rid for rid in replicas}
    stats.replicas_asked = len(replicas)

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
        if stop is not None and stop.is_set():
            return
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
            placeable = engine.can_place()  # else no live node could hold one: the short bound
            limit = REPLICA_START_TIMEOUT_S if placeable else plane.place_timeout_s
            if not starting or time.perf_counter() - waiting_for_replica_since > limit:
                why = "none was ready" if placeable else "no live node has the GPU (or CPU) one needs"
                raise NoReplica(f"no model replica could be placed within {limit:.0f} s to run the remaining "
                                f"{len(decoded) + len(todo)} batches: {why}; what was committed is kept")
        else:
            waiting_for_replica_since = None
        poll = STOP_POLL_S if stop is not None or waiting_for_replica_since else 10.0
        for handle in engine.wait([*starting, *decoding, *running], timeout=poll):
            if handle in starting:
                rid = starting.pop(handle)
                try:
                    engine.get(handle)  # a model that cannot load raises here, naming why
                    replicas[rid].ready = True
                    stats.startup_s = stats.startup_s or time.perf_counter() - started
                    stats.replicas_placed = max(stats.replicas_placed, sum(r.ready for r in replicas.values()))
                except Exception as e:
                    if not engine.is_lost(e):
                        raise ModelLoadError(f"model {plane.spec.model if plane.spec else '?'} did not load: "
                                             f"{one_line(e)}") from None
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
              backends: Sequence[LVLMBackend] = (), stats: PlaneStats | None = None,
              stop: threading.Event | None = None) -> Iterator[tuple[Batch, ModelInfo]]:
    """stream() on a fresh engine, closed (replicas freed) when the iteration ends, is abandoned or
    `stop` is set."""
    runner = make_engine(engine, plane, ray_address, backends)
    try:
        yield from stream(refs, plane, runner, stats, stop)
    finally:
        runner.close()


def _videos(group: list[tuple[Batch, ModelInfo]]) -> int:
    return sum(len(b.results) + len(b.failures) for b, _ in group)


def bounded_groups(waiting: list[tuple[Batch, ModelInfo]], max_videos: int) -> list[list[tuple[Batch, ModelInfo]]]:
    """`waiting` cut, in order, into groups of at most max_videos videos (a larger batch alone)."""
    groups: list[list[tuple[Batch, ModelInfo]]] = [[]]
    for item in waiting:
        if groups[-1] and _videos(groups[-1]) + _videos([item]) > max_videos:
            groups.append([])
        groups[-1].append(item)
    return [g for g in groups if g]


def in_background(results: Iterator[tuple[Batch, ModelInfo]], min_videos: int, stop: threading.Event | None = None,
                  max_videos: int | None = None) -> Iterator[list[tuple[Batch, ModelInfo]]]:
    """Run the data plane in a background thread and hand the caller every result that has arrived
    once at least `min_videos` videos wait (or the plane is done). While the caller commits one
    group the plane keeps every replica fed, and a slow commit only makes the next group bigger,
    up to `max_videos` (more waiting is handed over as several groups: bounded commits).
    `stop`: run_plane's, so that a caller that leaves early (Ctrl-C) ends the plane within seconds."""
    arrived: queue.Queue = queue.Queue()
    stop, finished = stop or threading.Event(), object()  # the plane's own stop: the caller left (Ctrl-C)

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
            if waiting and (done or _videos(waiting) >= min_videos):
                yield from bounded_groups(waiting, max(max_videos or 0, min_videos))
                waiting = []
    finally:
        stop.set()
        thread.join()


@dataclass
class _Raised:
    error: BaseException
