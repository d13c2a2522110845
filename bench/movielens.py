"""How far content moves cold targets in a finished study: per cell, the cold test targets' mean and
median rank and HR@50 / HR@100 over every seed, from the runs' test_ranks.npz (the study's own
report gives HR@10 and the paired bootstrap).

    python bench/movielens.py STUDY_DIR      # e.g. the MovieLens-100K study (docs/recommender.md)

Without the study directory it says so and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def cold_ranks(study: Path) -> dict[str, dict[str, float]]:
    out = {}
    for cell in sorted(p for p in (study / "runs").iterdir() if p.is_dir()):
        runs = [np.load(f) for f in sorted(cell.glob("*/test_ranks.npz"))]
        if not runs:
            continue
        cold = np.concatenate([r["ranks"][r["cold"]] for r in runs])
        out[cell.name] = {"seeds": len(runs), "cold targets": len(cold) // len(runs), "mean rank": cold.mean(),
                          "median rank": float(np.median(cold)), "HR@50": np.mean(cold <= 50),
                          "HR@100": np.mean(cold <= 100)}
    return out


def main() -> None:
    study = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("./.mvrec/study")
    if not (study / "runs").is_dir():
        print(f"SKIP: no study runs in {study}")
        return
    rows = cold_ranks(study)
    print("| cell | seeds | cold targets | cold mean rank | median | cold HR@50 | cold HR@100 |\n|---|---|---|---|---|---|---|")
    for cell, r in rows.items():
        print(f"| {cell} | {r['seeds']} | {r['cold targets']} | {r['mean rank']:.1f} | {r['median rank']:.0f} | "
              f"{r['HR@50']:.3f} | {r['HR@100']:.3f} |")


if __name__ == "__main__":
    main()
