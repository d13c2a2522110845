"""The study at the paper's scale, on SYNTHETIC features (issue 24).

MicroLens-100K has 19,738 items and 100,000 users; with layers = all the store keeps L + 2 rows per
item (the embeddings, the L decoder layers, `final`): 38 x 2,048 for a 3B Qwen2.5-VL-class LVLM
(6.1 GB of float32), 30 x 3,584 for 7B (8.5 GB). No such features exist here, so
this writes SYNTHETIC ones of that shape (seeded N(0, 1): no signal, so the accuracy figures mean
nothing) into a real feature store, the way extraction writes them, and measures the recommender on
them. Each measured phase runs in its own process, so its peak RSS is its own.

    python bench/paper_scale.py                                   # 3B shape
    python bench/paper_scale.py --layers 30 --dim 3584 --dtypes bfloat16   # 7B shape
    python bench/paper_scale.py --items 500 --layers 5 --dim 64 --users 2000 --steps 5   # small, quick

Prints, side by side:
  write      store write time and size (FeatureStore.write_batch, --commit-size videos a commit)
  old vs now one DFF step over every item (full softmax), the old path (features cast to float32,
             gathered and mixed by einsum) against the chunked one, on --legacy-items items: the old
             path needs about 3x the float32 features, more than this machine can give at 3B
  train dff  `mvrec train -r dff`'s functions per features dtype: load time, peak RSS against the
             features' bytes, seconds per step over --steps steps and the epoch projected from them
             (the epoch is not run: say so), accuracy after those steps
  grid       a reduced `mvrec study` (id, fuse on 2 layers, dff on all; 1 seed; --steps steps a run):
             before, each cell loads its own features (as one `mvrec train` per cell does); after,
             the cells share one loaded bank; load time as a share of the grid's wall time
  projection the paper's full grid (cells x seeds x epochs) on this CPU, from the measured steps (an
             upper bound: early stopping may end runs sooner), and on one H200 by bandwidth and
             FLOP arithmetic (a LOWER bound: no GPU was used, peak bandwidth and FLOPs at once,
             SASRec's own layers left out)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MICROLENS = {"users": 100_000, "items": 19_738, "interactions": 719_405}
# One H200 (SXM): HBM3e bandwidth, dense fp32 (non-tensor-core) throughput. The projection
# assumes both at peak and adds a launch floor per step; see project().
H200 = {"bandwidth": 4.8e12, "fp32_flops": 67e12, "step_floor_s": 2e-3}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# SYNTHETIC inputs


def synthetic_interactions(users: int, items: int, mean_len: float, seed: int) -> dict[str, list[str]]:
    """MicroLens-100K's shape: every user >= 5 interactions, mean `mean_len` (a geometric tail), item
    popularity Zipf (weight 1/rank over a random order of the items), every item at least once."""
    rng = np.random.default_rng(seed)
    lengths = 4 + rng.geometric(1 / (mean_len - 4), users)
    weights = 1.0 / np.arange(1, items + 1)
    popular = rng.permutation(items)
    draws = popular[rng.choice(items, int(lengths.sum()) - items, p=weights / weights.sum())]
    pool = rng.permutation(np.concatenate([np.arange(items), draws]))  # each item once, then by popularity
    ends = np.cumsum(lengths)
    return {f"u{u}": [f"v{i:05d}" for i in pool[end - n:end]] for u, (n, end) in enumerate(zip(lengths, ends, strict=True))}


def write_store(store_path: Path, items: int, layers: int, dim: int, commit_size: int, seed: int) -> dict:
    """SYNTHETIC features into a real store through the FeatureStore API, as flows/extract.py writes
    them: the extractor row with dim / num_layers, then one ExtractionBatch (videos, captions, every
    layer's hidden state) per `commit_size` videos."""
    from storage import ExtractionBatch, ExtractorRecord, FeatureStore, VideoRow

    store = FeatureStore(store_path)
    record = ExtractorRecord(model=f"SYNTHETIC-random-{layers}x{dim}", revision="", prompt="SYNTHETIC (bench/paper_scale.py)",
                             frame_policy="none", pooling="video", code_version="bench/paper_scale",
                             params={"synthetic": True, "seed": seed, "distribution": "N(0,1)"},
                             dim=dim, num_layers=layers)
    eid = store.upsert_extractor(record)
    run_id = store.start_run("paper-scale-bench", extractor_id=eid, params={"synthetic": True, "items": items})
    rng = np.random.default_rng(seed)
    started, commits = time.perf_counter(), 0
    for start in range(0, items, commit_size):
        vids = [f"v{i:05d}" for i in range(start, min(start + commit_size, items))]
        feats = rng.standard_normal((len(vids), layers, dim), dtype=np.float32)
        batch = ExtractionBatch()
        for row, vid in enumerate(vids):
            key = {"video_id": vid, "content_sha256": hashlib.sha256(vid.encode()).hexdigest(), "extractor_id": eid}
            batch.videos.append(VideoRow(video_id=vid, uri=f"synthetic://{vid}", content_sha256=key["content_sha256"],
                                         bytes=0, duration_s=10.0, fps=30.0, width=720, height=1280,
                                         frame_count=300, partial=False))
            batch.captions.append({**key, "caption": "SYNTHETIC"})
            batch.hidden_states += [{**key, "layer": layer, "embedding": feats[row, layer]} for layer in range(layers)]
        store.write_batch(batch)
        commits += 1
    seconds = time.perf_counter() - started
    store.finish_run(run_id, counts={"processed": items})
    return {"extractor_id": eid, "seconds": seconds, "commits": commits, "bytes": dir_bytes(store_path),
            "float32_bytes": items * layers * dim * 4}


# ---------------------------------------------------------------------------------------------
# Phases (each in its own process: `--phase NAME`, one JSON line on stdout)


def config(args, **train):
    """The effective config as `mvrec train` / `mvrec study` build it (flags over the defaults)."""
    from mvrec.config import load_config

    overrides = {"store.path": str(args.work / "store"), "train.out": str(args.work / "runs"),
                 "study.out": str(args.work / "study"), "train.num_threads": args.threads, "train.max_epochs": 1,
                 "study.max_epochs": 1, "study.seeds": 1, **{f"train.{k}": v for k, v in train.items()}}
    return load_config(env={}, overrides=overrides)


def load(args, cfg):
    """What `mvrec train` / `mvrec study` load: the split interactions and the feature bank."""
    from recommender.pipeline import FeatureSpec, load_inputs

    t = time.perf_counter()
    data, bank = load_inputs(args.work / "pairs.tsv", cfg.train, FeatureSpec(extractor=args.extractor), cfg.store)
    return data, bank, time.perf_counter() - t


def bank_bytes(bank) -> int:
    import torch

    return sum(torch.as_tensor(m).nbytes for m in (bank.hidden, bank.caption) if m is not None)


def phase_step(args) -> dict:
    """One DFF training step over every item (full softmax), the old path (--legacy) or the chunked one."""
    import torch

    from recommender.features import DTYPES
    from recommender.losses import next_item_loss
    from recommender.train import build_model

    torch.manual_seed(0)
    n, cfg = args.legacy_items, config(args, representation="dff", features_dtype=args.dtype).train
    model = build_model(cfg, n, torch.randn(n + 1, args.layers, args.dim).to(DTYPES[args.dtype]))
    if args.legacy:
        legacy_path(model)
    seq = torch.randint(1, n + 1, (cfg.batch_size, 9))
    times = []
    for _ in range(2):
        t = time.perf_counter()
        with nullcontext() if args.legacy else model.items.content_once():  # as train() runs a step
            loss = next_item_loss(model, seq[:, :-1], seq[:, 1:], loss="full")
        loss.backward()
        times.append(time.perf_counter() - t)
    return {"seconds": min(times), "peak_rss": peak_rss(), "feature_bytes": n * args.layers * args.dim
            * DTYPE_BYTES[args.dtype]}


def legacy_path(model) -> None:
    """The ItemEmbedding before issue 24: the buffer cast to float32, every item's layers gathered
    (a float32 [n, L, D] copy that autograd keeps for backward) and mixed by einsum."""
    import torch

    items = model.items
    items.features = items.features.float()

    def content(ids=None):
        h = items.features[torch.arange(len(items.features)) if ids is None else ids]
        return torch.einsum("...ld,l->...d", h, items.layer_weights())

    items.content = content


def phase_train(args) -> dict:
    """`mvrec train -r dff` from the store, its functions called as the CLI calls them."""
    from recommender.train import resolve_features, train

    cfg = config(args, representation="dff", features_dtype=args.dtype, eval_users=args.eval_users)
    data, bank, load_s = load(args, cfg)
    after_load = rss_now()
    matrix, meta = resolve_features(bank, cfg.train, log=lambda m: None)
    result = train(data, cfg.train, matrix, args.work / "runs" / f"dff-{args.dtype}", meta=meta, progress=False,
                   log=lambda m: print(m, file=sys.stderr), max_batches=args.steps)
    epoch = epoch_row(result.run_dir)
    return {"load_s": load_s, "rss_after_load": after_load, "peak_rss": peak_rss(), "feature_bytes": bank_bytes(bank),
            "users": data.n_users, "items": data.n_items, "batch_size": cfg.train.batch_size,
            "steps": epoch["steps"], "step_s": epoch["train_seconds"] / epoch["steps"],
            "valid_s": epoch["seconds"] - epoch["train_seconds"], "eval_users": args.eval_users,
            "epoch_steps": steps_per_epoch(data, cfg.train.batch_size), "dim": cfg.train.dim,
            "positions_per_user": float((data.train_targets != 0).sum() / ((data.train_targets != 0).sum(1) > 0).sum()),
            "test": {k: result.test[k] for k in ("HR@10", "NDCG@10")}, "seconds": result.seconds}


def epoch_row(run_dir: Path) -> dict:
    import csv

    with open(Path(run_dir) / "metrics.csv") as fh:
        row = list(csv.DictReader(fh))[-1]
    return {k: float(v) for k, v in row.items()}


def steps_per_epoch(data, batch_size: int) -> int:
    return math.ceil(int(((data.train_targets != 0).sum(1) > 0).sum()) / batch_size)


def grid_cells(layers: list[int]):
    """id, fuse on two layers (a third and two thirds of the way up), dff on every layer."""
    from recommender.study import Cell

    picks = [layers[len(layers) // 3], layers[2 * len(layers) // 3]]
    return [Cell("id"), *(Cell("fuse", f"hidden:{layer}") for layer in picks),
            Cell("dff", "hidden:" + ",".join(map(str, layers)))]


def phase_grid(args) -> dict:
    """The reduced study (run_study, as `mvrec study --plain` runs it). before: each cell loads its
    own features, as one `mvrec train` per cell does; after: the cells share one loaded bank."""
    import csv

    from recommender.data import load_sequences
    from recommender.features import FeatureBank
    from recommender.engines import SerialEngine
    from recommender.study import run_study, study_train_config
    from storage import FeatureStore

    cfg = config(args, features_dtype=args.dtype)
    out = args.work / f"study-{args.mode}"
    shutil.rmtree(out, ignore_errors=True)
    loads, cells_s = [], {}
    started = time.perf_counter()
    if args.mode == "after":
        data, bank, seconds = load(args, cfg)
        loads.append(seconds)
    else:
        data = load_sequences(args.work / "pairs.tsv", cfg.train.min_seq_len, cfg.train.max_seq_len)
        bank = FeatureBank(layers=FeatureStore(cfg.store.path, create=False).layers(args.extractor),
                           snapshot={"kind": "store", "extractor_id": args.extractor})

    class Timed(SerialEngine):
        def run(self, unit):
            if args.mode == "before":
                self.data, self.bank, seconds = load(args, cfg)
                loads.append(seconds)
            t = time.perf_counter()
            result = super().run(unit)
            cells_s[unit.cell.name] = time.perf_counter() - t
            return result

    study = dataclasses.replace(cfg.study, representations="id,fuse,dff")
    engine = Timed(data, bank, study_train_config(cfg.train, study), args.steps, log=lambda m: None)
    run_study(data, bank, cfg.train, study, out, engine=engine, cells=grid_cells(bank.layers), max_batches=args.steps)
    wall = time.perf_counter() - started
    with open(out / "results.csv") as fh:
        epochs = {r["cell"]: epoch_row(Path(r["run_dir"])) for r in csv.DictReader(fh)}
    return {"wall_s": wall, "loads_s": loads, "cells_s": cells_s, "peak_rss": peak_rss(),
            "step_s": {c: e["train_seconds"] / e["steps"] for c, e in epochs.items()},
            "valid_s": {c: e["seconds"] - e["train_seconds"] for c, e in epochs.items()},
            "epoch_steps": steps_per_epoch(data, study.batch_size), "batch_size": study.batch_size,
            "layers": len(bank.layers)}


PHASES = {"step": phase_step, "train": phase_train, "grid": phase_grid}


def phase_write(args) -> dict:
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    t = time.perf_counter()
    seqs = synthetic_interactions(args.users, args.items, args.mean_len, args.seed)
    with open(args.work / "pairs.tsv", "w") as fh:
        fh.writelines(f"{u}\t{' '.join(s)}\n" for u, s in seqs.items())
    pairs_s = time.perf_counter() - t
    counts = np.bincount([int(i[1:]) for s in seqs.values() for i in s], minlength=args.items)
    top = np.sort(counts)[::-1]
    return {**write_store(args.work / "store", args.items, args.layers, args.dim, args.commit_size, args.seed),
            "pairs_s": pairs_s, "interactions": int(counts.sum()), "peak_rss": peak_rss(),
            "top1pct_share": float(top[:max(1, args.items // 100)].sum() / counts.sum()),
            "items_under_5": int((counts < 5).sum())}


PHASES["write"] = phase_write


# ---------------------------------------------------------------------------------------------
# The run: phases in child processes, then the report


def child(args, phase: str, **extra) -> dict:
    """Run one phase in a fresh process (its own peak RSS) and return its JSON."""
    flags = {"items": args.items, "layers": args.layers, "dim": args.dim, "users": args.users,
             "mean_len": args.mean_len, "seed": args.seed, "work": args.work, "threads": args.threads,
             "steps": args.steps, "commit_size": args.commit_size, "legacy_items": args.legacy_items,
             "eval_users": args.eval_users, "extractor": args.extractor, "dtype": args.dtype, **extra}
    cmd = [sys.executable, __file__, "--phase", phase]
    for k, v in flags.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"phase {phase} {extra} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def project(args, write: dict, train: dict, grid: dict) -> list[str]:
    """The paper's full grid: id, replace x {caption, best layer}, fuse x {caption, every layer}, dff;
    StudyConfig's seeds and max_epochs. This CPU: an upper bound (early stopping may end sooner).
    H200: a lower bound (peak bandwidth and FLOPs at once, SASRec's own layers not counted)."""
    from mvrec.config import StudyConfig

    study = StudyConfig()
    L, N, U, D = args.layers, args.items, train["users"], args.dim
    step = grid["step_s"]
    fuse_step = np.mean([s for c, s in step.items() if c.startswith("fuse")])
    fuse_valid = np.mean([s for c, s in grid["valid_s"].items() if c.startswith("fuse")])
    dff = next(c for c in step if c.startswith("dff"))
    epoch = {"id": grid["epoch_steps"] * step["id"] + grid["valid_s"]["id"],
             "one layer": grid["epoch_steps"] * fuse_step + fuse_valid,
             "dff": grid["epoch_steps"] * step[dff] + grid["valid_s"][dff]}
    cells = {"id": 1, "one layer": L + 3, "dff": 1}  # replace x2, fuse caption + every layer
    runs = study.seeds * study.max_epochs
    cpu = sum(cells[k] * epoch[k] for k in cells) * runs
    lines = [f"paper grid: {sum(cells.values())} cells ({L} layers) x {study.seeds} seeds x up to "
             f"{study.max_epochs} epochs, batch {grid['batch_size']} ({grid['epoch_steps']} steps an epoch), "
             f"validation on all {U:,} users each epoch",
             f"  this CPU, 1 thread, from the measured steps: id {epoch['id'] / 60:.1f} min an epoch, one-layer cells "
             f"{epoch['one layer'] / 60:.1f}, dff {epoch['dff'] / 60:.1f} -> {cpu / 86400:.1f} days "
             f"({cpu / 3600:.0f} h)"]
    # H200 by arithmetic: bytes over HBM bandwidth plus fp32 FLOPs at peak plus a launch floor per step.
    # A step: the full softmax (forward, and the gradients of the users and the items: 3 products of
    # positions x items x d); a content cell adds the projection of every item (3 products of items x
    # D x d) and reads its features: one layer, written as float32 and read back in backward; dff
    # reads every layer twice (the mix, then its gradient).
    fb = DTYPE_BYTES[args.dtype]
    P = grid["batch_size"] * train["positions_per_user"]
    d = train["dim"]
    softmax_s = 3 * 2 * P * N * d / H200["fp32_flops"]
    proj_s = 3 * 2 * N * D * d / H200["fp32_flops"]
    gpu_step = {"id": softmax_s,
                "one layer": (N * D * fb + 2 * N * D * 4) / H200["bandwidth"] + proj_s + softmax_s,
                "dff": 2 * N * L * D * fb / H200["bandwidth"] + proj_s + softmax_s}
    gpu_valid = 3 * U * N * 4 / H200["bandwidth"] + 2 * U * N * d / H200["fp32_flops"]
    gpu_epoch = {k: grid["epoch_steps"] * (v + H200["step_floor_s"]) + gpu_valid for k, v in gpu_step.items()}
    gpu = sum(cells[k] * gpu_epoch[k] for k in cells) * runs
    lines.append(f"  one H200 (PROJECTION, a LOWER BOUND, no GPU used: {H200['bandwidth'] / 1e12:.1f} TB/s, "
                 f"{H200['fp32_flops'] / 1e12:.0f} TFLOP/s fp32, {H200['step_floor_s'] * 1e3:.0f} ms launch floor a step): "
                 f"dff step {gpu_step['dff'] * 1e3:.2f} ms + floor, epoch {gpu_epoch['dff']:.1f} s -> "
                 f"{gpu / 3600:.1f} h for the grid ({cpu / gpu:.0f}x this CPU)")
    return lines


def report(args, write: dict, steps: dict, trains: dict, grids: dict) -> None:
    shape = f"{args.items:,} items x {args.layers} layers x {args.dim:,}"
    print(f"\n== SYNTHETIC features (seeded N(0,1), no signal): {shape}; {args.users:,} users; "
          f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f} at the end ==")
    print(f"write: {write['interactions']:,} interactions (top 1% of items: {write['top1pct_share']:.0%} of them; "
          f"{write['items_under_5']:,} items with < 5); store {gb(write['bytes'])} on disk for "
          f"{gb(write['float32_bytes'])} of float32 features, written in {write['seconds']:.0f} s "
          f"({write['commits']} commits of {args.commit_size} videos), extractor {write['extractor_id']}")
    old, new = steps["old"], steps["new"]
    print(f"one DFF step over every item (full softmax), {args.legacy_items:,} items, float32: "
          f"old path peak {gb(old['peak_rss'])} = {old['peak_rss'] / old['feature_bytes']:.2f}x the features, "
          f"{old['seconds']:.2f} s; chunked {gb(new['peak_rss'])} = {new['peak_rss'] / new['feature_bytes']:.2f}x, "
          f"{new['seconds']:.2f} s; peak ratio {old['peak_rss'] / new['peak_rss']:.2f}x")
    for dtype, r in trains.items():
        print(f"train dff, features {dtype}: load {r['load_s']:.1f} s ({gb(r['feature_bytes'])} of features); "
              f"peak RSS {gb(r['peak_rss'])} = {r['peak_rss'] / r['feature_bytes']:.2f}x the features "
              f"(+{gb(r['peak_rss'] - r['feature_bytes'])} for data, model, torch; RSS after the load "
              f"{gb(r['rss_after_load'])}); "
              f"{r['step_s']:.2f} s a step over {int(r['steps'])} measured steps of {r['batch_size']} -> "
              f"PROJECTED epoch ({r['epoch_steps']} steps) {r['epoch_steps'] * r['step_s'] / 60:.1f} min + "
              f"validation {r['valid_s']:.0f} s ({r['eval_users']:,} users); test HR@10 {r['test']['HR@10']:.4f} "
              f"after {int(r['steps'])} steps (SYNTHETIC: no signal)")
    if len(trains) > 1:
        a, b = list(trains.values())[:2]
        print(f"  {' vs '.join(trains)}: peak RSS {a['peak_rss'] / b['peak_rss']:.2f}x, step time "
              f"{a['step_s'] / b['step_s']:.2f}x, load {a['load_s'] / b['load_s']:.2f}x")
    for mode, g in grids.items():
        load = sum(g["loads_s"])
        print(f"grid {mode} ({'each cell loads its features' if mode == 'before' else 'one shared bank'}; "
              f"features {args.dtype}; {args.steps} steps a run): wall {g['wall_s']:.0f} s, "
              f"{len(g['loads_s'])} load(s) {load:.0f} s = {load / g['wall_s']:.0%} of the wall time, "
              f"peak RSS {gb(g['peak_rss'])}; s a step: "
              + ", ".join(f"{c} {s:.3f}" for c, s in g["step_s"].items()))
    for line in project(args, write, next(iter(trains.values())), grids["after"]):
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=MICROLENS["items"])
    ap.add_argument("--layers", type=int, default=38, help="rows per item: L + 2 (3B: 38, 7B: 30)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--users", type=int, default=MICROLENS["users"])
    ap.add_argument("--mean-len", type=float, default=MICROLENS["interactions"] / MICROLENS["users"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="store, pairs and runs (default bench/out/paper_scale/SHAPE)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="training steps measured a run (the epoch is projected)")
    ap.add_argument("--commit-size", type=int, default=512, help="videos a store commit")
    ap.add_argument("--legacy-items", type=int, default=None, help="items of the old-vs-chunked step (default: "
                    "all, at most 4,000: the old path needs ~3x the float32 features)")
    ap.add_argument("--eval-users", type=int, default=10_000, help="validation users of `train` (the grid: all)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="features dtypes of the `train dff` runs")
    ap.add_argument("--dtype", default="bfloat16", help="features dtype of the grid")
    ap.add_argument("--reuse", action="store_true", help="keep the store written by an earlier run of this shape")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--extractor", help=argparse.SUPPRESS)
    ap.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("before", "after"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or ROOT / "bench" / "out" / "paper_scale" / f"{args.items}x{args.layers}x{args.dim}"
    args.legacy_items = args.legacy_items or min(args.items, 4000)
    if args.phase:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(PHASES[args.phase](args), default=float))
        return

    marker = args.work / "written.json"
    if args.reuse and marker.is_file():
        write = json.loads(marker.read_text())
        print(f"reusing the store written {write['at']} in {args.work}")
    else:
        write = {**child(args, "write"), "at": time.strftime("%Y-%m-%d %H:%M")}
        marker.write_text(json.dumps(write))
    args.extractor = write["extractor_id"]
    steps = {"old": child(args, "step", dtype="float32", legacy=True), "new": child(args, "step", dtype="float32")}
    trains = {d: child(args, "train", dtype=d) for d in args.dtypes.split(",")}
    grids = {m: child(args, "grid", mode=m) for m in ("before", "after")}
    (args.work / "results.json").write_text(json.dumps({"steps": steps, "trains": trains, "grids": grids}))
    report(args, write, steps, trains, grids)


if __name__ == "__main__":
    main()
