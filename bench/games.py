"""Time to accuracy on Amazon Games: our recipe (preset sasrec-games) against the published BCE recipe
(preset sasrec-bce: one negative, batch 128, dropout 0.5), both on our model and training code.

Each side runs in its own subprocess, one after the other, on one thread, through recommender.train.train
with its preset. After every epoch the side measures test HR@10 / NDCG@10 (sampled-100 protocol, every
10,000 fixed random users as in the reference implementation, fixed negatives) and the wall and CPU time since training started (training + every evaluation it
did; on a shared machine the process CPU time is the steadier of the two).
The bench prints both per-epoch curves, the wall time at which each first reaches test HR@10 >= --target,
their ratio (goal: ours <= 0.5x), and each side's peak resident memory (ru_maxrss; goal ours <= 1.5 GB).

    python bench/games.py [--data Video.txt] [--target 0.72] [--max-minutes-bce 40] [--max-minutes-ours 20]
                          [--seed 0] [--extra-epochs 0]
    python bench/games.py --accuracy [--seeds 0,1,2]   # our recipe to early stopping: test HR/NDCG, sampled-100
                                                       # and full ranking, mean +- std over seeds, vs published
    python bench/games.py --loss-cost                  # CPU ms per training step of full, sampled and bce
    python bench/games.py --loss-cost --losses full --set block=ligr   # ... of a variant's model
    python bench/games.py --accuracy --preset esasrec-games --set loss=full --label "ligr, full" \
                          --jsonl variants.jsonl            # one variant of the backbone, 3 seeds
    python bench/games.py --table variants.jsonl           # the variants table: 3-seed mean ± std each

--accuracy measures each seed's best checkpoint (by the preset's validation protocol) on validation
and test, both protocols (full ranking: every item, history masked), plus its wall / CPU seconds and
the process's peak memory so far; --jsonl appends one JSON line per seed, which --table groups by label.

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


def preset_config(preset: str, **train_keys):
    """The preset's TrainConfig through the config's one precedence, as `mvrec train --preset` gets it
    (the environment left out)."""
    from mvrec.config import load_config

    return load_config(env={}, overrides={"train.preset": preset, **{f"train.{k}": v for k, v in train_keys.items()}}).train


def run_side(args) -> None:
    """One recipe, in this process: JSON lines on stdout, one per epoch, then a summary line."""
    import dataclasses
    import tempfile

    import torch

    from recommender.data import load_sequences
    from recommender.evaluate import evaluate
    from recommender.train import load_for_recommend, train

    torch.set_num_threads(1)
    cfg = preset_config(SIDES[args.side], seed=args.seed, num_threads=1, device="cpu")
    # The bench stops the side; a decaying lr keeps the preset's horizon (max_epochs sets the schedule).
    epochs = args.max_epochs if cfg.lr_schedule == "constant" else cfg.max_epochs
    cfg = dataclasses.replace(cfg, max_epochs=epochs, patience=epochs)
    data = load_sequences(args.data, cfg.min_seq_len, cfg.max_seq_len)
    # The curve's test metrics: 10,000 fixed random users, as the reference implementation evaluates.
    import numpy as np

    curve_data = data.subset(np.sort(np.random.default_rng(1234).choice(data.n_users, min(10_000, data.n_users),
                                                                        replace=False)))
    state = {"start": time.perf_counter(), "cpu": time.process_time(), "reached": None, "extra": args.extra_epochs}

    def on_epoch(epoch: int, model) -> bool:
        test = evaluate(model, curve_data, "test", cfg.eval_batch_size, "cpu", "sampled", seed=1234)
        elapsed = time.perf_counter() - state["start"]
        row = {"epoch": epoch, "elapsed_s": round(elapsed, 1), "cpu_s": round(time.process_time() - state["cpu"], 1),
               "HR@10": round(test["HR@10"], 4),
               "NDCG@10": round(test["NDCG@10"], 4)}
        print(json.dumps(row), flush=True)
        if state["reached"] is None and test["HR@10"] >= args.target:
            state["reached"] = row
        if state["reached"] is not None:
            state["extra"] -= 1
        if args.to_convergence:  # early stopping on validation decides
            return False
        return (state["reached"] is not None and state["extra"] < 0) or elapsed > args.max_minutes * 60

    if args.to_convergence:
        cfg = dataclasses.replace(cfg, patience=preset_config(SIDES[args.side]).patience)
    final = {}
    with tempfile.TemporaryDirectory() as tmp:
        result = train(data, cfg, None, Path(tmp) / "run", progress=False,
                       log=lambda m: print(m, file=sys.stderr, flush=True), on_epoch=on_epoch)
        if args.to_convergence:  # the best checkpoint by validation, both protocols
            model, _ = load_for_recommend(result.run_dir)
            full = evaluate(model, data, "test", cfg.eval_batch_size, "cpu", "full")
            final = {"best_epoch": result.best_epoch, "epochs": result.epochs,
                     **{f"sampled {k}": result.test[k] for k in ("HR@10", "NDCG@10")},
                     **{f"full {k}": full[k] for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20")}}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"done": True, "reached": state["reached"], "peak_mb": round(peak_mb), "final": final,
                      "config": dataclasses.asdict(cfg)}), flush=True)


def parse_sets(pairs: list[str]) -> dict[str, object]:
    """['loss=full', 'dim=64'] -> {'loss': 'full', 'dim': 64}: numbers and booleans as such."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE (a train key)")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


ACCURACY_COLS = ("valid full HR@10", "valid full NDCG@10", "test full HR@10", "test full NDCG@10",
                 "test sampled HR@10", "test sampled NDCG@10")


def run_accuracy(args) -> None:
    """A recipe (--preset, default ours, plus --set keys) trained per seed; its best checkpoint's
    validation and test metrics in both protocols, mean +- std."""
    import torch

    from recommender.data import load_sequences
    from recommender.evaluate import evaluate
    from recommender.train import load_for_recommend, train

    torch.set_num_threads(1)
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    preset, keys = args.preset or SIDES["ours"], parse_sets(args.set)
    label = args.label or " ".join([preset, *args.set])
    for seed in seeds:
        cfg = preset_config(preset, **{**keys, "seed": seed, "num_threads": 1, "device": "cpu", "out": args.out})
        data = load_sequences(args.data, cfg.min_seq_len, cfg.max_seq_len)
        t0, c0 = time.perf_counter(), time.process_time()
        result = train(data, cfg, None, Path(args.out) / f"games-s{seed}", progress=False,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        model, _ = load_for_recommend(result.run_dir)  # the best checkpoint by validation
        m = {f"{split} {protocol} {k}": v for split in ("valid", "test") for protocol in ("full", "sampled")
             for k, v in evaluate(model, data, split, cfg.eval_batch_size, "cpu", protocol).items()}
        row = {"label": label, "preset": preset, "set": keys, "seed": seed, "best_epoch": result.best_epoch,
               "epochs": result.epochs, "wall_s": round(wall), "cpu_s": round(cpu),
               "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "load": round(os.getloadavg()[0], 2), **{c: m[c] for c in ACCURACY_COLS}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(variants_table(rows))
    print("published SASRec (Kang & McAuley 2018), sampled-100 test: HR@10 0.7410, NDCG@10 0.5360")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def mean_std(values: list[float], digits: int = 4) -> str:
    import numpy as np

    spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {spread:.{digits}f}"


def variants_table(rows: list[dict]) -> str:
    """One markdown row per label: seeds, each accuracy column's mean ± std, CPU s and peak MB."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = ["| variant | seeds | " + " | ".join(ACCURACY_COLS) + " | best epochs | CPU s / seed | wall s / seed "
             "| peak MB |", "|---|---|" + "---|" * (len(ACCURACY_COLS) + 4)]
    for label in labels:
        rs = [r for r in rows if r["label"] == label]
        lines.append(f"| {label} | {','.join(str(r['seed']) for r in rs)} | "
                     + " | ".join(mean_std([r[c] for r in rs]) for c in ACCURACY_COLS)
                     + f" | {'/'.join(str(r['best_epoch']) for r in rs)} | {mean_std([r['cpu_s'] for r in rs], 0)} | "
                     f"{mean_std([r['wall_s'] for r in rs], 0)} | {max(r['peak_mb'] for r in rs)} |")
    return "\n".join(lines)


def run_loss_cost(args) -> None:
    """CPU ms per training step (forward, backward, optimizer) of each loss on the same Games batches;
    the model is --preset (default ours) with the --set keys (e.g. block=ligr, dim=64)."""
    import numpy as np
    import torch

    from recommender.data import load_sequences
    from recommender.evaluate import history_mask
    from recommender.losses import next_item_loss
    from recommender.train import build_model, length_batches

    torch.set_num_threads(1)
    cfg = preset_config(args.preset or SIDES["ours"], **parse_sets(args.set))
    data = load_sequences(args.data, cfg.min_seq_len, cfg.max_seq_len)
    lengths = (data.train_targets != 0).sum(1)
    batches = length_batches(lengths, np.flatnonzero(lengths), cfg.batch_size, torch.Generator().manual_seed(0))
    batches = batches[:args.cost_batches]
    hp, hi = data.history("valid")
    T = data.train_inputs.shape[1]
    print(f"loss cost on {len(batches)} Games batches of {cfg.batch_size} users ({data.n_items} items, dim {cfg.dim}, "
          f"block {cfg.block}, {cfg.num_negatives} negatives), 1 thread, load {os.getloadavg()[0]:.2f}")
    losses = args.losses.split(",")
    for loss in losses + losses:  # twice: the second round is warm
        torch.manual_seed(0)
        model = build_model(cfg, data.n_items)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        t0 = time.process_time()
        for b in batches:
            w = int(lengths[b].max())
            seen = history_mask(hp, hi, b, data.n_items + 1)
            out = next_item_loss(model, torch.as_tensor(data.train_inputs[b, T - w:]),
                                 torch.as_tensor(data.train_targets[b, T - w:]), seen, loss, cfg.num_negatives,
                                 None, cfg.gbce_t)
            opt.zero_grad()
            out.backward()
            opt.step()
        print(f"  {loss:8s} {1000 * (time.process_time() - t0) / len(batches):7.1f} CPU ms/step", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--target", type=float, default=0.72)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes-bce", type=float, default=40)
    ap.add_argument("--max-minutes-ours", type=float, default=20)
    ap.add_argument("--extra-epochs", type=int, default=0, help="epochs to keep training after the target")
    ap.add_argument("--sides", default="ours,bce")
    ap.add_argument("--ours-to-convergence", action="store_true",
                    help="train ours on to early stopping and print its final test metrics (one seed of --accuracy)")
    ap.add_argument("--accuracy", action="store_true", help="instead: our recipe to early stopping, --seeds seeds")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds for --accuracy")
    ap.add_argument("--out", default="./.mvrec/bench-games", help="run directories of --accuracy")
    ap.add_argument("--preset", help="--accuracy: the recipe (default sasrec-games)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--accuracy: a train key over the preset")
    ap.add_argument("--label", help="--accuracy: the variant's name in the table (default: preset and keys)")
    ap.add_argument("--jsonl", help="--accuracy: append one JSON line per seed to this file")
    ap.add_argument("--table", metavar="JSONL", help="instead: the variants table of an --accuracy --jsonl file")
    ap.add_argument("--loss-cost", action="store_true", help="instead: CPU ms per step of full, sampled and bce")
    ap.add_argument("--cost-batches", type=int, default=40)
    ap.add_argument("--losses", default="full,sampled,bce", help="--loss-cost: comma list of losses to time")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # internal: run one side
    ap.add_argument("--max-minutes", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--max-epochs", type=int, default=200, help=argparse.SUPPRESS)
    ap.add_argument("--to-convergence", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:  # needs no data
        print(variants_table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
        return
    data = find_data(args.data)
    if data is None:
        print("SKIP: Amazon Games (Video.txt) not found; pass --data PATH or set MVREC_GAMES")
        return
    args.data = str(data)
    if args.side:
        return run_side(args)
    if args.accuracy:
        return run_accuracy(args)
    if args.loss_cost:
        return run_loss_cost(args)

    load = os.getloadavg()
    print(f"bench/games.py: {data}, target test HR@10 >= {args.target} (sampled-100, 10,000 fixed users), seed {args.seed}, "
          f"1 thread per side, sides run one after the other; {os.cpu_count()} cores, load {load[0]:.2f}", flush=True)
    results = {}
    for side in args.sides.split(","):
        minutes = args.max_minutes_bce if side == "bce" else args.max_minutes_ours
        cmd = [sys.executable, __file__, "--side", side, "--data", args.data, "--target", str(args.target),
               "--seed", str(args.seed), "--max-minutes", str(minutes), "--extra-epochs", str(args.extra_epochs)]
        if side == "ours" and args.ours_to_convergence:
            cmd.append("--to-convergence")
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
                    print(f"  epoch {row['epoch']:3d}  wall {row['elapsed_s']:8.1f} s  CPU {row['cpu_s']:8.1f} s  "
                          f"test HR@10 {row['HR@10']:.4f}  "
                          f"NDCG@10 {row['NDCG@10']:.4f}", flush=True)
        if proc.returncode or summary is None:
            raise SystemExit(f"{side} side failed (exit {proc.returncode})")
        c = summary["config"]
        print(f"  recipe: loss {c['loss']}, batch {c['batch_size']}, dropout {c['dropout']}, lr {c['lr']} "
              f"({c['lr_schedule']}, {c['max_epochs']} epochs), history masked {c['mask_history']}, "
              f"weight decay {c['weight_decay']}, dim {c['dim']}, max_seq_len {c['max_seq_len']}; "
              f"peak memory {summary['peak_mb']} MB", flush=True)
        if summary["final"]:
            print("  final (best validation epoch): " + json.dumps(summary["final"]), flush=True)
        results[side] = summary

    print("\n== summary ==")
    for side, s in results.items():
        r = s["reached"]
        when = (f"epoch {r['epoch']}, wall {r['elapsed_s']:.1f} s, CPU {r['cpu_s']:.1f} s (HR@10 {r['HR@10']:.4f})"
                if r else "not reached")
        print(f"{side:5s} first test HR@10 >= {args.target}: {when}; peak memory {s['peak_mb']} MB")
    if all(side in results and results[side]["reached"] for side in ("ours", "bce")):
        ours, bce = results["ours"]["reached"], results["bce"]["reached"]
        print(f"time-to-target ratio ours / bce: wall {ours['elapsed_s'] / bce['elapsed_s']:.2f}x, "
              f"CPU {ours['cpu_s'] / bce['cpu_s']:.2f}x (goal <= 0.5x); "
              f"ours peak memory {results['ours']['peak_mb']} MB (goal <= 1536 MB)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
