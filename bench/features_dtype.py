"""train.features_dtype on the demo corpus: accuracy and memory of float32, bfloat16 and float16 features.

    mvrec demo-data --videos 100 --cold-items 0.3 -o normal
    mvrec build-test-model -o model
    mvrec extract normal/videos -o normal.parquet -m model
    python bench/features_dtype.py --corpus normal --features normal.parquet [--seeds 3]

For each dtype, in its own process (its own peak RSS), the study's fuse cells (every hidden layer)
and dff on the same TEST MODEL features, kept in memory in that dtype, the study's settings and
seeds, one torch thread. Prints per cell and dtype test HR@10, NDCG@10 and cold HR@10, and each
half type against float32: the difference in test HR@10 with the study's paired bootstrap over the
test targets and seeds (recommender.study.judge). The same seeds draw the same initial weights and
batches in every dtype, so a difference is the dtype's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = ("float32", "bfloat16", "float16")


def grid(corpus: Path, features: Path, dtype: str, seeds: int, out: Path) -> dict:
    """One dtype's grid (in a child process): the rows, the features' bytes, peak RSS, seconds."""
    import resource

    import torch

    from mvrec.config import StudyConfig, TrainConfig
    from recommender.pipeline import FeatureSpec, load_inputs
    from recommender.study import run_study

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "bench"))
    from controls import extract_to_npz

    out.mkdir(parents=True, exist_ok=True)
    npz = extract_to_npz(features, out / "features.npz")
    train = TrainConfig(num_threads=1, device="cpu", features_dtype=dtype)
    started = time.perf_counter()
    data, bank = load_inputs(corpus / "pairs.tsv", train, FeatureSpec(features=str(npz)))
    bank.caption = None  # hidden states only
    run_study(data, bank, train, StudyConfig(seeds=seeds, representations="fuse,dff"), out,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"feature_bytes": torch.as_tensor(bank.hidden).nbytes, "seconds": time.perf_counter() - started,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="`mvrec demo-data` directory (pairs.tsv)")
    ap.add_argument("--features", type=Path, required=True, help="`mvrec extract` Parquet of its videos")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "features_dtype")
    ap.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dtype:  # the child
        print(json.dumps(grid(args.corpus, args.features, args.dtype, args.seeds, args.out / args.dtype)))
        return

    from recommender.study import aggregate, judge, target_hits

    runs, rows = {}, {}
    for dtype in DTYPES:
        cmd = [sys.executable, __file__, "--corpus", str(args.corpus), "--features", str(args.features),
               "--seeds", str(args.seeds), "--out", str(args.out), "--dtype", dtype]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs[dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
        with open(args.out / dtype / "results.csv") as fh:
            rows[dtype] = list(csv.DictReader(fh))
    print(f"features_dtype on {args.corpus} (TEST MODEL features {args.features}), {args.seeds} seeds, 1 torch "
          f"thread, load average {os.getloadavg()[0]:.1f} at the end")
    for dtype, r in runs.items():
        print(f"{dtype}: features {r['feature_bytes'] / 1e6:.2f} MB, peak RSS {r['peak_rss'] / 1e6:.0f} MB, "
              f"grid {r['seconds']:.0f} s")
    agg = {d: {a["cell"]: a for a in aggregate(rs)} for d, rs in rows.items()}
    print("\n| cell | dtype | test HR@10 | test NDCG@10 | cold HR@10 | HR@10 vs float32 (95% CI) |")
    print("|---|---|---|---|---|---|")
    for cell in agg["float32"]:
        for dtype in DTYPES:
            a = agg[dtype][cell]
            vs = ""
            if dtype != "float32":
                v = judge(target_hits(rows[dtype], cell, cold=False), target_hits(rows["float32"], cell, cold=False),
                          "test targets")
                vs = f"{v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
            print(f"| {cell} | {dtype} | {a['test_HR@10']:.4f} ± {a['test_HR@10_std']:.4f} | "
                  f"{a['test_NDCG@10']:.4f} ± {a['test_NDCG@10_std']:.4f} | "
                  f"{a['test_cold_HR@10']:.4f} ± {a['test_cold_HR@10_std']:.4f} | {vs} |")


if __name__ == "__main__":
    main()
