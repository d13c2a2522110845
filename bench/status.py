"""`mvrec status` on a 5,000-video store: the goal is an answer in under 2 s.

    python bench/status.py                 # builds bench/out/status-store once (about a minute), then times
    python bench/status.py --videos 1000

The store has the shape of the demo store after a month of nightly refreshes: the test model's
128-dim hidden states for 6 layers (0..4 and final), one extractor, commits of 64 videos, 30 runs,
3 tags, open failures and partial videos, and one real file per video (a few changed on disk since
extraction). It is written through the FeatureStore API with synthetic vectors, not by running the
test LVLM over 5,000 decoded videos (that alone takes over 15 minutes on this 2-core machine);
status reads only metadata and key columns, so the vectors' values do not matter.

Timed side by side, median of --repeat runs, same store and same warm file cache:
- status:   storage.status.store_status (what `mvrec status --json` computes);
- baseline: the same facts the plain way: DuckDB over the store (storage.connect) with the SQL a
            user would write (last runs, failures by reason, completed videos per extractor, tags,
            partial count), the same stat-and-hash walk over the files, and the same Delta log
            reads for the size;
- cli:      `mvrec status --json` as a subprocess, wall time including Python start and imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage import ExtractionBatch, ExtractorRecord, FailureRow, FeatureStore, HiddenStateRow, VideoRow  # noqa: E402
from storage.status import changed_files, store_size, store_status  # noqa: E402
from tasks.discover import VideoRef, hash_video  # noqa: E402

D, LAYERS, COMMIT, RUNS = 128, [0, 1, 2, 3, 4, -1], 64, 30


def build(root: Path, n: int) -> None:
    videos = root / "videos"
    videos.mkdir(parents=True)
    store = FeatureStore(root / "store")
    eid = store.upsert_extractor(ExtractorRecord("test-qwen2_5_vl (TEST MODEL)", "r0", "Describe.", "uniform:8",
                                                 "video", "bench", dim=D, num_layers=4))
    rng = np.random.default_rng(0)
    t0 = datetime.now(timezone.utc) - timedelta(days=RUNS)
    per_run = -(-n // RUNS)
    for night in range(RUNS):
        ids = range(night * per_run, min(n, (night + 1) * per_run))
        run = store.start_run("extract-features", extractor_id=eid)
        for start in range(ids.start, ids.stop, COMMIT):
            chunk = range(start, min(ids.stop, start + COMMIT))
            refs = []
            for i in chunk:
                path = videos / f"{i}.mp4"
                path.write_bytes(rng.bytes(int(rng.integers(20_000, 60_000))))  # demo clips are 20-60 KB
                refs.append(hash_video(VideoRef(str(i), str(path))))
            store.write_batch(ExtractionBatch(
                videos=[VideoRow(r.video_id, r.uri, r.content_sha256, r.bytes, 5.0, 12.0, 224, 168,
                                 first_seen=t0, last_seen=datetime.now(timezone.utc),
                                 frame_count=60, partial=int(r.video_id) % 500 == 7) for r in refs],
                hidden_states=[HiddenStateRow(r.video_id, r.content_sha256, eid, k,
                                              rng.standard_normal(D).astype(np.float32))
                               for r in refs for k in LAYERS]))
        store.record_failures([FailureRow(f"broken-{night}-{j}", "decode", "Unreadable", "not a readable media file",
                                          uri=str(videos / f"broken-{night}-{j}.mp4")) for j in range(2)])
        store.finish_run(run, counts={"discovered": len(ids), "extracted": len(ids), "failed": 2})
        if night % 10 == 9:
            store.tag(f"nightly-{night + 1}")
    for i in range(0, n, 997):  # a few files changed on disk since extraction
        with open(videos / f"{i}.mp4", "ab") as fh:
            fh.write(b"changed")


def baseline(store: FeatureStore, runs: int) -> dict:
    """The same facts with DuckDB SQL over the store (what a user can do with `mvrec query`)."""
    from storage import connect

    out: dict = {}
    with connect(store) as con:
        out["runs"] = con.sql("SELECT run_id, flow, status, counts, finished - started FROM runs "
                              f"ORDER BY started DESC LIMIT {runs}").fetchall()
        out["failures"] = con.sql("SELECT stage, error_type, count(*), list(video_id)[1:3] FROM failures "
                                  "GROUP BY ALL ORDER BY 3 DESC").fetchall()
        out["done"] = con.sql("WITH l AS (SELECT extractor_id, count(DISTINCT layer) n FROM hidden_states GROUP BY 1), "
                              "v AS (SELECT extractor_id, video_id, content_sha256, count(DISTINCT layer) n "
                              "FROM hidden_states GROUP BY ALL) SELECT v.extractor_id, count(*) FROM v JOIN l "
                              "USING (extractor_id) WHERE v.n = l.n GROUP BY 1").fetchall()
        out["tags"] = con.sql("SELECT name, versions FROM snapshots ORDER BY created DESC").fetchall()
        out["partial"] = con.sql("SELECT count(*) FROM videos WHERE partial").fetchall()
        latest = con.arrow("SELECT video_id, uri, content_sha256, bytes, last_seen FROM videos "
                           "QUALIFY row_number() OVER (PARTITION BY video_id ORDER BY last_seen DESC) = 1")
    out["changed"] = changed_files(latest, lambda p: hash_video(VideoRef("", p)).content_sha256)
    out["size"] = store_size(store)
    return out


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of `repeat` calls (CPU time shows the work when the machine is
    shared: wall time also counts waiting for a core)."""
    wall, cpu, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=5000)
    ap.add_argument("--dir", default=str(ROOT / "bench" / "out" / "status-store"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    root = Path(args.dir) / str(args.videos)
    if not (root / "store" / "hidden_states").exists():
        t = time.perf_counter()
        build(root, args.videos)
        print(f"built a {args.videos}-video store in {time.perf_counter() - t:.0f} s at {root}")
    store = FeatureStore(root / "store", create=False)
    hash_file = lambda p: hash_video(VideoRef("", p)).content_sha256  # noqa: E731

    print(f"mvrec status bench: {args.videos} videos, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    t_status, c_status, s = timed(lambda: store_status(store, runs=10, hash_file=hash_file), args.repeat)
    t_base, c_base, b = timed(lambda: baseline(store, 10), args.repeat)
    assert s["extractors"][0]["videos_done"] == b["done"][0][1] == args.videos  # same answer both ways
    assert s["changed_files"]["count"] == len(b["changed"]) and s["partial_videos"] == b["partial"][0][0]
    env = {**os.environ, "MVREC_STORE__PATH": str(root / "store")}
    wall, cpu = [], []
    for _ in range(args.repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", "from mvrec.cli import main; main()", "status", "--json"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=120)
        wall.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode:
            raise SystemExit(done.stderr)
    assert json.loads(done.stdout)["extractors"][0]["videos_done"] == args.videos
    print(f"  {'':28s} {'wall s':>7s} {'CPU s':>7s}   (median of {args.repeat})")
    print(f"  {'store_status (in process)':28s} {t_status:7.3f} {c_status:7.3f}")
    print(f"  {'baseline: DuckDB SQL':28s} {t_base:7.3f} {c_base:7.3f}   status/baseline wall "
          f"{t_status / t_base:.2f}x, CPU {c_status / c_base:.2f}x")
    print(f"  {'mvrec status --json (CLI)':28s} {statistics.median(wall):7.3f} {statistics.median(cpu):7.3f}"
          f"   Python start and imports included; goal < 2 s")
    print(f"  changed files {s['changed_files']['count']}, partial {s['partial_videos']}, open failures "
          f"{s['failures']['open']}, tags {len(b['tags'])}, hidden_states files "
          f"{s['size']['tables']['hidden_states']['files']}, store {s['size']['live_bytes'] / 2**20:.1f} MiB live")
    print(f"  load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
