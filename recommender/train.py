"""Train one SASRec model: AdamW, gradient clipping, early stopping on validation HR@10.

A run directory holds:
    config.json     the TrainConfig, the representation, the data and the feature snapshot used
    metrics.csv     one row per epoch (train loss, validation metrics, seconds)
    best.pt         the best checkpoint (encoder weights + the item table, enough to recommend)
    result.json     best epoch, validation and test metrics, DFF layer weights
    test_ranks.npz  the best checkpoint's rank of every user's test target (`ranks`) and which targets
                    are cold (`cold`): the study's bootstrap reads them
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mvrec.config import TrainConfig
from recommender.data import SeqData
from recommender.evaluate import COLD_THRESHOLD, history_mask, split_metrics, split_ranks
from recommender.features import as_dtype
from recommender.losses import next_item_loss, resolve_loss
from recommender.model import ItemEmbedding, SASRec


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    epochs: int
    valid: dict[str, float]
    test: dict[str, float]
    layer_weights: list[float] | None
    seconds: float


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def set_threads(n: int) -> None:
    # Auto: half the cores, at most 4. On a shared CPU, oversubscribed threads are ~10x slower.
    torch.set_num_threads(n if n > 0 else max(1, min(4, (os.cpu_count() or 2) // 2)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, n_items: int, features: np.ndarray | torch.Tensor | None = None,
                train_counts: np.ndarray | None = None) -> SASRec:
    """The model; `features` stay in memory in cfg.features_dtype (no copy when they already are)."""
    feats = None if cfg.representation == "id" else as_dtype(features, cfg.features_dtype)
    id_mask = None  # the cold-item rule (off by default; the study turns it on for every cell)
    if cfg.id_min_count > 0 and cfg.representation != "replace" and train_counts is not None:
        id_mask = torch.as_tensor(train_counts >= cfg.id_min_count)  # rarer items: content / shared row
    items = ItemEmbedding(n_items, cfg.dim, cfg.representation, feats, id_mask,
                          cfg.id_dropout if cfg.representation != "replace" else 0.0)
    return SASRec(items, cfg.max_seq_len, cfg.dim, cfg.n_blocks, cfg.n_heads, cfg.dropout, cfg.block)


def resolve_features(bank, cfg: TrainConfig, log=print) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The feature matrix for cfg.source, and what to record about it (snapshot, missing items)."""
    if cfg.representation == "id":
        return None, {"features": None}
    matrix = bank.select(cfg.source)
    kind = "caption" if cfg.source == "caption" else "hidden"
    missing = bank.missing.get(kind, [])
    if missing:
        msg = f"{len(missing)} of {matrix.shape[0] - 1} items have no {kind} features: " + \
            ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        if cfg.missing_features == "error":
            raise ValueError(msg + " (train.missing_features = error)")
        log(f"warning: {msg}; they get zero vectors (listed in config.json)")
    layers = None if kind == "caption" else [bank.layers[i] for i in bank.layer_positions(cfg.source.split(":", 1)[1])]
    return matrix, {"features": {"source": cfg.source, "layers": layers, "snapshot": bank.snapshot,
                                 "missing_items": missing}}


def length_batches(lengths: np.ndarray, users: np.ndarray, batch_size: int, gen: torch.Generator,
                   bucket: int = 64) -> list[np.ndarray]:
    """Shuffled batches of `users`, each drawn from a run of `bucket` batches sorted by sequence
    length, so a batch's rows have similar lengths and its padding columns can be cut (see train)."""
    order = users[torch.randperm(len(users), generator=gen).numpy()]
    span = batch_size * bucket
    batches = []
    for s in range(0, len(order), span):
        chunk = order[s:s + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def negative_distribution(data: SeqData, sampler: str) -> torch.Tensor | None:
    """Q for the sampled loss: None (uniform) or training popularity, smoothed by +1."""
    if sampler == "uniform":
        return None
    if sampler == "popularity":
        q = torch.as_tensor(data.train_counts + 1, dtype=torch.float64)
        q[0] = 0
        return (q / q.sum()).float()
    raise ValueError(f"unknown train.negative_sampler {sampler!r} (uniform | popularity)")


def lr_scheduler(opt: torch.optim.Optimizer, schedule: str, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """constant, or cosine: lr x (1 + cos(pi x step / total_steps)) / 2, stepped once per batch."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps)
                                                                                         / total_steps)))
    raise ValueError(f"unknown train.lr_schedule {schedule!r} (constant | cosine)")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not enabled, transient=True)


def train(data: SeqData, cfg: TrainConfig, features: np.ndarray | None = None, run_dir: str | Path | None = None,
          meta: dict[str, Any] | None = None, progress: bool = True, log=_stderr,
          on_epoch: Callable[[int, SASRec], bool] | None = None, max_batches: int | None = None) -> RunResult:
    """Train `cfg.representation` on `data`; `features` [n_items + 1, L, D] (or [n+1, D]) unless `id`.

    One line per epoch goes to `log` (stderr by default; a flow's logger in flows); with `progress`
    on a terminal a Rich bar shows the batches as well. `on_epoch(epoch, model)` runs after each
    epoch's validation (bench/games.py measures test accuracy there); True stops training.
    `max_batches` ends each epoch after that many batches (benchmarks time a fixed number of steps)."""
    started = time.perf_counter()
    set_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    loss_name = resolve_loss(cfg.loss, data.n_items)
    run_dir = Path(run_dir or Path(cfg.out) / f"{cfg.representation}-{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({
        "train": dataclasses.asdict(cfg), "loss": loss_name,
        "data": {"source": data.source, "n_users": data.n_users, "n_items": data.n_items,
                 "dropped_users": data.n_dropped_users},
        **(meta or {})}, indent=2, default=str))

    model = build_model(cfg, data.n_items, features, data.train_counts).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = device.type == "cuda"  # bf16 autocast on GPU only
    lengths = (data.train_targets != 0).sum(1)
    train_users = np.flatnonzero(lengths)  # users with >= 1 training target
    hist_ptr, hist_idx = data.history("valid")  # = every item the model trains on, per user
    use_seen = cfg.mask_history or loss_name == "bce"  # bce draws its negatives outside the history
    q = negative_distribution(data, cfg.negative_sampler)
    q = None if q is None else q.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    # Validation during training: all users, or a fixed random subsample (the final metrics use all).
    eval_data = data if not 0 < cfg.eval_users < data.n_users else data.subset(
        np.sort(np.random.default_rng(cfg.seed).choice(data.n_users, cfg.eval_users, replace=False)))
    n_batches = -(-len(train_users) // cfg.batch_size)
    T = data.train_inputs.shape[1]
    # Length-bucketed batches hold very different numbers of positions; weighting each batch's mean
    # loss by its share keeps every position's weight equal, as with random batches.
    mean_positions = lengths[train_users].sum() / n_batches
    sched = lr_scheduler(opt, cfg.lr_schedule, cfg.max_epochs * n_batches)

    best, best_epoch, wait, epoch = -1.0, 0, 0, 0
    fields = ["epoch", "train_loss", "seconds", "train_seconds", "steps", "valid_HR@10", "valid_NDCG@10", "valid_HR@20", "valid_NDCG@20"]
    show_bar = progress and sys.stderr.isatty()
    with open(run_dir / "metrics.csv", "w", newline="") as fh, _progress(show_bar) as bar:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        task = bar.add_task(f"{cfg.representation} seed {cfg.seed}", total=cfg.max_epochs * n_batches, info="")
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            model.train()
            losses = []
            for batch in length_batches(lengths, train_users, cfg.batch_size, gen)[:max_batches]:
                width = int(lengths[batch].max())  # left-padded: columns before T - width are all padding
                seq = torch.as_tensor(data.train_inputs[batch, T - width:], device=device)
                tgt = torch.as_tensor(data.train_targets[batch, T - width:], device=device)
                seen = history_mask(hist_ptr, hist_idx, batch, data.n_items + 1, device) if use_seen else None
                # full: the inputs and the candidates take their content from one pass over the features
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), \
                        (model.items.content_once() if loss_name == "full" else nullcontext()):
                    loss = next_item_loss(model, seq, tgt, seen, loss_name, cfg.num_negatives, q, cfg.gbce_t)
                opt.zero_grad(set_to_none=True)
                (loss * (lengths[batch].sum() / mean_positions)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(task, advance=1, info=f"epoch {epoch} loss {np.mean(losses):.4f}")
            train_s = time.perf_counter() - t0
            valid = split_metrics(ranks(model, eval_data, "valid", cfg, device), eval_data, "valid")
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0,
                   "train_seconds": train_s, "steps": len(losses), **{f"valid_{k}": v for k, v in valid.items()}}
            writer.writerow(row)
            fh.flush()
            improved = valid["HR@10"] > best
            if improved:
                best, best_epoch, wait = valid["HR@10"], epoch, 0
                save_checkpoint(model, data, cfg, run_dir / "best.pt")
            else:
                wait += 1
            log(f"{cfg.representation} seed {cfg.seed} epoch {epoch}: loss {row['train_loss']:.4f}, valid HR@10 "
                f"{valid['HR@10']:.4f} NDCG@10 {valid['NDCG@10']:.4f}, {train_s:.1f}+{row['seconds'] - train_s:.1f} s, "
                f"best {best:.4f} (epoch {best_epoch})")
            bar.update(task, info=f"epoch {epoch} valid HR@10 {valid['HR@10']:.4f} (best {best:.4f})")
            if wait >= cfg.patience or (on_epoch is not None and on_epoch(epoch, model)):
                break

    model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True)["model"])
    valid = split_metrics(ranks(model, data, "valid", cfg, device), data, "valid")
    test_ranks = ranks(model, data, "test", cfg, device)
    _, test_targets = data.targets("test")
    np.savez(run_dir / "test_ranks.npz", ranks=test_ranks.numpy(), cold=data.train_counts[test_targets] < COLD_THRESHOLD)
    test = split_metrics(test_ranks, data, "test")
    weights = model.items.layer_weights()
    result = RunResult(run_dir, best_epoch, epoch, valid, test,
                       None if weights is None else weights.detach().cpu().tolist(), time.perf_counter() - started)
    (run_dir / "result.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}, indent=2))
    return result


def ranks(model: SASRec, data: SeqData, split: str, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """split_ranks (cfg's protocol and batch), every item's content computed once for all batches of users."""
    with torch.no_grad(), model.items.content_once():
        return split_ranks(model, data, split, cfg.eval_batch_size, device, cfg.eval_protocol, seed=cfg.seed)


def save_checkpoint(model: SASRec, data: SeqData, cfg: TrainConfig, path: Path) -> None:
    """Encoder weights plus the item table e_i, so recommending needs no feature matrix."""
    model.eval()
    with torch.no_grad():
        table = model.all_items().float().cpu()
    seqs = data.seqs
    torch.save({
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "item_table": table,
        "train": dataclasses.asdict(cfg),
        "items": data.items,
        "users": data.users,
        "seq_indptr": torch.as_tensor(np.concatenate([[0], np.cumsum([len(s) for s in seqs])])),
        "seq_items": torch.as_tensor(np.concatenate(seqs)),
    }, path)


def load_for_recommend(path: str | Path) -> tuple[SASRec, dict[str, Any]]:
    """A model whose items are the saved item table (an `id` model): no features needed."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, weights_only=True)
    cfg = TrainConfig(**{**ckpt["train"], "representation": "id"})
    model = build_model(cfg, len(ckpt["items"]) - 1)
    encoder = {k: v for k, v in ckpt["model"].items() if not k.startswith("items.")}
    model.load_state_dict(encoder, strict=False)
    with torch.no_grad():
        model.items.id.weight.copy_(ckpt["item_table"])
    return model.eval(), ckpt


@torch.no_grad()
def recommend(model: SASRec, ckpt: dict[str, Any], user: str, k: int = 10) -> list[tuple[str, float]]:
    """Top-k unseen items for a known user, from their whole sequence."""
    users = ckpt["users"]
    try:
        row = users.index(user)
    except ValueError:
        raise KeyError(f"unknown user {user!r}: not in the training data ({len(users)} users, e.g. "
                       f"{', '.join(users[:3])})") from None
    ptr, items = ckpt["seq_indptr"], ckpt["seq_items"]
    seq = items[ptr[row]:ptr[row + 1]]
    T = model.pos.num_embeddings
    inp = torch.zeros(1, T, dtype=torch.long)
    tail = seq[-T:]
    inp[0, T - len(tail):] = tail
    scores = model.score_all(inp)[0]
    scores[0] = float("-inf")
    scores[seq] = float("-inf")  # already watched
    top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
    return [(ckpt["items"][i], s) for i, s in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
