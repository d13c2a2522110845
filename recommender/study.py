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
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

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


@dataclass(frozen=True)
class Unit:
    """One cell with one seed: the unit of work that an engine runs and that a rerun skips when done."""
    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name} seed {self.seed}"

    @property
    def path(self) -> Path:
        """Its run directory under the study directory."""
        return Path("runs") / self.cell.name.replace(" ", "_").replace(":", "-").replace(",", "_") / f"seed{self.seed}"


def units_of(cells: list[Cell], seeds: int) -> list[Unit]:
    return [Unit(cell, seed) for cell in cells for seed in range(seeds)]


def run_unit(data: SeqData, bank: FeatureBank, unit: Unit, train_cfg: TrainConfig, max_batches: int | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `unit` on `bank` in a scratch directory -> {"row": its results row, "files": the run
    directory's files as bytes}. Whatever the engine and the node, the study directory gets the same
    files from the driver (save_unit), so no worker needs to see it."""
    cfg = dataclasses.replace(train_cfg, representation=unit.cell.representation, seed=unit.seed,
                              source=unit.cell.source or train_cfg.source)
    features, meta = resolve_features(bank, cfg, log)
    with tempfile.TemporaryDirectory(prefix="mvrec-unit-") as tmp:
        result = train(data, cfg, features, tmp, meta={**meta, "cell": unit.cell.name}, progress=False, log=log,
                       max_batches=max_batches)
        files = {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}
    row = {
        "cell": unit.cell.name, "representation": unit.cell.representation, "source": unit.cell.source,
        "layer": unit.cell.layer, "seed": unit.seed, "best_epoch": result.best_epoch, "epochs": result.epochs,
        "seconds": round(result.seconds, 2),
        **{f"valid_{m}": result.valid[m] for m in METRICS},
        **{f"test_{m}": result.test[m] for m in METRICS},
        **{f"test_cold_{m}": result.test[f"cold/{m}"] for m in METRICS},
        "cold_users": result.test["cold/n_users"],
        "layer_weights": json.dumps(result.layer_weights) if result.layer_weights else "",
        "run_dir": "",
    }
    return {"row": row, "files": files}


# ---------------------------------------------------------------------------------------------
# Units on disk: written as each finishes, skipped by a rerun of the same study
# ---------------------------------------------------------------------------------------------

def study_key(data: SeqData, bank: FeatureBank, train_cfg: TrainConfig, max_batches: int | None = None) -> str:
    """What a unit's result depends on besides its cell and seed: the interactions, the features
    (a store snapshot's table versions, else the matrices' bytes) and the training config."""
    h = hashlib.sha256()
    h.update(json.dumps([data.users, data.items], separators=(",", ":")).encode())
    for seq in data.seqs:
        h.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
    h.update(json.dumps(bank.snapshot, sort_keys=True, default=str).encode())
    h.update(json.dumps(bank.layers).encode())
    for matrix in (bank.hidden, bank.caption):
        if matrix is None:
            continue
        h.update(f"{str(matrix.dtype).removeprefix('torch.')}{tuple(matrix.shape)}".encode())
        if bank.snapshot.get("kind") != "store":  # a store snapshot names its content already
            raw = matrix.contiguous().view(torch.uint8).numpy() if isinstance(matrix, torch.Tensor) else matrix
            h.update(np.ascontiguousarray(raw).data)
    cfg = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k != "out"}
    h.update(json.dumps([cfg, max_batches], sort_keys=True, default=str).encode())
    return h.hexdigest()


def unit_key(key: str, unit: Unit) -> str:
    return hashlib.sha256(f"{key}/{unit.name}".encode()).hexdigest()


def finished_row(out: Path, unit: Unit, key: str) -> dict[str, Any] | None:
    """The row of `unit` if an earlier run of the same study wrote it (unit.json, written last)."""
    try:
        saved = json.loads((out / unit.path / "unit.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != unit_key(key, unit):
        return None
    return {**saved["row"], "run_dir": str(out / unit.path)}  # where it is now, if the study moved


def save_unit(out: Path, unit: Unit, result: dict[str, Any], key: str) -> dict[str, Any]:
    """Write a finished unit's run directory: its files into a scratch folder, unit.json last, then
    one rename, so a directory with unit.json is complete and a killed write leaves nothing."""
    final = out / unit.path
    partial = final.with_name(f".{final.name}.partial")  # hidden: no glob of run directories sees it
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, blob in result["files"].items():
        if name == "result.json":  # it names the worker's scratch directory
            blob = json.dumps({**json.loads(blob), "run_dir": str(final)}, indent=2).encode()
        (partial / name).write_bytes(blob)
    row = {**result["row"], "run_dir": str(final)}
    (partial / "unit.json").write_text(json.dumps({"key": unit_key(key, unit), "unit": unit.name, "row": row}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return row


def clear_study(out: Path) -> None:
    """--fresh: forget every finished unit and the report."""
    shutil.rmtree(out / "runs", ignore_errors=True)
    for name in ("results.csv", "results.md", "summary.json", "hr10_by_layer.png", "dff_layer_weights.png"):
        (out / name).unlink(missing_ok=True)


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


def write_report(rows: list[dict[str, Any]], out: Path, bank: FeatureBank | None = None,
                 missing: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report of the finished units; `missing` lists the units that failed (unit, cell, seed, error)."""
    if not rows:
        raise ValueError("the study grid is empty: load hidden or caption features, or include 'id'")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    agg = aggregate(rows)
    comparison = _compare(agg, rows)
    (out / "results.md").write_text(markdown_table(agg, comparison, bank) + missing_section(missing or []))
    plots = {"hr10_by_layer": plot_layers(agg, out / "hr10_by_layer.png"),
             "dff_layer_weights": plot_dff_weights(rows, out / "dff_layer_weights.png")}
    summary = {"cells": agg, "comparison": comparison, "features": bank.snapshot if bank else {},
               "missing": missing or [],
               "files": {"results_csv": str(out / "results.csv"), "results_md": str(out / "results.md"),
                         **{k: str(v) for k, v in plots.items() if v}}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def missing_section(missing: list[dict[str, Any]]) -> str:
    if not missing:
        return ""
    cells = sorted({m["cell"] for m in missing})
    lines = [f"- {m['unit']}: {m['error']}" for m in missing]
    return (f"\n## Missing units\n\n{len(missing)} unit(s) failed; cells missing seeds: {', '.join(cells)}. "
            "A rerun runs only these.\n\n" + "\n".join(lines) + "\n")


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
              report: Callable[..., dict[str, Any]] = write_report, cells: list[Cell] | None = None,
              engine: Any = None, call: Callable[[Any, Unit], dict[str, Any]] | None = None, fresh: bool = False,
              max_batches: int | None = None) -> dict[str, Any]:
    """The whole grid (or `cells`) as cell x seed units on `engine` (default: study.engine, see
    recommender/engines.py), every unit on the one loaded `bank`. Each unit's results are saved as it
    finishes; a rerun of the same study skips the saved ones (`fresh` forgets them). A unit that
    still fails after study.retries more tries is reported, and the rest finish. `call(engine, unit)`
    runs one unit (the flow passes a Prefect task; default: engines.run_with_retries)."""
    from recommender.engines import make_engine, run_units, run_with_retries

    out = Path(out_dir or study_cfg.out)
    if fresh:
        clear_study(out)
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = study_train_config(train_cfg, study_cfg)
    key = study_key(data, bank, train_cfg, max_batches)
    call = call or (lambda eng, unit: run_with_retries(eng, unit, study_cfg.retries, log))
    rows: dict[Unit, dict[str, Any]] = {}
    failed: dict[Unit, str] = {}
    counts = {"units": 0, "skipped": 0, "ran": 0}
    engine = engine or make_engine(study_cfg, data, bank, train_cfg, out, max_batches, log)

    def run_all(units: list[Unit]) -> None:
        todo = []
        for unit in units:
            if (row := finished_row(out, unit, key)) is None:
                todo.append(unit)
            else:
                rows[unit] = row
        counts["units"] += len(units)
        counts["skipped"] += len(units) - len(todo)
        log(f"{len(units)} units: {len(units) - len(todo)} finished earlier (skipped), {len(todo)} to run "
            f"on {engine.describe()}")
        for unit, outcome in run_units(engine, todo, call):
            if isinstance(outcome, BaseException):
                failed[unit] = f"{type(outcome).__name__}: {outcome}"
                log(f"{unit.name}: FAILED after {study_cfg.retries + 1} tries: {failed[unit]}")
                continue
            rows[unit] = row = save_unit(out, unit, outcome, key)
            counts["ran"] += 1
            log(f"{unit.name}: valid HR@10 {row['valid_HR@10']:.4f}, test HR@10 {row['test_HR@10']:.4f} "
                f"(cold {row['test_cold_HR@10']:.4f}), {row['epochs']} epochs [{len(rows)}/{counts['units']}]")

    try:
        grid = units_of(cells or build_grid(bank, study_cfg.layers, study_cfg.representations), study_cfg.seeds)
        run_all(grid)
        if "replace" in study_cfg.representations and (layer := best_layer([rows[u] for u in grid if u in rows])) is not None:
            grid += (best := units_of([Cell("replace", f"hidden:{layer}")], study_cfg.seeds))
            run_all(best)
    finally:
        engine.close()
    ordered = [rows[u] for u in grid if u in rows]  # grid order, whichever finished first
    log(f"study: {counts['units']} units, {counts['skipped']} finished earlier (skipped), {counts['ran']} ran, "
        f"{len(failed)} failed")
    missing = [{"unit": u.name, "cell": u.cell.name, "seed": u.seed, "error": e} for u, e in failed.items()]
    return {**report(ordered, out, bank, missing), "units": {**counts, "failed": len(failed)}, "missing": missing}
