"""The training losses: chunked full softmax = plain full softmax, logQ sampled softmax is unbiased, bce by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from recommender.losses import (bce, chunked_cross_entropy, draw_negatives, gbce, next_item_loss, resolve_loss,
                                sampled_logits)
from recommender.model import ItemEmbedding, SASRec

torch.set_num_threads(1)


def _full_ce(h, items, y, seen, rows):
    """The plain way: the whole [P, n_items + 1] logits matrix, masked, then F.cross_entropy."""
    logits = h @ items.T
    block = seen[rows].clone()
    block[:, 0] = True
    block[torch.arange(len(y)), y] = False
    return F.cross_entropy(logits.masked_fill(block, float("-inf")), y)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_cross_entropy_equals_full_values_and_grads(chunk):
    torch.manual_seed(0)
    P, n, d, B = 23, 40, 8, 5
    h = torch.randn(P, d, dtype=torch.float64, requires_grad=True)
    items = torch.randn(n + 1, d, dtype=torch.float64, requires_grad=True)
    y = torch.randint(1, n + 1, (P,))
    rows = torch.randint(0, B, (P,))
    seen = torch.rand(B, n + 1) < 0.3
    seen[rows, y] = True  # a target that is also in the history must stay rankable

    ref = _full_ce(h, items, y, seen, rows)
    g_h, g_e = torch.autograd.grad(ref, (h, items))
    got = chunked_cross_entropy(h.float(), items.float(), y, seen, rows, chunk=chunk)
    gh, ge = torch.autograd.grad(got, (h, items))
    assert abs(got.item() - ref.item()) < 1e-5
    torch.testing.assert_close(gh, g_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(ge, g_e, atol=1e-5, rtol=0)


def test_chunked_cross_entropy_without_history():
    torch.manual_seed(1)
    h, items = torch.randn(9, 4, requires_grad=True), torch.randn(13, 4)
    y = torch.randint(1, 13, (9,))
    logits = (h @ items.T).clone()
    logits[:, 0] = float("-inf")
    torch.testing.assert_close(chunked_cross_entropy(h, items, y, chunk=2), F.cross_entropy(logits, y))


def test_logq_sampled_softmax_is_unbiased_by_enumeration():
    """One negative (K = 1) drawn from Q: the expectation of exp(corrected logit) over Q is the exact
    sum of exp(s_j) over the non-target, non-history items."""
    s = torch.tensor([[0.0, 1.0, -0.5, 2.0, 0.3, -1.2]])  # item 0 = padding
    y = torch.tensor([3])
    seen = torch.tensor([[False, False, True, False, False, False]])  # item 2 is in the history
    q = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.25, 0.15])  # deliberately not uniform
    h, table = torch.eye(6)[:1] * 0 + s, torch.eye(6)  # h @ e_j = s_j
    expect = 0.0
    for j in range(1, 6):
        neg = torch.tensor([j])
        _, s_neg = sampled_logits(h, table[y], table[neg], neg, torch.log(1 * q[neg]), y, seen, torch.tensor([0]))
        expect += q[j].item() * math.exp(s_neg[0, 0].item())  # exp(-inf) = 0 for blocked draws
    exact = sum(math.exp(s[0, j].item()) for j in (1, 4, 5))  # not padding, not the target 3, not history 2
    assert expect == pytest.approx(exact, rel=1e-6)
    # K uniform negatives: the correction is log(K / n); the estimator's mean over many draws matches
    g = torch.Generator().manual_seed(0)
    K, draws, est = 4, 20000, 0.0
    for _ in range(draws):
        neg = torch.randint(1, 6, (K,), generator=g)
        _, s_neg = sampled_logits(h, table[y], table[neg], neg, torch.full((K,), math.log(K / 5)), y, seen,
                                  torch.tensor([0]))
        est += s_neg.exp().sum().item()
    assert est / draws == pytest.approx(exact, rel=0.03)


def test_bce_matches_a_hand_computed_loss():
    s_pos, s_neg = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.5, -3.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = (-sum(math.log(sig(x)) for x in (2.0, -1.0, 0.5)) / 3
               - sum(math.log(1 - sig(x)) for x in (0.0, 1.5, -3.0)) / 3)
    assert bce(s_pos, s_neg).item() == pytest.approx(by_hand, rel=1e-6)


def test_bce_negatives_avoid_target_and_history():
    torch.manual_seed(0)
    y = torch.tensor([1, 2, 3, 4] * 50)
    rows = torch.arange(200) % 2
    seen = torch.zeros(2, 8, dtype=torch.bool)
    seen[0, [1, 3, 5]] = True
    seen[1, [2, 4, 6]] = True
    neg = draw_negatives(200, 7, y, seen, rows)
    assert (neg != y).all() and not seen[rows, neg].any() and ((neg >= 1) & (neg <= 7)).all()


def test_next_item_loss_bce_equals_the_formula_on_the_model():
    torch.manual_seed(0)
    model = SASRec(ItemEmbedding(12, 8, "id"), max_seq_len=4, dim=8).eval()
    seq, tgt = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 2, 3, 9]])
    torch.manual_seed(5)
    got = next_item_loss(model, seq, tgt, None, loss="bce")
    torch.manual_seed(5)
    neg = draw_negatives(3, 12, torch.tensor([2, 3, 9]), None, None)
    h = model(seq)[0, 1:]
    e = model.items.id.weight
    assert got.item() == pytest.approx(bce((h * e[[2, 3, 9]]).sum(-1), (h * e[neg]).sum(-1)).item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["full", "sampled", "gbce"])
def test_loss_masks_history_but_not_the_target(loss):
    torch.manual_seed(0)
    model = SASRec(ItemEmbedding(12, 8, "id"), max_seq_len=4, dim=8).eval()
    seq = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    tgt = torch.tensor([[0, 2, 3, 9], [5, 6, 7, 8]])
    history = torch.zeros(2, 13, dtype=torch.bool)
    history[0, [1, 2, 3, 9]] = True
    history[1, [4, 5, 6, 7, 8]] = True
    got = next_item_loss(model, seq, tgt, history, loss=loss, num_negatives=5)
    assert torch.isfinite(got)
    if loss == "full":  # by hand: each position's softmax excludes padding and the user's other items
        h, items = model(seq), model.all_items()
        expected = []
        for b in range(2):
            for t in range(4):
                if tgt[b, t]:
                    logits = h[b, t] @ items.T
                    keep = ~history[b].clone()
                    keep[0] = False
                    keep[tgt[b, t]] = True
                    expected.append(-torch.log_softmax(logits[keep], 0)[keep[:tgt[b, t] + 1].sum() - 1])
        torch.testing.assert_close(got, torch.stack(expected).mean())


def test_gbce_is_bce_at_t0_and_raises_the_target_to_alpha_at_t1():
    torch.manual_seed(0)
    s_pos, s_neg = torch.randn(6), torch.randn(6, 4)
    s_neg[0, 1] = float("-inf")  # a blocked negative adds nothing
    plain = F.binary_cross_entropy_with_logits(torch.cat([s_pos[:, None], s_neg], 1),
                                               torch.cat([torch.ones(6, 1), torch.zeros(6, 4)], 1), reduction="none")
    plain[0, 2] = 0.0
    n_items = 101  # alpha = K / (n - 1) = 0.04
    torch.testing.assert_close(gbce(s_pos, s_neg, n_items, 0.0), plain.mean())
    calibrated = plain.clone()
    calibrated[:, 0] *= 0.04  # t = 1: beta = alpha, -log sigmoid(s)^beta = beta * -log sigmoid(s)
    torch.testing.assert_close(gbce(s_pos, s_neg, n_items, 1.0), calibrated.mean())


def test_ligr_block_last_only_equals_the_last_row_and_differs_from_sasrec():
    torch.manual_seed(0)
    model = SASRec(ItemEmbedding(20, 8, "id"), max_seq_len=6, dim=8, n_heads=2, block="ligr").eval()
    seq = torch.tensor([[0, 0, 0, 4, 5, 6], [0, 0, 1, 2, 3, 7]])
    torch.testing.assert_close(model(seq, last_only=True)[:, -1], model(seq)[:, -1], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(seq)[:, 2:], model(seq[:, 2:]), atol=1e-6, rtol=0)
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.0.gate_attn.weight" in names and "blocks.0.ffn.up.weight" in names and "blocks.0.ln1.weight" in names
    with pytest.raises(ValueError, match="unknown encoder block"):
        SASRec(ItemEmbedding(20, 8, "id"), dim=8, block="hstu")


def test_trimmed_padding_columns_give_the_same_outputs():
    """Training cuts all-padding columns of a batch; positions count from the right, so nothing moves."""
    torch.manual_seed(0)
    model = SASRec(ItemEmbedding(20, 8, "id"), max_seq_len=6, dim=8, n_heads=2).eval()
    seq = torch.tensor([[0, 0, 0, 4, 5, 6], [0, 0, 1, 2, 3, 7]])
    torch.testing.assert_close(model(seq)[:, 2:], model(seq[:, 2:]), atol=1e-6, rtol=0)


def test_auto_loss_by_catalogue_size():
    assert resolve_loss("auto", 1000) == "full" and resolve_loss("auto", 10**6) == "sampled"
    with pytest.raises(ValueError, match="unknown loss"):
        resolve_loss("inbatch", 10)


def test_cosine_schedule_decays_to_zero_by_step():
    from recommender.train import lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = lr_scheduler(opt, "cosine", total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.4) and seen[5] == pytest.approx(0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert seen == sorted(seen, reverse=True)
    const = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    const_sched = lr_scheduler(const, "constant", 10)
    const.step()
    const_sched.step()
    assert const.param_groups[0]["lr"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_scheduler(opt, "step", 10)
