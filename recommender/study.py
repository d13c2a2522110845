"""The paper's systematic study as plain functions: grid -> cells x seeds -> results and report.

Grid (each cell trained with `seeds` seeds):
    id
    fuse    x {caption, every hidden layer}
    dff     x all hidden layers
    replace x {caption, hidden at the best layer}   best = highest mean validation HR@10 of `fuse`
Outputs in the study directory: results.csv (one row per run), results.md (mean ± std per cell),
hr10_by_layer.png, dff_layer_weights.png, summary.json, and runs/<cell>/seed<k>/ run directories.

The verdict "does hidden-state fusion beat ID-only" compares per-target hits: a paired bootstrap
over the test targets (and over each side's seeds), seeded, from every run's test_ranks.npz.
A comparison on fewer than MIN_TARGETS targets gets no verdict ("too few ... to judge").
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mvrec.config import StudyConfig, TrainConfig
from recommender.data import SeqData
from recommender.features import FeatureBank
from recommender.train import resolve_features, train

METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
MIN_TARGETS = 50  # a verdict needs at least this many test targets (cold ones, for the cold comparison)
RESAMPLES = 2000  # bootstrap resamples of each comparison


@dataclass(frozen=True)
class Cell:
    representation: str
    source: str = ""  # "" for id, "caption" or "hidden:<layers>"

    @property
    def name(self) -> str:
        return self.representation if not self.source else f"{self.representation} {self.source}"

    @property
    def layer(self) -> int | None:
        """The single hidden layer of a fuse/replace cell."""
        if self.source.startswith("hidden:") and "," not in self.source and self.source != "hidden:all":
            return int(self.source.split(":")[1])
        return None


def build_grid(bank: FeatureBank, layers: str = "all", representations: str = "id,replace,fuse,dff") -> list[Cell]:
    """Every cell except `replace hidden:<best>`, which needs the fuse results (see best_layer)."""
    reps = {r.strip() for r in representations.split(",") if r.strip()}
    unknown = reps - {"id", "replace", "fuse", "dff"}
    if unknown:
        raise ValueError(f"study.representations: unknown {sorted(unknown)} (id, replace, fuse, dff)")
    hidden = [] if bank.hidden is None else [bank.layers[i] for i in bank.layer_positions(layers)]
    cells = [Cell("id")] if "id" in reps else []
    if "replace" in reps and bank.caption is not None:
        cells.append(Cell("replace", "caption"))
    if "fuse" in reps:
        cells += [Cell("fuse", "caption")] if bank.caption is not None else []
        cells += [Cell("fuse", f"hidden:{layer}") for layer in hidden]
    if "dff" in reps and hidden:
        cells.append(Cell("dff", "hidden:" + ",".join(map(str, hidden))))
    return cells


def best_layer(rows: list[dict[str, Any]]) -> int | None:
    """The hidden layer whose `fuse` cell has the highest mean validation HR@10."""
    by_layer: dict[int, list[float]] = {}
    for r in rows:
        if r["representation"] == "fuse" and r["layer"] not in (None, ""):
            by_layer.setdefault(int(r["layer"]), []).append(r["valid_HR@10"])
    return max(by_layer, key=lambda l: np.mean(by_layer[l])) if by_layer else None


def run_cell(data: SeqData, bank: FeatureBank, cell: Cell, train_cfg: TrainConfig, seeds: int, out_dir: Path,
             progress: bool = False, log: Callable[[str], None] = print,
             max_batches: int | None = None) -> list[dict[str, Any]]:
    """Train `cell` with each seed on the shared `bank` (max_batches: see train)."""
    rows = []
    for seed in range(seeds):
        cfg = dataclasses.replace(train_cfg, representation=cell.representation, seed=seed,
                                  source=cell.source or train_cfg.source)
        features, meta = resolve_features(bank, cfg, log)
        run_dir = out_dir / "runs" / cell.name.replace(" ", "_").replace(":", "-").replace(",", "_") / f"seed{seed}"
        result = train(data, cfg, features, run_dir, meta={**meta, "cell": cell.name}, progress=progress, log=log,
                       max_batches=max_batches)
        rows.append({
            "cell": cell.name, "representation": cell.representation, "source": cell.source,
            "layer": cell.layer, "seed": seed, "best_epoch": result.best_epoch, "epochs": result.epochs,
            "seconds": round(result.seconds, 2),
            **{f"valid_{m}": result.valid[m] for m in METRICS},
            **{f"test_{m}": result.test[m] for m in METRICS},
            **{f"test_cold_{m}": result.test[f"cold/{m}"] for m in METRICS},
            "cold_users": result.test["cold/n_users"],
            "layer_weights": json.dumps(result.layer_weights) if result.layer_weights else "",
            "run_dir": str(result.run_dir),
        })
        log(f"{cell.name} seed {seed}: valid HR@10 {result.valid['HR@10']:.4f}, test HR@10 "
            f"{result.test['HR@10']:.4f} (cold {result.test['cold/HR@10']:.4f}), {result.epochs} epochs")
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell (in first-seen order): mean and sample std of every metric column."""
    cols = [c for c in rows[0] if c.startswith(("valid_", "test_"))] if rows else []
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault(r["cell"], []).append(r)
    out = []
    for name, rs in cells.items():
        agg = {"cell": name, "representation": rs[0]["representation"], "source": rs[0]["source"],
               "layer": rs[0]["layer"], "seeds": len(rs)}
        for c in cols:
            vals = np.array([float(r[c]) for r in rs])
            agg[c] = float(vals.mean())
            agg[c + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def target_hits(rows: list[dict[str, Any]], cell: str, cold: bool, k: int = 10) -> np.ndarray:
    """[seeds, targets] 1.0 where a run of `cell` ranked the test target within k (cold targets only
    with `cold`), from each run's test_ranks.npz; every run of one study has the same targets."""
    hits = []
    for r in rows:
        if r["cell"] == cell:
            saved = np.load(Path(r["run_dir"]) / "test_ranks.npz")
            ranks = saved["ranks"][saved["cold"]] if cold else saved["ranks"]
            hits.append((ranks <= k).astype(np.float64))
    return np.stack(hits)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of mean(a) - mean(b), for a [seeds_a, n] and b [seeds_b, n] measured on
    the same n targets: each resample draws the targets with replacement, the same for both sides
    (paired), and each side's seeds with replacement."""
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    out = np.empty(resamples)
    for i in range(resamples):
        weights = np.bincount(rng.integers(0, n, n), minlength=n) / n
        per_seed_a, per_seed_b = a @ weights, b @ weights
        out[i] = (per_seed_a[rng.integers(0, len(a), len(a))].mean()
                  - per_seed_b[rng.integers(0, len(b), len(b))].mean())
    return out


def judge(a: np.ndarray, b: np.ndarray, what: str, min_targets: int = MIN_TARGETS,
          resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Does a beat b on per-target hits ([seeds, n] each)? "beats" when the bootstrap's 95% interval
    of the difference lies above zero, "is worse than" when below; no verdict under min_targets."""
    n = a.shape[1]
    if n < min_targets:
        verdict = f"too few {what} to judge ({n} < {min_targets})"
    if n == 0:
        nan = float("nan")
        return {"fusion": nan, "id": nan, "diff": nan, "se": nan, "ci95": [nan, nan], "n_targets": 0,
                "seeds": [len(a), len(b)], "verdict": verdict, "beats_id": False}
    boot = paired_bootstrap(a, b, resamples, seed)
    low, high = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    if n >= min_targets:
        verdict = "beats" if low > 0 else "is worse than" if high < 0 else "does not beat"
    return {"fusion": float(a.mean()), "id": float(b.mean()), "diff": float(a.mean() - b.mean()),
            "se": float(boot.std(ddof=1)), "ci95": [low, high], "n_targets": n, "seeds": [len(a), len(b)],
            "verdict": verdict, "beats_id": verdict == "beats"}


def _compare(agg: list[dict[str, Any]], rows: list[dict[str, Any]], min_targets: int = MIN_TARGETS) -> dict[str, Any]:
    """Does hidden-state fusion (best of dff / fuse-at-best-layer by validation) beat ID-only?"""
    by = {a["cell"]: a for a in agg}
    ident = by.get("id")
    fusions = [a for a in agg if a["representation"] in ("fuse", "dff") and a["source"].startswith("hidden:")]
    if ident is None or not fusions:
        return {}
    best = max(fusions, key=lambda a: a["valid_HR@10"])
    dff = next((a for a in agg if a["representation"] == "dff"), None)
    out = {"best_hidden_fusion": best["cell"]}
    for label, a in (("best_hidden_fusion", best), ("dff", dff)):
        if a is None:
            continue
        for part, cold in (("test_HR@10", False), ("test_cold_HR@10", True)):
            out[f"{label}_vs_id_{part}"] = judge(target_hits(rows, a["cell"], cold), target_hits(rows, "id", cold),
                                                 "cold targets" if cold else "test targets", min_targets)
    return out


def write_report(rows: list[dict[str, Any]], out: Path, bank: FeatureBank | None = None) -> dict[str, Any]:
    if not rows:
        raise ValueError("the study grid is empty: load hidden or caption features, or include 'id'")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    agg = aggregate(rows)
    comparison = _compare(agg, rows)
    (out / "results.md").write_text(markdown_table(agg, comparison, bank))
    plots = {"hr10_by_layer": plot_layers(agg, out / "hr10_by_layer.png"),
             "dff_layer_weights": plot_dff_weights(rows, out / "dff_layer_weights.png")}
    summary = {"cells": agg, "comparison": comparison, "features": bank.snapshot if bank else {},
               "files": {"results_csv": str(out / "results.csv"), "results_md": str(out / "results.md"),
                         **{k: str(v) for k, v in plots.items() if v}}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def markdown_table(agg: list[dict[str, Any]], comparison: dict[str, Any], bank: FeatureBank | None) -> str:
    head = ["cell", "seeds", "valid HR@10", *[f"test {m}" for m in METRICS], "cold HR@10", "cold NDCG@10"]
    cols = ["valid_HR@10", *[f"test_{m}" for m in METRICS], "test_cold_HR@10", "test_cold_NDCG@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in agg:
        cells = [f"{a[c]:.4f} ± {a[c + '_std']:.4f}" for c in cols]
        lines.append(f"| {a['cell']} | {a['seeds']} | " + " | ".join(cells) + " |")
    text = "# Study results\n\n"
    if bank is not None:
        text += f"Features: `{json.dumps(bank.snapshot, default=str)}`\n\n"
    text += "Mean ± sample std over seeds; test = leave-one-out last item, full ranking, history masked.\n\n"
    text += "\n".join(lines) + "\n"
    if comparison:
        text += ("\n## Hidden-state fusion vs ID-only\n\nHR@10, mean over seeds; the 95% interval and se come "
                 f"from a paired bootstrap over the test targets and the seeds ({RESAMPLES} resamples, seeded).\n\n")
        for key, v in comparison.items():
            if isinstance(v, dict):
                verdict = v["verdict"] if v["verdict"].startswith("too few") else f"{v['verdict']} ID-only"
                text += (f"- {key.replace('_vs_id_', ' vs id, ').replace('test_', '')}: {v['fusion']:.4f} vs "
                         f"{v['id']:.4f} (diff {v['diff']:+.4f}, 95% CI [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}], "
                         f"se {v['se']:.4f}; {v['n_targets']} targets, {v['seeds'][0]} seeds) -> {verdict}\n")
        text += f"- best hidden fusion by validation: {comparison['best_hidden_fusion']}\n"
    return text


def plot_layers(agg: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fuse = sorted((a for a in agg if a["representation"] == "fuse" and a["layer"] is not None),
                  key=lambda a: (a["layer"] < 0, a["layer"]))
    if not fuse:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(fuse))
    ax.errorbar(xs, [a["test_HR@10"] for a in fuse], yerr=[a["test_HR@10_std"] for a in fuse],
                marker="o", capsize=3, label="fuse (one layer)")
    for a, style in ((next((a for a in agg if a["cell"] == "id"), None), "--"),
                     (next((a for a in agg if a["representation"] == "dff"), None), "-")):
        if a is not None:
            ax.axhline(a["test_HR@10"], linestyle=style, color="k" if style == "--" else "tab:red",
                       label=f"{a['representation']} ({a['test_HR@10']:.3f})")
    cap = next((a for a in agg if a["cell"] == "fuse caption"), None)
    if cap is not None:
        ax.axhline(cap["test_HR@10"], linestyle=":", color="tab:green", label=f"fuse caption ({cap['test_HR@10']:.3f})")
    ax.set_xticks(xs, ["final" if a["layer"] == -1 else str(a["layer"]) for a in fuse])
    ax.set_xlabel("LVLM layer")
    ax.set_ylabel("test HR@10")
    ax.set_title("HR@10 by layer (fuse), with ID-only and DFF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dff_weights(rows: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dff = [r for r in rows if r["representation"] == "dff" and r["layer_weights"]]
    if not dff:
        return None
    weights = np.array([json.loads(r["layer_weights"]) for r in dff])
    layers = dff[0]["source"].split(":", 1)[1].split(",")
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(weights.shape[1])
    ax.bar(xs, weights.mean(0), yerr=weights.std(0), capsize=3)
    ax.axhline(1 / weights.shape[1], linestyle="--", color="k", label="initial (uniform)")
    ax.set_xticks(xs, ["final" if l == "-1" else l for l in layers])
    ax.set_xlabel("LVLM layer")
    ax.set_ylabel("softmax weight")
    ax.set_title(f"DFF learned layer weights (mean over {len(dff)} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def study_train_config(train_cfg: TrainConfig, study_cfg: StudyConfig) -> TrainConfig:
    """The TrainConfig of every cell: the study's keys over train's (the one place they apply)."""
    return dataclasses.replace(train_cfg, max_epochs=study_cfg.max_epochs,
                               batch_size=study_cfg.batch_size, lr=study_cfg.lr,
                               id_min_count=study_cfg.id_min_count, id_dropout=study_cfg.id_dropout)


def run_study(data: SeqData, bank: FeatureBank, train_cfg: TrainConfig, study_cfg: StudyConfig,
              out_dir: str | Path | None = None, progress: bool = False, log: Callable[[str], None] = print,
              run: Callable[..., list[dict[str, Any]]] = run_cell,
              report: Callable[..., dict[str, Any]] = write_report, cells: list[Cell] | None = None) -> dict[str, Any]:
    """The whole grid (or `cells`), every cell on the one loaded `bank`. `run` and `report` default to
    the plain functions; the flow passes them as tasks."""
    out = Path(out_dir or study_cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = study_train_config(train_cfg, study_cfg)
    rows: list[dict[str, Any]] = []
    for cell in cells or build_grid(bank, study_cfg.layers, study_cfg.representations):
        rows += run(data, bank, cell, train_cfg, study_cfg.seeds, out, progress, log)
    if "replace" in study_cfg.representations and (layer := best_layer(rows)) is not None:
        rows += run(data, bank, Cell("replace", f"hidden:{layer}"), train_cfg, study_cfg.seeds, out, progress, log)
    return report(rows, out, bank)
