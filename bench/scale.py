"""Scale-out of the extraction data plane on a local multi-node Ray cluster, before and after.

The cluster (ray.cluster_utils.Cluster, all on this machine): a head node for the driver (no CPU
for tasks), two decode nodes with 1 CPU each, and two "GPU" nodes that declare 2 GPUs each and
no CPU. Real decoding of the demo corpus plus a 720x1280 portrait subset (bench/gpu_check.py's
corpus). The model is the ACCELERATOR STAND-IN (tasks/lvlm_standin.py): it holds each batch for a
set time per video without using the CPU, as a GPU would, and returns features of the right shape.

Runs, each on a fresh set of replicas (their start-up is not counted in throughput):
- before: the previous flow's shape. Batches of commit_size videos, one decode task one batch
  ahead, the decoded frames fetched by the driver and sent to one model task at a time; R replicas
  exist, but only one works at once.
- after:  tasks/dataplane.py with R = 1, 2, 4 replicas and 2 decode workers.
- Ray Data: the same two stages as `map` decode tasks and an actor pool of R replicas (streamed),
  against the data plane, by wall time with start-up included on both sides.
- decode-bound: a stand-in 40x faster, R = 4, with 1 and then 2 decode nodes: the ceiling moves.
- commit: FeatureStore.write_batch of n videos at the 3B shape (38 rows of 2,048 float32 per video).

    python bench/scale.py [--videos 192] [--portrait 8] [--seconds-per-video 0.2]
    python bench/scale.py --commit-only    # the commit path alone, in a few seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ROOT = Path(__file__).resolve().parents[1]


def corpus(work: Path, videos: int, portrait: int) -> list[Path]:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    demo, tall = gpu_check.make_corpus(work, videos, portrait, 120, workers=2)
    return demo + tall


def before(refs, plane, replicas: int, commit_size: int) -> tuple[float, float]:
    """The previous flow's loop on the same cluster: returns (seconds serving, start-up seconds)."""
    import ray

    from tasks.dataplane import RayEngine

    engine = RayEngine(plane)
    try:
        t0 = time.perf_counter()
        ray.get([engine.start_replica(rid) for rid in range(replicas)])
        startup, t1 = time.perf_counter() - t0, time.perf_counter()
        chunks = [refs[i:i + commit_size] for i in range(0, len(refs), commit_size)]
        ahead = [engine.decode(chunks[0])]
        for i, _ in enumerate(chunks):
            if i + 1 < len(chunks):
                ahead.append(engine.decode(chunks[i + 1]))  # one batch decodes ahead
            decoded = ray.get(ahead.pop(0))  # frames come to the driver...
            ray.get(engine.actors[i % replicas].run.remote(decoded))  # ...and go out to one model task
        return time.perf_counter() - t1, startup
    finally:
        engine.close()


def after(refs, plane) -> dict:
    from tasks.dataplane import PlaneStats, run_plane

    stats = PlaneStats()
    n = sum(len(batch.results) for batch, _ in run_plane(refs, plane, engine="ray", stats=stats))
    serving = stats.wall_s - stats.startup_s
    shares = stats.busy_shares()
    return {"videos": n, "serving_s": serving, "startup_s": stats.startup_s, "rate": n / serving, "wall_s": stats.wall_s,
            "replica_busy": list(shares["replicas"].values()), "decode_busy": shares["decode"]}


def ray_data(refs, plane, replicas: int) -> dict:
    """The same two stages as a Ray Data pipeline (the Ray Data LLM / NeMo Curator pattern):
    `map` decode tasks, then an actor pool of `replicas` stand-in replicas, streamed. Wall time
    includes the pool's start-up, so it is compared with the data plane's wall time."""
    import ray

    from tasks.dataplane import ModelReplica, decode_and_prepare

    class Replica:
        def __init__(self):
            self.replica = ModelReplica(plane, 0)

        def __call__(self, row: dict) -> dict:
            out = self.replica.run(row["decoded"])
            return {"videos": len(out.results), "busy_s": out.busy_s}

    chunks = [{"chunk": refs[i:i + plane.batch_size]} for i in range(0, len(refs), plane.batch_size)]
    t0 = time.perf_counter()
    rows = list(ray.data.from_items(chunks)
                .map(lambda row: {"decoded": decode_and_prepare(row["chunk"], plane)}, num_cpus=1)
                .map(Replica, concurrency=replicas, num_gpus=1, num_cpus=0)
                .iter_rows())
    wall = time.perf_counter() - t0
    return {"videos": sum(r["videos"] for r in rows), "wall_s": wall}


def commit_times(work: Path, sizes: list[int], rows: int = 38, dim: int = 2048) -> list[tuple[int, float, int]]:
    """(videos per commit, seconds, bytes on disk per video) through FeatureStore.write_batch."""
    import numpy as np

    from storage import ExtractionBatch, FeatureStore, VideoRow

    out = []
    rng = np.random.default_rng(0)
    for n in sizes:
        store_dir = work / f"commit-store-{n}"
        shutil.rmtree(store_dir, ignore_errors=True)
        store = FeatureStore(str(store_dir))
        timed = []
        for rep in range(2):  # the first commit of a fresh store also creates its tables
            batch = ExtractionBatch()
            for v in range(n):
                key = {"video_id": f"{rep}-{v}", "content_sha256": f"{rep:02d}{v:062d}", "extractor_id": "synthetic"}
                batch.videos.append(VideoRow(video_id=key["video_id"], uri=f"synthetic://{v}",
                                             content_sha256=key["content_sha256"], bytes=1, duration_s=1.0, fps=1.0,
                                             width=1, height=1, frame_count=1, partial=False))
                batch.captions.append({**key, "caption": "SYNTHETIC"})
                batch.hidden_states += [{**key, "layer": layer, "embedding": rng.standard_normal(dim, dtype=np.float32)}
                                        for layer in range(rows)]
            t0 = time.perf_counter()
            store.write_batch(batch)
            timed.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in (store_dir / "hidden_states").rglob("*.parquet"))
        out.append((n, timed[1], size // (2 * n)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=192, help="demo corpus videos")
    ap.add_argument("--portrait", type=int, default=8, help="720x1280 portrait clips (4 s at 30 fps)")
    ap.add_argument("--seconds-per-video", type=float, default=0.2, help="the stand-in's time per video")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--commit-size", type=int, default=16, help="the before loop's batch (the old flow's unit)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the decode-bound comparison")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mvrec-bench-scale")
    ap.add_argument("--commit-only", action="store_true", help="only the commit path (no Ray cluster, no corpus)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.commit_only:
        print_commit_times(a.work)
        return

    import ray
    from ray.cluster_utils import Cluster

    from tasks.dataplane import PlaneSpec
    from tasks.discover import VideoRef
    from tasks.extract import DecodeOptions
    from tasks.lvlm import ExtractSpec

    paths = corpus(a.work, a.videos, a.portrait)
    refs = [VideoRef(video_id=p.stem if "portrait" not in str(p) else f"p{p.stem}", uri=str(p)) for p in paths]
    opts = DecodeOptions(policy="uniform:8", max_pixels=224 * 224)
    print(f"corpus: {len(refs)} videos ({a.videos} demo + {a.portrait} portrait 720x1280), uniform:8 at 224^2; "
          f"model: ACCELERATOR STAND-IN (sleeps {a.seconds_per_video * 1e3:.0f} ms per video, CPU idle; "
          f"not a model); batch {a.batch_size}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    decode_nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    for _ in range(2):
        cluster.add_node(num_cpus=0, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        print(f"cluster: head (driver) + 2 decode nodes x 1 CPU + 2 'GPU' nodes x 2 GPUs: {ray.cluster_resources()}")

        def plane(seconds: float, replicas: int) -> PlaneSpec:
            return PlaneSpec("standin", ExtractSpec(model=f"standin:{seconds}:37x2048"), opts,
                             batch_size=a.batch_size, replicas=replicas, decode_workers=2)

        after(refs[:16], plane(0.0, 4))  # warm-up: Ray's worker processes and imports, not timed
        print("\n== model-bound: before and after ==")
        print(f"{'run':<18} {'R':>2} {'videos/s':>9} {'vs R x 1':>9} {'replica busy':>22} {'decode busy':>12} "
              f"{'start-up s':>11}")
        single = None
        for replicas in (1, 2, 4):
            serving, startup = before(refs, plane(a.seconds_per_video, replicas), replicas, a.commit_size)
            print(f"{'before':<18} {replicas:>2} {len(refs) / serving:9.2f} {'':>9} {'one at a time':>22} {'':>12} "
                  f"{startup:11.1f}", flush=True)
            r = after(refs, plane(a.seconds_per_video, replicas))
            single = single or r["rate"]
            busy = " ".join(f"{b:.0%}" for b in r["replica_busy"])
            print(f"{'after':<18} {replicas:>2} {r['rate']:9.2f} {r['rate'] / (replicas * single):8.2f}x "
                  f"{busy:>22} {r['decode_busy']:11.0%} {r['startup_s']:11.1f}", flush=True)

        print("\n== the same stages on Ray Data (map + actor pool), wall time including start-up ==")
        try:
            import ray.data  # noqa: F401 - needs pandas: the bench extra, pip install -e '.[bench]'
        except ImportError as e:
            print(f"skipped: Ray Data does not import here ({e}); pip install -e '.[bench]' adds ray[data]")
        for replicas in (2, 4) if "ray.data" in sys.modules else ():
            ours = after(refs, plane(a.seconds_per_video, replicas))
            theirs = ray_data(refs, plane(a.seconds_per_video, replicas), replicas)
            print(f"R = {replicas}: data plane {ours['videos'] / ours['wall_s']:6.2f} videos/s ({ours['wall_s']:.1f} s), "
                  f"Ray Data {theirs['videos'] / theirs['wall_s']:6.2f} videos/s ({theirs['wall_s']:.1f} s); "
                  f"{theirs['videos']} videos", flush=True)

        fast = a.seconds_per_video / 40
        print(f"\n== decode-bound: stand-in {fast * 1e3:.1f} ms per video, R = 4; 1 and 2 decode nodes, "
              f"alternated over {a.rounds} rounds (best of each) ==")
        best: dict[int, dict] = {}
        for round_no in range(a.rounds):
            for nodes in (1, 2):
                if nodes == 1 and len(decode_nodes) == 2:
                    cluster.remove_node(decode_nodes.pop())
                if nodes == 2 and len(decode_nodes) == 1:
                    decode_nodes.append(cluster.add_node(num_cpus=1))
                    cluster.wait_for_nodes()
                r = after(refs, replace(plane(fast, 4), decode_workers=nodes))
                print(f"  round {round_no + 1}: {nodes} decode node(s) {r['rate']:6.2f} videos/s   replica busy "
                      f"{' '.join(f'{b:.0%}' for b in r['replica_busy'])}   decode busy {r['decode_busy']:.0%}",
                      flush=True)
                if nodes not in best or r["rate"] > best[nodes]["rate"]:
                    best[nodes] = r
        print(f"adding a decode node moved the ceiling {best[2]['rate'] / best[1]['rate']:.2f}x "
              f"({best[1]['rate']:.2f} -> {best[2]['rate']:.2f} videos/s)")
    finally:
        ray.shutdown()
        cluster.shutdown()

    print_commit_times(a.work)


def print_commit_times(work: Path) -> None:
    print("\n== commit path: FeatureStore.write_batch at the 3B shape (38 rows x 2,048 float32 per video), "
          f"the second commit into a store; load {os.getloadavg()[0]:.1f} ==")
    for n, seconds, per_video in commit_times(work, [16, 64, 256]):
        print(f"{n:4d} videos per commit: {seconds:6.2f} s = {seconds / n * 1e3:6.1f} ms/video "
              f"({n / seconds:6.1f} videos/s); {per_video / 1024:.0f} KiB on disk per video")


if __name__ == "__main__":
    main()
