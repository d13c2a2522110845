"""Time to accuracy on Amazon Games: our recipe (preset sasrec-games) against the published BCE recipe
(preset sasrec-bce: one negative, batch 128, dropout 0.5), both on our model and training code.

Each side runs in its own subprocess, one after the other, on one thread, through recommender.train.train
with its preset. After every epoch the side measures test HR@10 / NDCG@10 (sampled-100 protocol, every
user, fixed negatives) and the wall time since training started (training + every evaluation it did).
The bench prints both per-epoch curves, the wall time at which each first reaches test HR@10 >= --target,
their ratio (goal: ours <= 0.5x), and each side's peak resident memory (ru_maxrss; goal ours <= 1.5 GB).

    python bench/games.py [--data Video.txt] [--target 0.72] [--max-minutes-bce 40] [--max-minutes-ours 20]
                          [--seed 0] [--extra-epochs 0]

The dataset comes from --data, else $MVREC_GAMES, else ../shared/data/amazon-games/Video.txt next to the
repository; without it the bench says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SIDES = {"ours": "sasrec-games", "bce": "sasrec-bce"}


def find_data(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get("MVREC_GAMES"), ROOT.parent / "shared" / "data" / "amazon-games" / "Video.txt"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def run_side(args) -> None:
    """One recipe, in this process: JSON lines on stdout, one per epoch, then a summary line."""
    import dataclasses
    import tempfile

    import torch

    from mvrec.config import TrainConfig
    from recommender.data import load_sequences
    from recommender.evaluate import evaluate
    from recommender.presets import apply_preset
    from recommender.train import train

    torch.set_num_threads(1)
    cfg = apply_preset(TrainConfig(preset=SIDES[args.side], seed=args.seed, num_threads=1, device="cpu"))
    cfg = dataclasses.replace(cfg, max_epochs=args.max_epochs, patience=args.max_epochs)  # the bench stops it
    data = load_sequences(args.data, cfg.min_seq_len, cfg.max_seq_len)
    state = {"start": time.perf_counter(), "reached": None, "extra": args.extra_epochs, "epoch_start": None}

    def on_epoch(epoch: int, model) -> bool:
        test = evaluate(model, data, "test", cfg.eval_batch_size, "cpu", "sampled", seed=1234)
        elapsed = time.perf_counter() - state["start"]
        row = {"epoch": epoch, "elapsed_s": round(elapsed, 1), "HR@10": round(test["HR@10"], 4),
               "NDCG@10": round(test["NDCG@10"], 4)}
        print(json.dumps(row), flush=True)
        if state["reached"] is None and test["HR@10"] >= args.target:
            state["reached"] = row
        if state["reached"] is not None:
            state["extra"] -= 1
        return (state["reached"] is not None and state["extra"] < 0) or elapsed > args.max_minutes * 60

    with tempfile.TemporaryDirectory() as tmp:
        train(data, cfg, None, Path(tmp) / "run", progress=False, log=lambda m: print(m, file=sys.stderr, flush=True),
              on_epoch=on_epoch)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"done": True, "reached": state["reached"], "peak_mb": round(peak_mb),
                      "config": dataclasses.asdict(cfg)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--target", type=float, default=0.72)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes-bce", type=float, default=40)
    ap.add_argument("--max-minutes-ours", type=float, default=20)
    ap.add_argument("--extra-epochs", type=int, default=0, help="epochs to keep training after the target")
    ap.add_argument("--sides", default="bce,ours")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # internal: run one side
    ap.add_argument("--max-minutes", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--max-epochs", type=int, default=200, help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = find_data(args.data)
    if data is None:
        print("SKIP: Amazon Games (Video.txt) not found; pass --data PATH or set MVREC_GAMES")
        return
    args.data = str(data)
    if args.side:
        return run_side(args)

    load = os.getloadavg()
    print(f"bench/games.py: {data}, target test HR@10 >= {args.target} (sampled-100, every user), seed {args.seed}, "
          f"1 thread per side, sides run one after the other; {os.cpu_count()} cores, load {load[0]:.2f}", flush=True)
    results = {}
    for side in args.sides.split(","):
        minutes = args.max_minutes_bce if side == "bce" else args.max_minutes_ours
        cmd = [sys.executable, __file__, "--side", side, "--data", args.data, "--target", str(args.target),
               "--seed", str(args.seed), "--max-minutes", str(minutes), "--extra-epochs", str(args.extra_epochs)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        print(f"\n== {side} (preset {SIDES[side]}) ==", flush=True)
        curve, summary = [], None
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
            for line in proc.stdout:
                row = json.loads(line)
                if row.get("done"):
                    summary = row
                else:
                    curve.append(row)
                    print(f"  epoch {row['epoch']:3d}  {row['elapsed_s']:8.1f} s  test HR@10 {row['HR@10']:.4f}  "
                          f"NDCG@10 {row['NDCG@10']:.4f}", flush=True)
        if proc.returncode or summary is None:
            raise SystemExit(f"{side} side failed (exit {proc.returncode})")
        c = summary["config"]
        print(f"  recipe: loss {c['loss']}, batch {c['batch_size']}, dropout {c['dropout']}, lr {c['lr']}, "
              f"weight decay {c['weight_decay']}, dim {c['dim']}, max_seq_len {c['max_seq_len']}; "
              f"peak memory {summary['peak_mb']} MB", flush=True)
        results[side] = summary

    print("\n== summary ==")
    for side, s in results.items():
        r = s["reached"]
        when = f"epoch {r['epoch']}, {r['elapsed_s']:.1f} s (HR@10 {r['HR@10']:.4f})" if r else "not reached"
        print(f"{side:5s} first test HR@10 >= {args.target}: {when}; peak memory {s['peak_mb']} MB")
    if all(side in results and results[side]["reached"] for side in ("ours", "bce")):
        ratio = results["ours"]["reached"]["elapsed_s"] / results["bce"]["reached"]["elapsed_s"]
        print(f"time-to-target ratio ours / bce: {ratio:.2f}x (goal <= 0.5x); "
              f"ours peak memory {results['ours']['peak_mb']} MB (goal <= 1536 MB)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
