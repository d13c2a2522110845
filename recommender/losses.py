"""Next-item losses that scale with the catalogue: none keeps a [positions, items] logits tensor.

h [P, d] are the encoder outputs at the P non-padding positions, y [P] their targets, E the item
table [n_items + 1, d] (row 0 = padding, never a candidate).

full     exact softmax cross-entropy over the whole catalogue, in row chunks. Each chunk's gradient
         (softmax - one-hot) is formed as soon as its logits exist, so memory is chunk x n_items.
sampled  softmax over the target and K negatives shared by the batch, drawn from Q, each corrected
         by -log(K Q(j)) (logQ): sum_k exp(s_k - log K Q(k)) is then an unbiased estimate of the
         sum of exp(s_j) over the non-target items. Without it K uniform negatives weigh N/K too little.
gbce     gSASRec (RecSys 2023): K uniform negatives shared by the batch, binary cross-entropy with the
         target's probability raised to beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = K / (n_items - 1),
         which undoes the overconfidence that sampling negatives teaches (t = 1: calibrated to the
         full catalogue, t = 0: plain BCE). Its K negatives first push every score down; ranking
         is learnt after that (slower to start than sampled: a tiny run of 100 steps learnt nothing).
bce      the SASRec paper: one uniform negative per position, binary cross-entropy on the target and
         the negative (the pmixer SASRec.pytorch recipe).
`seen` [B, n_items + 1] (bool) marks each user's training items; `rows` [P] maps positions to users.
For full and sampled they leave the softmax (the position's own target never does); bce draws its
negatives outside them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mvrec.config import LOSSES

# `auto` takes the exact full softmax up to this many items, the sampled one above: on Games (23.7k items)
# full was the more accurate at 3x a sampled step; its cost grows with the catalogue (docs/recommender.md).
AUTO_FULL_MAX_ITEMS = 50_000
CHUNK_ELEMENTS = 1 << 22  # logits per chunk of the full softmax: 16 MB of float32


def resolve_loss(loss: str, n_items: int) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r} ({' | '.join(LOSSES)})")
    if loss == "auto":
        return "full" if n_items <= AUTO_FULL_MAX_ITEMS else "sampled"
    return loss


def _block(logits: torch.Tensor, y: torch.Tensor, seen: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    """Mask padding and (optionally) history out of full-catalogue logits, in place, keeping the target."""
    tgt = logits.gather(1, y[:, None])
    if seen is not None:
        logits.masked_fill_(seen[rows], float("-inf"))
    logits[:, 0] = float("-inf")
    logits.scatter_(1, y[:, None], tgt)
    return tgt


class _ChunkedCE(torch.autograd.Function):
    """Mean cross-entropy over the catalogue; the gradient is built chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, items, y, seen, rows, chunk):
        P = h.shape[0]
        grad_h, grad_items = torch.empty_like(h), torch.zeros_like(items)
        total = h.new_zeros(())
        for s in range(0, P, chunk):
            hc, yc = h[s:s + chunk], y[s:s + chunk]
            logits = hc @ items.T
            tgt = _block(logits, yc, seen, None if rows is None else rows[s:s + chunk])
            lse = torch.logsumexp(logits, 1, keepdim=True)
            total += (lse - tgt).sum()
            p = logits.sub_(lse).exp_()  # softmax, in place
            p.scatter_add_(1, yc[:, None], torch.full_like(tgt, -1.0))  # - one-hot
            torch.mm(p, items, out=grad_h[s:s + chunk])
            grad_items.addmm_(p.T, hc)
        ctx.save_for_backward(grad_h.div_(P), grad_items.div_(P))
        return total / P

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_items = ctx.saved_tensors
        return g * grad_h, g * grad_items, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, items: torch.Tensor, y: torch.Tensor, seen: torch.Tensor | None = None,
                          rows: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Equals F.cross_entropy(h @ items.T masked as above, y), in memory chunk x n_items."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // items.shape[0])
    with torch.autocast(h.device.type, enabled=False):  # float32 logits even under bf16 autocast
        return _ChunkedCE.apply(h.float(), items.float(), y, seen, rows, chunk)


def sampled_logits(h: torch.Tensor, pos: torch.Tensor, neg_items: torch.Tensor, neg: torch.Tensor,
                   log_kq: torch.Tensor, y: torch.Tensor, seen: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits [P] and logQ-corrected negative logits [P, K]; a negative that is the target
    (an accidental hit) or in the user's history is -inf, i.e. left out of the estimate."""
    s_pos = (h * pos).sum(-1)
    s_neg = h @ neg_items.T - log_kq
    blocked = neg[None, :] == y[:, None]
    if seen is not None:
        blocked |= seen[:, neg][rows]  # [B, K] first: never a [P, n_items] mask
    return s_pos, s_neg.masked_fill(blocked, float("-inf"))


def sampled_softmax(s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    return (torch.logsumexp(torch.cat([s_pos[:, None], s_neg], 1), 1) - s_pos).mean()


def bce(s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(target) plus mean -log(1 - sigmoid(negative)), as SASRec.pytorch sums them."""
    return (F.binary_cross_entropy_with_logits(s_pos, torch.ones_like(s_pos))
            + F.binary_cross_entropy_with_logits(s_neg, torch.zeros_like(s_neg)))


def gbce(s_pos: torch.Tensor, s_neg: torch.Tensor, n_items: int, t: float) -> torch.Tensor:
    """Mean over the [P, 1 + K] logits of -beta log sigmoid(target) and -log(1 - sigmoid(negative));
    a -inf negative (blocked) adds nothing."""
    K = s_neg.shape[1]
    alpha = K / max(1, n_items - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    neg = F.softplus(s_neg).sum(1)  # -log(1 - sigmoid(s)) = softplus(s); softplus(-inf) = 0
    return (beta * F.softplus(-s_pos) + neg).mean() / (1 + K)


def draw_negatives(n: int, n_items: int, y: torch.Tensor, seen: torch.Tensor | None, rows: torch.Tensor | None,
                   tries: int = 100) -> torch.Tensor:
    """One uniform negative per position, outside the position's target and its user's history."""
    neg = torch.randint(1, n_items + 1, (n,), device=y.device)
    for _ in range(tries):  # resample the few collisions, all at once
        bad = neg == y
        if seen is not None:
            bad |= seen[rows, neg]
        if not bad.any():
            break
        neg[bad] = torch.randint(1, n_items + 1, (int(bad.sum()),), device=y.device)
    return neg


def next_item_loss(model, seq: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None = None,
                   loss: str = "full", num_negatives: int = 1024, q: torch.Tensor | None = None,
                   gbce_t: float = 0.75) -> torch.Tensor:
    """Loss of next-item prediction at every non-padding position of seq/targets [B, T].

    q [n_items + 1]: the sampled and gbce losses' negative distribution (default uniform over 1..n_items)."""
    loss = resolve_loss(loss, model.n_items)
    h = model(seq)
    rows, cols = (targets != 0).nonzero(as_tuple=True)
    h, y = h[rows, cols].float(), targets[rows, cols]
    if loss == "full":
        return chunked_cross_entropy(h, model.all_items(), y, seen, rows)
    if loss == "bce":
        neg = draw_negatives(len(y), model.n_items, y, seen, rows)
        e = model.items(torch.cat([y, neg])).float()
        return bce((h * e[:len(y)]).sum(-1), (h * e[len(y):]).sum(-1))
    K = num_negatives
    if q is None:
        neg = torch.randint(1, model.n_items + 1, (K,), device=y.device)
        log_kq = torch.full((K,), math.log(K / model.n_items), device=y.device)
    else:
        neg = torch.multinomial(q, K, replacement=True)
        log_kq = torch.log(K * q[neg])
    cand, inv = torch.unique(torch.cat([y, neg]), return_inverse=True)
    e = model.items(cand).float()  # each distinct item embedded once
    if loss == "gbce":  # no logQ term: gBCE calibrates through beta instead
        log_kq = torch.zeros_like(log_kq)
    s_pos, s_neg = sampled_logits(h, e[inv[:len(y)]], e[inv[len(y):]], neg, log_kq, y, seen, rows)
    if loss == "gbce":
        return gbce(s_pos, s_neg, model.n_items, gbce_t)
    return sampled_softmax(s_pos, s_neg)
