"""Positive and negative controls for the study: does it find a content effect when, and only when,
one exists?

Corpora: `mvrec demo-data --videos 100 --cold-items 0.3` (hundreds of cold test targets; 10 items a
topic, so knowing a cold item's topic can put it in the top 10) and the same with
`--unrelated-visuals` (the same pairs.tsv and titles; each video drawn from a random topic).
The study grid (recommender.study.run_study: id, fuse per hidden layer, dff; the default
StudyConfig, so every cell, id included, follows the cold-item rule study.id_min_count /
study.id_dropout) runs with `--seeds` seeds on one torch thread, for each feature kind:
  oracle       SYNTHETIC topic features (--synthetic-topics corpus.json) of the cold corpus;
  unrelated    hidden states of the random-weight TEST MODEL (`mvrec extract` Parquet) of the
               unrelated-visuals corpus: they carry nothing about behaviour;
  test model   the same model's hidden states of the normal corpus (the videos show the topic);
and for each kind its PERMUTED TWIN: the same feature rows keyed by a seeded permutation of the
items, so the same distribution and structure (and the same spread of scores) with no item
information. That twin is each content cell's null: cold HR@10 is a top-10 threshold, and
features without information already beat id's shared rare-item row there by scattering rare
items over the ranking.
  positive control  oracle fuse and dff beat id AND their permuted twin on cold HR@10 by > 2 se;
  negative control  unrelated fuse and dff gain less than 2 se on cold HR@10 over their twin.
The id cell depends on pairs.tsv only, so it is trained once and shared (the bench checks that the
corpora's pairs.tsv are the same bytes). `fuse` is the fuse cell at the layer with the best mean
validation HR@10 (the grid's own rule). se = sqrt((sd_a^2 + sd_b^2) / seeds), sample standard
deviations over seeds. Each table also gives what a uniformly random ranking scores on the cold
targets (chance), and the cold targets' mean rank from each run's best checkpoint: unlike HR@10,
a mean rank gains nothing from spreading scores that carry no information.

    python bench/controls.py --corpus DIR [--test-features DIR.parquet]
                             [--null-corpus DIR2 --null-features DIR2.parquet]
                             [--seeds 3] [--out DIR] [--reuse | --report-only]
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

TRAIN = TrainConfig(num_threads=1, device="cpu")


def extract_to_npz(parquet: Path, out: Path) -> Path:
    """`mvrec extract` rows (video_id, layers, hidden [L, D]) -> .npz (item_ids, features, layers)."""
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(parquet, columns=["video_id", "status", "layers", "hidden"]).to_pylist()
            if r["status"] == "ok"]
    np.savez(out, item_ids=np.array([r["video_id"] for r in rows]),
             features=np.array([r["hidden"] for r in rows], dtype=np.float32), layers=np.array(rows[0]["layers"]))
    return out


def permuted_twin(pairs: Path, spec: FeatureSpec, out: Path, seed: int = 0) -> FeatureSpec:
    """The hidden states of `spec`, each item's row given to another item (a seeded permutation of
    the item ids in sorted order, so the draw depends on the item set and the seed only) -> .npz."""
    data, bank = load_inputs(pairs, TRAIN, spec)
    missing = set(bank.missing.get("hidden", []))
    ids, rows = zip(*sorted((item, r) for r, item in enumerate(data.items) if r and item not in missing), strict=True)
    np.savez(out, item_ids=np.random.default_rng(seed).permutation(np.array(ids)),
             features=bank.hidden[list(rows)], layers=np.array(bank.layers))
    return FeatureSpec(features=str(out))


def run(pairs: Path, spec: FeatureSpec, representations: str, seeds: int, out: Path,
        reuse: bool = False) -> tuple[list[dict], object]:
    """The study grid on one feature kind -> (results.csv rows, data); `reuse` reads an earlier
    run's results.csv (and run directories) in `out` instead of training."""
    data, bank = load_inputs(pairs, TRAIN, spec)
    bank.caption = None  # hidden states only
    if not reuse:
        run_study(data, bank, TRAIN, StudyConfig(seeds=seeds, representations=representations, layers="all"),
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


def versus(a: dict, b: dict, seeds: int, metric: str = "test_cold_HR@10") -> tuple[float, float]:
    """(mean a - mean b, se) for two aggregated cells; se = sqrt((sd_a^2 + sd_b^2) / seeds)."""
    return a[metric] - b[metric], math.sqrt((a[metric + "_std"] ** 2 + b[metric + "_std"] ** 2) / seeds)


def pick(rows: list[dict]) -> dict[str, dict]:
    """{"fuse": fuse at the layer with the best mean validation HR@10, "dff": the dff cell} (aggregated)."""
    agg = {a["cell"]: a for a in aggregate(rows)}
    return {"fuse": agg[f"fuse hidden:{best_layer(rows)}"], "dff": next(a for c, a in agg.items() if c.startswith("dff"))}


def positive_passes(cells: dict, twin: dict, ident: dict, seeds: int) -> bool:
    """fuse and dff each beat id and their permuted twin on cold HR@10 by more than 2 se."""
    return all(d > 2 * se for k in ("fuse", "dff") for d, se in (versus(cells[k], ident, seeds),
                                                                    versus(cells[k], twin[k], seeds)))


def negative_passes(cells: dict, twin: dict, seeds: int) -> bool:
    """Neither fuse nor dff gains 2 se or more on cold HR@10 over its permuted twin."""
    return all(d < 2 * se for d, se in (versus(cells[k], twin[k], seeds) for k in ("fuse", "dff")))


def _ratio(diff: float, se: float) -> str:
    return f"{diff / se:+.1f}" if se > 0 else ("0" if diff == 0 else f"{math.copysign(math.inf, diff):+}")


def _vs(diff_se: tuple[float, float]) -> str:
    return f"{diff_se[0]:+.4f} ({_ratio(*diff_se)} se)"


def table(title: str, rows: list[dict], twin_rows: list[dict], id_rows: list[dict], data, seeds: int,
          seconds: str) -> tuple[list[str], dict, dict, dict, dict]:
    """Markdown lines for one feature kind next to its permuted twin and id, and the aggregated
    cells (kind, twin, id) and cold mean ranks the criteria read."""
    ident = aggregate(id_rows)[0]
    cells, twin = pick(rows), pick(twin_rows)
    study = StudyConfig()
    lines = [f"### {title}", "",
             f"{data.n_users} users, {data.n_items} items, {int(id_rows[0]['cold_users'])} cold test targets; "
             f"{seeds} seeds; {seconds}; study.id_min_count = {study.id_min_count}, study.id_dropout = "
             f"{study.id_dropout} (every cell); chance cold HR@10 {chance_cold_hr10(data):.4f}", "",
             "| cell | test HR@10 | cold HR@10 | cold mean rank | cold diff vs id | cold diff vs permuted twin |",
             "|---|---|---|---|---|---|"]
    ranks = {}
    for key, a, runs, other in [("id", ident, id_rows, None)] + [(k, cells[k], rows, twin[k]) for k in cells] \
            + [(f"{k} permuted", twin[k], twin_rows, None) for k in twin]:
        r = np.array([cold_mean_rank(x["run_dir"], data) for x in runs if x["cell"] == a["cell"]])
        ranks[key] = r.mean()
        name = a["cell"] if key == "id" else (a["cell"] + (" (permuted)" if "permuted" in key else ""))
        lines.append(f"| {name} | {a['test_HR@10']:.4f} ± {a['test_HR@10_std']:.4f} | "
                     f"{a['test_cold_HR@10']:.4f} ± {a['test_cold_HR@10_std']:.4f} | {r.mean():.1f} ± {r.std(ddof=1):.1f} | "
                     + ("" if key == "id" else _vs(versus(a, ident, seeds))) + " | "
                     + ("" if other is None else _vs(versus(a, other, seeds))) + " |")
    return lines, cells, twin, ident, ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="the cold demo corpus (pairs.tsv, corpus.json)")
    ap.add_argument("--test-features", help="`mvrec extract` Parquet of --corpus' videos (test model)")
    ap.add_argument("--null-corpus", help="the same corpus made with --unrelated-visuals")
    ap.add_argument("--null-features", help="`mvrec extract` Parquet of --null-corpus' videos (test model)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="./.mvrec/bench-controls")
    ap.add_argument("--reuse", action="store_true", help="reuse every grid whose results.csv is in --out; train the rest")
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

    def grid(spec: FeatureSpec, representations: str, where: Path) -> tuple[list[dict], object, str]:
        reuse = args.report_only or (args.reuse and (where / "results.csv").exists())
        t0 = time.perf_counter()
        rows, data = run(pairs, spec, representations, args.seeds, where, reuse)
        took = "reused" if reuse else f"{time.perf_counter() - t0:.0f} s"
        print(f"{where.name}: {took}", flush=True)
        return rows, data, took

    id_rows, _, _ = grid(FeatureSpec(), "id", out / "id")
    kinds = [("oracle", "Positive control: oracle SYNTHETIC topic features", "synthetic",
              FeatureSpec(topics=str(corpus / "corpus.json")))]
    if args.null_corpus and args.null_features:
        kinds.append(("unrelated", "Negative control: TEST MODEL hidden states, corpus with --unrelated-visuals",
                      "null-test-model", FeatureSpec(features=str(extract_to_npz(Path(args.null_features),
                                                                              out / "null-test-model.npz")))))
    if args.test_features:
        kinds.append(("test model", "TEST MODEL hidden states, normal corpus (the videos show the topic)",
                      "test-model", FeatureSpec(features=str(extract_to_npz(Path(args.test_features),
                                                                         out / "test-model.npz")))))
    report, verdicts = [], []
    for kind, title, name, spec in kinds:
        rows, data, took = grid(spec, "fuse,dff", out / name)
        twin_spec = permuted_twin(pairs, spec, out / f"{name}-permuted.npz")
        twin_rows, _, twin_took = grid(twin_spec, "fuse,dff", out / f"{name}-permuted")
        lines, cells, twin, ident, ranks = table(title, rows, twin_rows, id_rows, data, args.seeds,
                                                 f"features {took}, permuted twin {twin_took}")
        if kind == "oracle":
            ok = positive_passes(cells, twin, ident, args.seeds)
            verdicts.append(f"{'PASS' if ok else 'FAIL'} positive control: oracle fuse and dff beat id and their "
                            "permuted twin on cold HR@10 by > 2 se (" + "; ".join(
                                f"{k} {_ratio(*versus(cells[k], ident, args.seeds))} / "
                                f"{_ratio(*versus(cells[k], twin[k], args.seeds))} se" for k in cells) + ")")
        if kind == "unrelated":
            ok = negative_passes(cells, twin, args.seeds)
            verdicts.append(f"{'PASS' if ok else 'FAIL'} negative control: unrelated-visuals fuse and dff gain "
                            "< 2 se over their permuted twin on cold HR@10 (" + "; ".join(
                                f"{k} {_ratio(*versus(cells[k], twin[k], args.seeds))} se" for k in cells) + ")")
            verdicts.append("  not a criterion: their cold HR@10 vs id is " + "; ".join(
                f"{k} {_ratio(*versus(cells[k], ident, args.seeds))} se" for k in cells)
                + f", with cold mean rank fuse {ranks['fuse']:.1f}, dff {ranks['dff']:.1f} against id "
                f"{ranks['id']:.1f}: they spread rare items over the ranking, they do not rank them better")
        print("\n" + "\n".join(lines), flush=True)
        report += [""] + lines
    print("\n== all ==" + "\n".join(report) + "\n\n" + "\n".join(verdicts))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
