"""Positive and negative controls for the study: can it find a content effect when one exists?

On a demo corpus made with `mvrec demo-data --videos 100 --cold-items 0.3` (hundreds of cold test
targets; 10 items a topic, so knowing a cold item's topic can put it in the top 10), the study grid
(recommender.study.run_study: id, fuse per hidden layer, dff) runs with `--seeds` seeds:
  positive control  the oracle SYNTHETIC topic features (--synthetic-topics corpus.json): fuse and dff
                    should beat id on cold-item test HR@10 by more than 2 standard errors; run with
                    the defaults and again with the paper's DFF (train.id_min_count = 0, id_dropout = 0);
  test model        hidden states of the random-weight TEST MODEL (`mvrec extract` Parquet output);
  null control      (--permuted) the same hidden states, permuted across items: no gain expected.
`fuse` is the fuse cell at the layer with the best mean validation HR@10 (the grid's own rule).
se = sqrt((sd_cell^2 + sd_id^2) / seeds), sample standard deviations over seeds.

    python bench/controls.py --corpus DIR [--test-features extract.parquet] [--seeds 3] [--out DIR]
                             [--paper-variant] [--permuted]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mvrec.config import StudyConfig, TrainConfig  # noqa: E402
from recommender.pipeline import FeatureSpec, load_inputs  # noqa: E402
from recommender.study import aggregate, best_layer, run_study  # noqa: E402


def extract_to_npz(parquet: Path, out: Path, permute: bool = False) -> Path:
    """`mvrec extract` rows (video_id, layers, hidden [L, D]) -> .npz (item_ids, features, layers);
    `permute` gives each item another item's features (a seeded permutation): the null control."""
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(parquet, columns=["video_id", "status", "layers", "hidden"]).to_pylist()
            if r["status"] == "ok"]
    ids = np.array([r["video_id"] for r in rows])
    np.savez(out, item_ids=np.random.default_rng(0).permutation(ids) if permute else ids,
             features=np.array([r["hidden"] for r in rows], dtype=np.float32), layers=np.array(rows[0]["layers"]))
    return out


def control(name: str, pairs: Path, spec: FeatureSpec, seeds: int, out: Path, id_rows: list | None = None,
            **train_keys) -> tuple[list[str], list]:
    """-> (table lines, the id cell's rows: a second variant reuses them, as the keys don't touch id)."""
    import csv

    train_cfg = TrainConfig(num_threads=1, device="cpu", **train_keys)
    study_cfg = StudyConfig(seeds=seeds, representations="fuse,dff" if id_rows else "id,fuse,dff", layers="all")
    data, bank = load_inputs(pairs, train_cfg, spec)
    bank.caption = None  # hidden states only
    t0 = time.perf_counter()
    summary = run_study(data, bank, train_cfg, study_cfg, out, log=lambda m: print(m, file=sys.stderr, flush=True))
    with open(summary["files"]["results_csv"]) as fh:
        rows = [{**r, "layer": int(r["layer"]) if r["layer"] else None, "valid_HR@10": float(r["valid_HR@10"])}
                for r in csv.DictReader(fh)]
    rows = (id_rows or []) + rows
    agg = {a["cell"]: a for a in aggregate(rows)}
    fuse = f"fuse hidden:{best_layer(rows)}"
    dff = next(c for c in agg if c.startswith("dff"))
    ident = agg["id"]
    n_cold = int(rows[0]["cold_users"])
    lines = [f"### {name}", "",
             f"{data.n_users} users, {data.n_items} items, {n_cold} cold test targets; {seeds} seeds; "
             f"{time.perf_counter() - t0:.0f} s; " + (", ".join(f"{k} = {v}" for k, v in train_keys.items())
                                                       or "default train config"), "",
             "| cell | test HR@10 | cold HR@10 | cold diff vs id | se | diff / se | beats id by > 2 se |",
             "|---|---|---|---|---|---|---|"]
    for cell in ("id", fuse, dff):
        a = agg[cell]
        m, sd = a["test_cold_HR@10"], a["test_cold_HR@10_std"]
        row = f"| {cell} | {a['test_HR@10']:.4f} ± {a['test_HR@10_std']:.4f} | {m:.4f} ± {sd:.4f} |"
        if cell == "id":
            lines.append(row + " | | | |")
            continue
        diff = m - ident["test_cold_HR@10"]
        se = math.sqrt((sd ** 2 + ident["test_cold_HR@10_std"] ** 2) / seeds)
        ratio = diff / se if se > 0 else float("inf") * np.sign(diff)
        lines.append(row + f" {diff:+.4f} | {se:.4f} | {ratio:+.1f} | {'yes' if diff > 2 * se else 'no'} |")
    return lines, [r for r in rows if r["cell"] == "id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="a demo corpus directory (pairs.tsv, corpus.json)")
    ap.add_argument("--test-features", help="`mvrec extract` Parquet of the corpus videos (test model)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="./.mvrec/bench-controls")
    ap.add_argument("--paper-variant", action="store_true", help="also the positive control with the paper's DFF")
    ap.add_argument("--permuted", action="store_true", help="also the test-model features permuted across items")
    ap.add_argument("--skip-main", action="store_true", help="only the extra variants (the id cell of an earlier run)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench/controls.py: {corpus}, 1 thread, load {os.getloadavg()[0]:.2f}", flush=True)
    topics = FeatureSpec(topics=str(corpus / "corpus.json"))
    if args.skip_main:  # reuse the id cell of an earlier run in the same --out
        import csv

        with open(out / "synthetic" / "results.csv") as fh:
            id_rows = [{**r, "layer": None, "valid_HR@10": float(r["valid_HR@10"])}
                       for r in csv.DictReader(fh) if r["cell"] == "id"]
        report = []
    else:
        report, id_rows = control("Positive control: oracle SYNTHETIC topic features", corpus / "pairs.tsv", topics,
                                  args.seeds, out / "synthetic")
        print("\n".join(report), flush=True)
    if args.test_features and not args.skip_main:
        npz = extract_to_npz(Path(args.test_features), out / "test-model.npz")
        lines, _ = control("Random-weight TEST MODEL hidden states", corpus / "pairs.tsv",
                           FeatureSpec(features=str(npz)), args.seeds, out / "test-model", id_rows)
        print("\n" + "\n".join(lines), flush=True)
        report += [""] + lines
    if args.test_features and args.permuted:
        npz = extract_to_npz(Path(args.test_features), out / "test-model-permuted.npz", permute=True)
        lines, _ = control("Null control: the same TEST MODEL hidden states, permuted across items", corpus / "pairs.tsv",
                           FeatureSpec(features=str(npz)), args.seeds, out / "test-model-permuted", id_rows)
        print("\n" + "\n".join(lines), flush=True)
        report += [""] + lines
    if args.paper_variant:
        lines, _ = control("Positive control, the paper's DFF", corpus / "pairs.tsv", topics, args.seeds,
                           out / "synthetic-paper", id_rows, id_min_count=0, id_dropout=0.0)
        print("\n" + "\n".join(lines), flush=True)
        report += [""] + lines
    print("\n== all ==\n" + "\n".join(report))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
