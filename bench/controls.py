"""Positive and negative controls for the study: does it find a content effect when, and only when,
one exists?

Corpora: `mvrec demo-data --videos 100 --cold-items 0.3` (hundreds of cold test targets; 10 items a
topic, so knowing a cold item's topic can put it in the top 10) and the same with
`--unrelated-visuals` (the same pairs.tsv and titles; each video drawn from a random topic).
The study grid (recommender.study.run_study: id, fuse per hidden layer, dff; the default
StudyConfig, so every cell, id included, follows the cold-item rule study.id_min_count /
study.id_dropout) runs with `--seeds` seeds on one torch thread:
  positive control  oracle SYNTHETIC topic features (--synthetic-topics corpus.json) on the cold
                    corpus: fuse and dff should beat id on cold-item test HR@10 by > 2 se;
  negative control  hidden states of the random-weight TEST MODEL (`mvrec extract` Parquet) of the
                    unrelated-visuals corpus: they carry nothing about behaviour, so |diff| < 2 se;
  test model        the same model's hidden states of the normal cold corpus: the demo draws each
                    video from its topic, so they carry the topic (a gain is expected);
  permuted          (--permuted) those hidden states permuted across items.
The id cell depends on pairs.tsv only, so it is trained once and shared (the bench checks that the
corpora's pairs.tsv are the same bytes). `fuse` is the fuse cell at the layer with the best mean
validation HR@10 (the grid's own rule). se = sqrt((sd_cell^2 + sd_id^2) / seeds), sample standard
deviations over seeds. Each table also gives what a uniformly random ranking scores on the cold
targets (chance), and the cold targets' mean rank from each run's best checkpoint: unlike HR@10,
a mean rank gains nothing from spreading scores that carry no information.

    python bench/controls.py --corpus DIR [--test-features DIR.parquet]
                             [--null-corpus DIR2 --null-features DIR2.parquet] [--permuted]
                             [--seeds 3] [--out DIR] [--report-only]
"""

from __future__ import annotations

import argparse
import csv
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
    `permute` gives each item another item's features (a seeded permutation)."""
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(parquet, columns=["video_id", "status", "layers", "hidden"]).to_pylist()
            if r["status"] == "ok"]
    ids = np.array([r["video_id"] for r in rows])
    np.savez(out, item_ids=np.random.default_rng(0).permutation(ids) if permute else ids,
             features=np.array([r["hidden"] for r in rows], dtype=np.float32), layers=np.array(rows[0]["layers"]))
    return out


def run(pairs: Path, spec: FeatureSpec, representations: str, seeds: int, out: Path,
        reuse: bool = False) -> tuple[list[dict], object]:
    """The study grid on one feature kind -> (results.csv rows, data); `reuse` reads an earlier
    run's results.csv (and run directories) in `out` instead of training."""
    train_cfg = TrainConfig(num_threads=1, device="cpu")
    data, bank = load_inputs(pairs, train_cfg, spec)
    bank.caption = None  # hidden states only
    if not reuse:
        run_study(data, bank, train_cfg, StudyConfig(seeds=seeds, representations=representations, layers="all"),
                  out, log=lambda m: print(m, file=sys.stderr, flush=True))
    with open(out / "results.csv") as fh:
        return [{**r, "layer": int(r["layer"]) if r["layer"] else None, "valid_HR@10": float(r["valid_HR@10"])}
                for r in csv.DictReader(fh)], data


def cold_mean_rank(run_dir: str, data) -> float:
    """Mean full-ranking rank of the cold test targets, from a run's best checkpoint (item table)."""
    from recommender.evaluate import COLD_THRESHOLD, full_ranking_ranks
    from recommender.train import load_for_recommend

    model, _ = load_for_recommend(run_dir)
    ranks = full_ranking_ranks(model, data, "test").numpy()
    return float(ranks[data.train_counts[data.targets("test")[1]] < COLD_THRESHOLD].mean())


def chance_cold_hr10(data) -> float:
    """Cold HR@10 of a uniformly random ranking: 10 / the target's candidates (unseen items)."""
    from recommender.evaluate import COLD_THRESHOLD

    _, targets = data.targets("test")
    indptr, indices = data.history("test")
    cold = np.flatnonzero(data.train_counts[targets] < COLD_THRESHOLD)
    cands = [data.n_items - len(set(indices[indptr[u]:indptr[u + 1]].tolist()) - {int(targets[u])}) for u in cold]
    return float(np.mean(np.minimum(1.0, 10 / np.array(cands))))


def table(title: str, rows: list[dict], id_rows: list[dict], data, seconds: float | None, seeds: int,
          expect_gain: bool) -> tuple[list[str], bool]:
    """Markdown lines for one control, and whether it passes: with expect_gain, fuse and dff beat id
    on cold HR@10 by > 2 se; without, neither differs from id by 2 se or more."""
    rows = id_rows + rows
    agg = {a["cell"]: a for a in aggregate(rows)}
    fuse, dff = f"fuse hidden:{best_layer(rows)}", next(c for c in agg if c.startswith("dff"))
    ident = agg["id"]
    study = StudyConfig()
    lines = [f"### {title}", "",
             f"{data.n_users} users, {data.n_items} items, {int(rows[0]['cold_users'])} cold test targets; "
             f"{seeds} seeds; {'runs reused' if seconds is None else f'{seconds:.0f} s'}; study.id_min_count = {study.id_min_count}, "
             f"study.id_dropout = {study.id_dropout} (every cell); chance cold HR@10 {chance_cold_hr10(data):.4f}", "",
             "| cell | test HR@10 | cold HR@10 | cold diff vs id | se | diff / se | "
             + ("beats id by > 2 se |" if expect_gain else "within ± 2 se of id |") + " cold mean rank | rank gain / se |",
             "|---|---|---|---|---|---|---|---|---|"]
    passed, ranks = True, {}
    for cell in ("id", fuse, dff):
        a = agg[cell]
        m, sd = a["test_cold_HR@10"], a["test_cold_HR@10_std"]
        ranks[cell] = np.array([cold_mean_rank(r["run_dir"], data) for r in rows if r["cell"] == cell])
        rank = f" {ranks[cell].mean():.1f} ± {ranks[cell].std(ddof=1):.1f} |"
        row = f"| {cell} | {a['test_HR@10']:.4f} ± {a['test_HR@10_std']:.4f} | {m:.4f} ± {sd:.4f} |"
        if cell == "id":
            lines.append(row + " | | | |" + rank + " |")
            continue
        diff = m - ident["test_cold_HR@10"]
        se = math.sqrt((sd ** 2 + ident["test_cold_HR@10_std"] ** 2) / seeds)
        ok = diff > 2 * se if expect_gain else abs(diff) < 2 * se
        passed &= ok
        rank_se = math.sqrt((ranks[cell].var(ddof=1) + ranks["id"].var(ddof=1)) / seeds)
        lines.append(row + f" {diff:+.4f} | {se:.4f} | {_ratio(diff, se)} | {'yes' if ok else 'no'} |" + rank
                     + f" {_ratio(ranks['id'].mean() - ranks[cell].mean(), rank_se)} |")  # lower rank = better
    return lines + ["", f"{'passes' if passed else 'FAILS'}"], passed


def _ratio(diff: float, se: float) -> str:
    return f"{diff / se:+.1f}" if se > 0 else ("0" if diff == 0 else f"{math.copysign(math.inf, diff):+}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="the cold demo corpus (pairs.tsv, corpus.json)")
    ap.add_argument("--test-features", help="`mvrec extract` Parquet of --corpus' videos (test model)")
    ap.add_argument("--null-corpus", help="the same corpus made with --unrelated-visuals")
    ap.add_argument("--null-features", help="`mvrec extract` Parquet of --null-corpus' videos (test model)")
    ap.add_argument("--permuted", action="store_true", help="also --test-features permuted across items")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="./.mvrec/bench-controls")
    ap.add_argument("--report-only", action="store_true", help="tables from the runs already in --out, no training")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench/controls.py: {corpus}, 1 torch thread, load {os.getloadavg()[0]:.2f}", flush=True)
    pairs = corpus / "pairs.tsv"
    if args.null_corpus and (Path(args.null_corpus) / "pairs.tsv").read_bytes() != pairs.read_bytes():
        sys.exit(f"{args.null_corpus}/pairs.tsv differs from {pairs}: make both with the same demo-data options "
                 "(plus --unrelated-visuals)")
    t0 = time.perf_counter()
    id_rows, _ = run(pairs, FeatureSpec(), "id", args.seeds, out / "id", args.report_only)
    print(f"id cell: {time.perf_counter() - t0:.0f} s", flush=True)

    controls = [("Positive control: oracle SYNTHETIC topic features", FeatureSpec(topics=str(corpus / "corpus.json")),
                 out / "synthetic", True)]
    if args.null_corpus and args.null_features:
        npz = extract_to_npz(Path(args.null_features), out / "null-test-model.npz")
        controls.append(("Negative control: TEST MODEL hidden states, corpus with --unrelated-visuals",
                         FeatureSpec(features=str(npz)), out / "null-test-model", False))
    if args.test_features:
        npz = extract_to_npz(Path(args.test_features), out / "test-model.npz")
        controls.append(("TEST MODEL hidden states, normal corpus (the videos show the topic)",
                         FeatureSpec(features=str(npz)), out / "test-model", True))
        if args.permuted:
            npz = extract_to_npz(Path(args.test_features), out / "test-model-permuted.npz", permute=True)
            controls.append(("TEST MODEL hidden states of the normal corpus, permuted across items",
                             FeatureSpec(features=str(npz)), out / "test-model-permuted", False))
    report = []
    for title, spec, where, expect_gain in controls:
        t0 = time.perf_counter()
        rows, data = run(pairs, spec, "fuse,dff", args.seeds, where, args.report_only)
        lines, _ = table(title, rows, id_rows, data, None if args.report_only else time.perf_counter() - t0,
                         args.seeds, expect_gain)
        print("\n" + "\n".join(lines), flush=True)
        report += [""] + lines
    print("\n== all ==" + "\n".join(report))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
