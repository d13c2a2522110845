"""Item features in memory: the dtype option (train.features_dtype), the chunked DFF layer mix, a
feature bank shared by views, and the store adapter that loads straight into the dtype."""

import dataclasses
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from mvrec.config import TrainConfig
from recommender import model as model_module
from recommender.features import FeatureBank, load_features
from recommender.losses import next_item_loss
from recommender.model import ItemEmbedding, SASRec, mix_layers
from recommender.train import build_model


@pytest.fixture
def small_chunks(monkeypatch):
    """A few rows per chunk, so the chunk loop runs many times on a small matrix."""
    monkeypatch.setattr(model_module, "CHUNK_ELEMENTS", 3 * 5 * 16)


@pytest.mark.parametrize("rows", [None, "ids"])
def test_mix_layers_equals_einsum_forward_and_backward(small_chunks, rows):
    torch.manual_seed(0)
    feats = torch.randn(50, 5, 16)
    ids = None if rows is None else torch.randint(0, 50, (4, 7))
    logits = torch.randn(5, requires_grad=True)
    grad_out = torch.randn(50 if ids is None else (4, 7), 16) if ids is None else torch.randn(4, 7, 16)

    got = mix_layers(feats, torch.softmax(logits, 0), ids)
    (got * grad_out).sum().backward()
    got_grad, logits.grad = logits.grad.clone(), None
    want = torch.einsum("...ld,l->...d", feats if ids is None else feats[ids], torch.softmax(logits, 0))
    (want * grad_out).sum().backward()
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_grad, logits.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_features_mix_within_their_own_rounding(small_chunks, dtype):
    """A half-precision matmul accumulates in float32 and rounds its result once: the mix is as
    close to the exact mix of the rounded features as the rounding of the features themselves."""
    torch.manual_seed(1)
    feats = torch.randn(40, 5, 16) * 3
    alpha = torch.softmax(torch.randn(5), 0)
    half = feats.to(dtype)
    exact = torch.einsum("nld,l->nd", half.double(), alpha.double())
    got = mix_layers(half, alpha).double()
    storage_error = (torch.einsum("nld,l->nd", feats.double(), alpha.double()) - exact).norm() / exact.norm()
    assert got.dtype == torch.float64 and (got - exact).norm() / exact.norm() < 3 * storage_error


def test_item_embedding_keeps_the_features_dtype_and_memory():
    feats = torch.randn(6, 3, 8).to(torch.bfloat16)
    emb = ItemEmbedding(5, 4, "dff", feats)
    assert emb.features.dtype == torch.bfloat16 and emb.features.data_ptr() == feats.data_ptr()
    assert emb(torch.tensor([[0, 1, 5]])).dtype == torch.float32
    cfg = TrainConfig(representation="dff", dim=4, features_dtype="float16")
    assert build_model(cfg, 5, feats.float().numpy()).items.features.dtype == torch.float16
    as_is = torch.randn(6, 3, 8)
    assert build_model(dataclasses.replace(cfg, features_dtype="float32"), 5, as_is).items.features.data_ptr() == \
        as_is.data_ptr()
    with pytest.raises(ValueError, match="floating point"):
        ItemEmbedding(5, 4, "dff", torch.zeros(6, 3, 8, dtype=torch.int64))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dff_step_saves_no_copy_of_the_features(dtype):
    """The full softmax over every item: autograd keeps nothing of feature size but the buffer itself
    (the old path kept a float32 gather of [n, L, D] for the layer mix's backward)."""
    torch.manual_seed(2)
    n_items, L, D = 300, 6, 32
    feats = torch.randn(n_items + 1, L, D)
    feats[0] = 0
    cfg = TrainConfig(representation="dff", dim=8, features_dtype=dtype)
    model = build_model(cfg, n_items, feats)
    buffer = model.items.features
    seq = torch.randint(1, n_items + 1, (16, 5))
    saved = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = next_item_loss(model, seq[:, :-1], seq[:, 1:], loss="full")
    loss.backward()
    big = [s for s in saved if s[0] >= buffer.numel() // 2]
    assert big and all(ptr == buffer.data_ptr() and dt == buffer.dtype for _, ptr, dt in big)
    assert model.items.layer_logits.grad is not None and model.items.layer_logits.grad.abs().sum() > 0


def test_select_returns_views_of_the_bank():
    hidden = np.random.default_rng(0).standard_normal((5, 4, 3)).astype(np.float32)
    bank = FeatureBank(hidden=hidden, layers=[0, 1, 2, -1])
    for source in ("hidden:all", "hidden:1", "hidden:0,1,2", "hidden:final"):
        assert np.shares_memory(bank.select(source), hidden), source
    assert bank.select("hidden:0,2").tolist() == hidden[:, [0, 2]].tolist()  # not a run: a copy
    half = FeatureBank(hidden=torch.as_tensor(hidden).to(torch.bfloat16), layers=[0, 1, 2, -1])
    assert half.select("hidden:1").data_ptr() == half.hidden[:, 1].data_ptr()


def test_store_features_load_straight_into_the_dtype(tmp_path):
    from storage import ExtractionBatch, ExtractorRecord, FeatureStore, HiddenStateRow

    store = FeatureStore(tmp_path / "store")
    eid = store.upsert_extractor(ExtractorRecord("SYNTHETIC", "", "", "none", "video", "test", dim=4, num_layers=2))
    rng = np.random.default_rng(3)
    vecs = {(v, layer): rng.standard_normal(4).astype(np.float32) for v in "abc" for layer in (0, 1, -1)}
    store.write_batch(ExtractionBatch(hidden_states=[HiddenStateRow(v, f"sha{v}", eid, layer, x)
                                                     for (v, layer), x in vecs.items()]))
    items = ["", "c", "a", "b"]
    full = load_features(items, store=str(tmp_path / "store"), extractor=eid)
    half = load_features(items, store=str(tmp_path / "store"), extractor=eid, dtype="bfloat16")
    assert isinstance(full.hidden, np.ndarray) and full.hidden.dtype == np.float32
    assert half.hidden.dtype == torch.bfloat16 and half.layers == full.layers == [-1, 0, 1]
    assert torch.equal(half.hidden, torch.as_tensor(full.hidden).to(torch.bfloat16))
    assert full.hidden[2, full.layers.index(1)].tolist() == vecs[("a", 1)].tolist() and not full.hidden[0].any()


def test_sasrec_scores_the_same_from_a_float32_or_a_bfloat16_bank():
    """The same weights over float32 features and their bfloat16 copy: item tables within bf16 rounding."""
    torch.manual_seed(4)
    feats = torch.randn(21, 4, 16)
    feats[0] = 0
    full = SASRec(ItemEmbedding(20, 8, "dff", feats), max_seq_len=5, dim=8).eval()
    half = SASRec(ItemEmbedding(20, 8, "dff", feats.to(torch.bfloat16)), max_seq_len=5, dim=8).eval()
    half.load_state_dict(full.state_dict())
    with torch.no_grad():
        a, b = full.all_items(), half.all_items()
    assert (a - b).norm() / a.norm() < 1e-2 and not torch.equal(a, b)


def test_content_once_reads_the_features_once_a_step_with_the_same_loss_and_gradients(monkeypatch):
    torch.manual_seed(5)
    feats = torch.randn(41, 4, 16)
    feats[0] = 0
    cfg = TrainConfig(representation="dff", dim=8, dropout=0.0)
    seq = torch.randint(1, 41, (8, 6))
    mixes = []
    forward = model_module._MixLayers.forward
    monkeypatch.setattr(model_module._MixLayers, "forward", staticmethod(
        lambda ctx, alpha, features, rows: mixes.append(rows) or forward(ctx, alpha, features, rows)))
    grads = []
    for once in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, 40, feats).eval()
        mixes.clear()
        with model.items.content_once() if once else nullcontext():
            loss = next_item_loss(model, seq[:, :-1], seq[:, 1:], loss="full")
        loss.backward()
        grads.append((loss.item(), model.items.layer_logits.grad.clone(), model.items.proj.weight.grad.clone()))
        assert len(mixes) == (1 if once else 2) and (mixes[-1] is None)  # once: every row, as slices
    (l0, a0, w0), (l1, a1, w1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6) and torch.allclose(a0, a1, atol=1e-6) and torch.allclose(w0, w1, atol=1e-6)
    assert model.items._every_content is None  # dropped on exit
