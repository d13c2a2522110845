"""SASRec with four item representations: id, replace, fuse and DFF (arXiv 2512.21863).

    item i ── ItemEmbedding ──> e_i  (used both as the input embedding and as the output/candidate one)
    user seq ── e + position ──> causal Transformer blocks ──> h_t ;  score(t, i) = h_t · e_i

Encoder blocks (train.block):
    sasrec   pre-norm LayerNorm, x + Attn(LN x), x + FFN(LN x) with a GELU FFN of 4d (SASRec)
    ligr     RMSNorm and gated residuals, x + σ(W_a n(x))⊙Attn(n x), x + σ(W_f n(x))⊙SwiGLU(n x)
             (LiGR, the layer eSASRec builds on, arXiv 2508.06450; the gates start half open)

Item representations (`features` is a frozen buffer [n_items + 1, L, D], row 0 = padding):
    id       e = E_id[i]                                 (rare items: one shared learned row, see ItemEmbedding)
    replace  e = W h_i                                   (the content vector replaces the ID)
    fuse     e_v = ReLU(W_p h_i);  g = σ(W_g[e_id; e_v] + b);  e = g⊙e_id + (1−g)⊙e_v   (L = 1)
    dff      h_i = Σ_l softmax(w)_l h_{i,l}, then as fuse   (w learned, initialised equal)

The features stay in the dtype they were given (train.features_dtype: float32, bfloat16 or float16)
and are read chunk by chunk (mix_layers, content_rows): a step over every item never holds more than
one chunk of them in another dtype, and autograd keeps no copy of them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mvrec.config import REPRESENTATIONS

CHUNK_ELEMENTS = 1 << 23  # feature elements read per chunk (16 MB of bfloat16)


def _chunks(n: int, row_elements: int):
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return ((s, min(s + step, n)) for s in range(0, n, step))


class _MixLayers(torch.autograd.Function):
    """v [n, D] float32 = Σ_l alpha_l features[rows, l], in chunks of rows; the gradient reaches alpha only.

    Each chunk is multiplied in the features' own dtype (a half-precision matmul accumulates in
    float32 and rounds its [chunk, D] result once); backward reads the features again, chunk by
    chunk, instead of keeping them."""

    @staticmethod
    def forward(ctx, alpha, features, rows):
        n = features.shape[0] if rows is None else len(rows)
        out = torch.empty(n, features.shape[2], dtype=torch.float32, device=features.device)
        a = alpha.detach().to(features.dtype)
        for s, e in _chunks(n, features.shape[1] * features.shape[2]):
            h = features[s:e] if rows is None else features[rows[s:e]]
            out[s:e] = torch.matmul(a, h)
        ctx.save_for_backward(features, rows)
        return out

    @staticmethod
    def backward(ctx, grad):
        features, rows = ctx.saved_tensors
        grad_alpha = torch.zeros(features.shape[1], dtype=torch.float32, device=features.device)
        for s, e in _chunks(len(grad), features.shape[1] * features.shape[2]):
            h = features[s:e] if rows is None else features[rows[s:e]]
            grad_alpha += torch.bmm(h, grad[s:e, :, None].to(h.dtype)).float().sum((0, 2))
        return grad_alpha, None, None


def mix_layers(features: torch.Tensor, alpha: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_l alpha_l features[ids, l] as float32 [..., D] (ids None: every row, [n, D]) without a float32
    copy of the features: each distinct id is mixed once, chunk by chunk."""
    with torch.autocast(features.device.type, enabled=False):
        if ids is None:
            return _MixLayers.apply(alpha.float(), features, None)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        every = len(uniq) == len(features)  # sorted and distinct: every row, read as slices
        return _MixLayers.apply(alpha.float(), features, None if every else uniq)[inverse]


def content_rows(features: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The one feature layer of `ids` (None: every row) as float32 [..., D]."""
    h = features[:, 0] if ids is None else features[ids, 0]
    return h.float()


class ItemEmbedding(nn.Module):
    def __init__(self, n_items: int, dim: int, mode: str = "id", features: torch.Tensor | None = None,
                 id_mask: torch.Tensor | None = None, id_dropout: float = 0.0):
        """The cold-item rule (StudyConfig.id_min_count / id_dropout; off by default):
        id_mask [n_items + 1] (bool): items whose own ID embedding is used; the others (rare items)
        fall back to their content alone (fuse/dff) or, in `id`, which has no content, to one shared
        learned "rare item" row. id_dropout: in training, the share of item occurrences that take
        that fallback too, so it learns what a typical item scores, not only what a rare one does
        (DropoutNet). Every cell of the study gets the same rule, so they treat cold items alike."""
        super().__init__()
        if mode not in REPRESENTATIONS:
            raise ValueError(f"unknown item representation {mode!r} (one of {', '.join(REPRESENTATIONS)})")
        if (mode == "id") != (features is None):
            raise ValueError(f"mode {mode!r} {'takes no' if mode == 'id' else 'needs'} features")
        self.mode, self.n_items, self.id_dropout = mode, n_items, id_dropout
        self._every_content: torch.Tensor | None = None  # set inside content_once()
        if features is not None:
            if not features.is_floating_point():
                raise ValueError(f"features must be floating point, got {features.dtype}")
            if features.dim() == 2:
                features = features[:, None, :]
            if features.shape[0] != n_items + 1:
                raise ValueError(f"features have {features.shape[0]} rows, expected n_items + 1 = {n_items + 1}")
            if mode in ("replace", "fuse") and features.shape[1] != 1:
                raise ValueError(f"mode {mode!r} takes one feature layer, got {features.shape[1]}")
            self.register_buffer("features", features, persistent=False)  # frozen, not in checkpoints
            self.proj = nn.Linear(features.shape[2], dim)
        if mode != "replace":
            self.id = nn.Embedding(n_items + 1, dim, padding_idx=0)
            nn.init.xavier_normal_(self.id.weight)
            with torch.no_grad():
                self.id.weight[0].zero_()
            if id_mask is not None:
                self.register_buffer("id_keep", id_mask.float()[:, None], persistent=False)
        if mode == "id" and (id_mask is not None or id_dropout > 0):
            self.rare = nn.Parameter(torch.randn(dim) * self.id.weight[1:].std().item())
        if mode in ("fuse", "dff"):
            self.gate = nn.Linear(2 * dim, dim)
        if mode == "dff":
            self.layer_logits = nn.Parameter(torch.ones(features.shape[1]))

    def layer_weights(self) -> torch.Tensor | None:
        return F.softmax(self.layer_logits, dim=0) if self.mode == "dff" else None

    @contextmanager
    def content_once(self):
        """Inside, every item's content is computed once, on entry, and indexed after. A step of the
        full softmax then reads the features once for the inputs and the candidates alike (not once
        for each), and an evaluation once for all its batches of users."""
        if self.mode != "id":
            self._every_content = self.content()
        try:
            yield
        finally:
            self._every_content = None

    def content(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Content vectors [..., D] in float32 of `ids` (None: every row)."""
        if self._every_content is not None:
            return self._every_content if ids is None else self._every_content[ids]
        if self.mode == "dff":
            return mix_layers(self.features, self.layer_weights(), ids)
        return content_rows(self.features, ids)

    def id_kept(self, ids: torch.Tensor) -> torch.Tensor | None:
        """[..., 1] 1.0 where an occurrence uses its own ID row, 0.0 where it takes the fallback;
        None when the cold-item rule is off."""
        keep = self.id_keep[ids] if hasattr(self, "id_keep") else None
        if self.training and self.id_dropout > 0:
            drop = (torch.rand(ids.shape + (1,), device=ids.device) >= self.id_dropout).float()
            keep = drop if keep is None else keep * drop
        return keep

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "replace":
            return self.proj(self.content(ids)) * (ids != 0).unsqueeze(-1)
        e_id, keep = self.id(ids), self.id_kept(ids)
        if self.mode == "id":
            if keep is None:
                return e_id
            return (keep * e_id + (1 - keep) * self.rare) * (ids != 0).unsqueeze(-1)
        if keep is not None:
            e_id = e_id * keep
        e_v = F.relu(self.proj(self.content(ids)))
        g = torch.sigmoid(self.gate(torch.cat([e_id, e_v], dim=-1)))
        return (g * e_id + (1 - g) * e_v) * (ids != 0).unsqueeze(-1)  # padding stays zero


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention + FFN (4d)."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; with last_only, only the last position's output [B, 1, C]
        (the same values as slicing the full output, bit for bit on our CPU: attention still runs over
        every query, since one query alone rounds differently; the projection and FFN run on one row)."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        if last_only:
            a, x = a[:, :, -1:], x[:, -1:]
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, x.shape[1], C)))
        return x + self.ffn(self.ln2(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LiGRBlock(Block):
    """Block with RMSNorm, a SwiGLU FFN (hidden 8d/3, the parameters of a 4d GELU FFN) and each
    residual branch scaled by a sigmoid gate computed from the normalised input."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__(dim, n_heads, dropout)
        self.ln1, self.ln2 = RMSNorm(dim), RMSNorm(dim)
        hidden = max(1, 8 * dim // 3)
        self.ffn = SwiGLU(dim, hidden, dropout)
        self.gate_attn, self.gate_ffn = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        n = self.ln1(x)
        q, k, v = self.qkv(n).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        if last_only:
            a, x, n = a[:, :, -1:], x[:, -1:], n[:, -1:]
        a = self.out(a.transpose(1, 2).reshape(B, x.shape[1], C))
        x = x + self.drop(torch.sigmoid(self.gate_attn(n)) * a)
        n = self.ln2(x)
        return x + torch.sigmoid(self.gate_ffn(n)) * self.ffn(n)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.up, self.down, self.drop = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, g = self.up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(g) * u))


BLOCKS = {"sasrec": Block, "ligr": LiGRBlock}  # mvrec.config.BLOCKS


class SASRec(nn.Module):
    def __init__(self, items: ItemEmbedding, max_seq_len: int = 10, dim: int = 64,
                 n_blocks: int = 2, n_heads: int = 2, dropout: float = 0.1, block: str = "sasrec"):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        if block not in BLOCKS:
            raise ValueError(f"unknown encoder block {block!r} ({' | '.join(BLOCKS)})")
        self.items = items
        self.pos = nn.Embedding(max_seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(BLOCKS[block](dim, n_heads, dropout) for _ in range(n_blocks))
        self.ln = RMSNorm(dim) if block == "ligr" else nn.LayerNorm(dim)
        self.n_items, self.dim = items.n_items, dim

    def forward(self, seq: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """seq [B, T] left-padded item indices -> hidden states [B, T, dim] ([B, 1, dim] with last_only:
        the last block then computes only the last position, which is all that scoring needs).
        T may be less than max_seq_len (padding columns trimmed): positions count from the right."""
        B, T = seq.shape
        valid = seq != 0
        P = self.pos.num_embeddings
        x = self.items(seq) * self.dim**0.5 + self.pos(torch.arange(P - T, P, device=seq.device))
        x = self.drop(x) * valid.unsqueeze(-1)
        # Causal, never attend to padding keys; a position always sees itself (no all-masked rows).
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=seq.device)
        mask = (causal & (valid[:, None, :] | eye))[:, None]  # [B, 1, T, T]
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, mask, last) * (valid[:, -1:] if last else valid).unsqueeze(-1)
        return self.ln(x)

    def all_items(self) -> torch.Tensor:
        """Embeddings of every item, [n_items + 1, dim]; row 0 (padding) is zero."""
        return self.items(torch.arange(self.n_items + 1, device=self.pos.weight.device))

    def user_vectors(self, seq: torch.Tensor) -> torch.Tensor:
        return self.forward(seq, last_only=True)[:, -1]  # last position (inputs are left-padded)

    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        return self.user_vectors(seq) @ self.all_items().T

