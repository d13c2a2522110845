"""Concurrency torture: two writer processes commit overlapping batches to one store while reader
processes check every snapshot they open. Run by hand; tests/test_store.py runs one small trial.

    python bench/torture_concurrency.py               # 10 trials
    python bench/torture_concurrency.py --trials 3 --videos 24

A reader's snapshot (connect(): every table pinned at open) must be consistent:
  - no duplicate key in any table;
  - every video in hidden_states has all its layers (a batch is never half visible);
  - every video in hidden_states has its videos and captions rows (written earlier in its batch);
  - each writer's own videos appear in whole batches.
After the writers: exact row counts in every table, both writers exited 0, no process left.
Prints `N trials, N clean`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [0, 1, 2, -1]
WAIT = 600  # seconds: a hang guard for one trial's processes

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from storage import CaptionRow, ExtractionBatch, FeatureStore, HiddenStateRow, VideoRow
    path, w, videos, batch, shared = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    store = FeatureStore(path)
    layers = [0, 1, 2, -1]
    for start in range(0, videos, batch):
        # Own videos, plus `shared` videos that the other writer writes too (same keys).
        ids = [f"w{w}-{i}" for i in range(start, min(start + batch, videos))] + [f"s{j}" for j in range(shared)]
        store.write_batch(ExtractionBatch(
            videos=[VideoRow(v, f"/{v}.mp4", "sha") for v in ids],
            captions=[CaptionRow(v, "sha", "e", f"{v} by {w}") for v in ids],
            hidden_states=[HiddenStateRow(v, "sha", "e", k, np.full(8, start, np.float32)) for v in ids for k in layers]))
""")

READER = textwrap.dedent("""
    import sys, os, json
    from storage import connect
    path, stop, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    keys = {"videos": "video_id, content_sha256", "captions": "video_id, content_sha256, extractor_id",
            "hidden_states": "video_id, content_sha256, extractor_id, layer"}
    reads, problems, last = 0, [], False
    while not last:  # one more read after the writers finished
        last = os.path.exists(stop)
        with connect(path) as con:
            q = lambda sql: con.execute(sql).fetchall()
            for t, k in keys.items():
                (n, d), = q(f"SELECT count(*), count(DISTINCT ({k})) FROM {t}")
                if n != d:
                    problems.append(f"{t}: {n - d} duplicate key(s)")
            bad = q("SELECT video_id, count(*) FROM hidden_states GROUP BY 1 HAVING count(*) <> 4")
            if bad:
                problems.append(f"hidden_states: videos without all layers: {bad[:3]}")
            orphans = q("SELECT DISTINCT h.video_id FROM hidden_states h "
                        "ANTI JOIN videos v USING (video_id, content_sha256)")
            orphans += q("SELECT DISTINCT h.video_id FROM hidden_states h "
                         "ANTI JOIN captions c USING (video_id, content_sha256, extractor_id)")
            if orphans:
                problems.append(f"hidden_states rows whose batch is missing elsewhere: {orphans[:3]}")
            for w, n in q("SELECT split_part(video_id, '-', 1), count(DISTINCT video_id) FROM hidden_states "
                          "WHERE video_id LIKE 'w%' GROUP BY 1"):
                if n % batch:
                    problems.append(f"{w}: {n} videos, not whole batches of {batch}")
        reads += 1
    print(json.dumps({"reads": reads, "problems": problems[:20]}))
""")


def trial(root: Path, videos: int = 40, batch: int = 8, shared: int = 4, readers: int = 2) -> dict:
    """One trial in `root` (must not exist yet). Returns reads, problems, orphans found."""
    from storage import FeatureStore

    path, stop = root / "store", root / "stop"
    FeatureStore(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rs = [subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop), str(batch)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(readers)]
    ws = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), str(videos), str(batch), str(shared)],
                           cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    problems: list[str] = []
    reads = 0
    try:
        for w in ws:
            _, err = w.communicate(timeout=WAIT)
            if w.returncode:
                problems.append(f"writer exited {w.returncode}: {err.strip().splitlines()[-1:]}")
        stop.touch()
        for r in rs:
            out, err = r.communicate(timeout=WAIT)
            if r.returncode:
                problems.append(f"reader exited {r.returncode}: {err.strip().splitlines()[-1:]}")
                continue
            got = json.loads(out)
            reads += got["reads"]
            problems += got["problems"]
    finally:
        for p in ws + rs:  # only on a hang or an error above
            if p.poll() is None:
                p.kill()
                p.wait()
    store = FeatureStore(path, create=False)
    n = 2 * videos + shared
    want = {"videos": n, "captions": n, "hidden_states": n * len(LAYERS), "failures": 0}
    got = {t: store.table(t).to_pyarrow_dataset().count_rows() for t in want}
    if got != want:
        problems.append(f"row counts {got}, want {want}")
    orphans = [p.pid for p in psutil.Process().children(recursive=True) if p.pid in {x.pid for x in ws + rs}]
    return {"reads": reads, "problems": problems, "orphans": len(orphans)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--videos", type=int, default=40, help="own videos per writer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--readers", type=int, default=2)
    args = ap.parse_args()
    print(f"concurrency torture: 2 writers x {args.videos} videos (batches of {args.batch}, 4 shared keys), "
          f"{args.readers} readers; load average {os.getloadavg()[0]:.2f}")
    clean = reads = orphans = 0
    for i in range(args.trials):
        with tempfile.TemporaryDirectory(prefix="mvrec-torture-") as d:
            r = trial(Path(d) / "t", args.videos, args.batch, readers=args.readers)
        reads += r["reads"]
        orphans += r["orphans"]
        clean += not r["problems"] and not r["orphans"]
        print(f"trial {i + 1}: {r['reads']} consistent-snapshot checks, "
              + ("clean" if not r["problems"] else "PROBLEMS: " + "; ".join(r["problems"])))
    print(f"{args.trials} trials, {clean} clean; {reads} reader snapshots checked; {orphans} orphan processes")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
