"""Recommender: data parsing and split, feature alignment, the DFF gate, training, recommend."""

import dataclasses
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch

from mvrec.config import StudyConfig, TrainConfig
from recommender.data import build_sequences, read_interactions
from recommender.features import FeatureBank, _align, load_file_features
from recommender.model import ItemEmbedding, SASRec
from recommender.synthetic import planted
from recommender.train import load_for_recommend, recommend, resolve_features, train

torch.set_num_threads(1)


def test_reads_microlens_and_pair_rows(tmp_path):
    ml = tmp_path / "pairs.tsv"
    ml.write_text("user_id\titem_id\n1\t10 11 12\n2\t11\n1\t13\n")
    assert read_interactions(ml) == {"1": ["10", "11", "12", "13"], "2": ["11"]}
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a x\na y\n\nb x\na,z\n")
    assert read_interactions(pairs) == {"a": ["x", "y", "z"], "b": ["x"]}


@pytest.mark.parametrize("body, line", [("1\t10 11\n2\n", 2), ("a x\na y z\n", 2), ("u1 i1\n\t5 6\n", 2)])
def test_malformed_row_names_file_and_line(tmp_path, body, line):
    path = tmp_path / "bad.tsv"
    path.write_text(body)
    with pytest.raises(ValueError, match=rf"bad\.tsv:{line}:"):
        read_interactions(path)


def test_filter_reindex_and_leave_one_out():
    seqs = {"u": ["a", "b", "c", "d", "e", "f"], "short": ["a", "b", "z", "y"], "v": ["c", "a", "g", "h", "i"]}
    data = build_sequences(seqs, min_seq_len=5, max_seq_len=3)
    assert data.users == ["u", "v"] and data.n_dropped_users == 1
    assert data.items == ["", "a", "b", "c", "d", "e", "f", "g", "h", "i"]  # z, y only in a dropped user
    # u = 1..6: train inputs s[:-3] (last 3) -> targets s[1:-2]; valid s[:-2] -> s[-2]; test s[:-1] -> s[-1]
    assert data.train_inputs[0].tolist() == [1, 2, 3]
    assert data.train_targets[0].tolist() == [2, 3, 4]
    assert data.valid_inputs[0].tolist() == [2, 3, 4] and data.valid_targets[0] == 5
    assert data.test_inputs[0].tolist() == [3, 4, 5] and data.test_targets[0] == 6
    # v = c a g h i -> 3 1 7 8 9: left padding
    assert data.train_inputs[1].tolist() == [0, 3, 1] and data.train_targets[1].tolist() == [0, 1, 7]
    indptr, idx = data.history("test")
    assert idx[indptr[1]:indptr[2]].tolist() == [3, 1, 7, 8]
    assert data.train_counts[1] == 2 and data.train_counts[8] == 0


def test_missing_features_are_reported(tmp_path):
    items = ["", "x", "y", "z"]
    np.save(tmp_path / "h.npy", np.ones((2, 3, 4), np.float32))
    (tmp_path / "h.ids.txt").write_text("z\nx\n")
    bank = load_file_features(items, hidden=tmp_path / "h.npy")
    assert bank.missing["hidden"] == ["y"]
    assert bank.hidden.shape == (4, 3, 4) and not bank.hidden[2].any() and bank.hidden[1].all()
    assert "y" in bank.describe_missing()
    logged = []
    X, meta = resolve_features(bank, TrainConfig(representation="fuse", source="hidden:1"), log=logged.append)
    assert X.shape == (4, 1, 4) and meta["features"]["missing_items"] == ["y"] and "y" in logged[0]
    with pytest.raises(ValueError, match="no hidden features"):
        resolve_features(bank, TrainConfig(representation="dff", missing_features="error"))


def test_parquet_long_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"item_id": ["b", "a", "b", "a"], "layer": [0, 0, -1, -1],
                             "embedding": [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]}), tmp_path / "f.parquet")
    bank = load_file_features(["", "a", "b"], hidden=tmp_path / "f.parquet")
    assert bank.layers == [0, -1]
    assert bank.select("hidden:final")[:, 0, 0].tolist() == [0.0, 4.0, 3.0]


def test_dff_with_gate_forced_to_one_equals_id_only():
    torch.manual_seed(0)
    n_items, dim = 30, 16
    feats = torch.randn(n_items + 1, 4, 8)
    dff = SASRec(ItemEmbedding(n_items, dim, "dff", feats), max_seq_len=6, dim=dim).eval()
    ident = SASRec(ItemEmbedding(n_items, dim, "id"), max_seq_len=6, dim=dim).eval()
    ident.load_state_dict(dff.state_dict(), strict=False)  # same encoder and ID embeddings
    with torch.no_grad():
        dff.items.gate.weight.zero_()
        dff.items.gate.bias.fill_(1e4)  # sigmoid -> 1: e = e_id
    seq = torch.tensor([[0, 0, 3, 5, 7, 9], [1, 2, 3, 4, 5, 6]])
    torch.testing.assert_close(dff.score_all(seq), ident.score_all(seq))
    # ...and the gate is live otherwise: the content changes the scores.
    with torch.no_grad():
        dff.items.gate.bias.zero_()
    assert not torch.allclose(dff.score_all(seq), ident.score_all(seq))
    w = dff.items.layer_weights()
    torch.testing.assert_close(w, torch.full((4,), 0.25))  # initialised equal


def _planted_data():
    seqs, feats = planted(500, 300, n_topics=10, layer_signal=(0.0, 1.0), seed=1)
    data = build_sequences(seqs, max_seq_len=10)
    ids = list(feats)
    bank = FeatureBank(layers=[0, 1])
    bank.hidden, bank.missing["hidden"] = _align(ids, np.stack([feats[i] for i in ids]), data.items)
    return data, bank


def test_tiny_training_run_learns_the_planted_signal(tmp_path):
    data, bank = _planted_data()
    cfg = TrainConfig(representation="fuse", source="hidden:1", dim=32, batch_size=64, lr=3e-3, max_epochs=8,
                      patience=3, num_threads=1)
    X, meta = resolve_features(bank, cfg)
    result = train(data, cfg, X, tmp_path / "run", meta=meta, progress=False)
    random_hr10 = 10 / data.n_items
    # Users stick to one of 10 topics: content makes the next item far easier than chance.
    assert result.test["HR@10"] > 4 * random_hr10, result.test
    for name in ("config.json", "metrics.csv", "best.pt", "result.json"):
        assert (tmp_path / "run" / name).is_file()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == result.epochs + 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["features"]["source"] == "hidden:1"

    # Recommend from the checkpoint: no features needed, watched items excluded.
    model, ckpt = load_for_recommend(tmp_path / "run")
    recs = recommend(model, ckpt, data.users[0], k=5)
    assert len(recs) == 5
    seen = {data.items[i] for i in data.seqs[0]}
    assert not seen & {item for item, _ in recs}
    with pytest.raises(KeyError, match="unknown user"):
        recommend(model, ckpt, "nobody", k=5)


def test_seeded_runs_are_deterministic(tmp_path):
    data, _ = _planted_data()
    cfg = TrainConfig(dim=16, batch_size=128, max_epochs=2, num_threads=1, seed=3)
    a = train(data, cfg, None, tmp_path / "a", progress=False)
    b = train(data, cfg, None, tmp_path / "b", progress=False)
    assert a.test == b.test


def test_cli_train_and_recommend(tmp_path):
    seqs, _ = planted(150, 60, seed=2)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{u}\t{' '.join(s)}\n" for u, s in seqs.items()))
    (tmp_path / "items.csv").write_text("item_id,file,title\n" + "".join(f"i{i},v.mp4,title {i}\n" for i in range(60)))
    env_run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from mvrec.cli import main; main()"]
    r = subprocess.run(cmd + ["train", "-i", str(pairs), "--epochs", "2", "--dim", "16", "-o", str(env_run)],
                       capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "MVREC_TRAIN__NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "HR@10" in r.stdout and (env_run / "best.pt").is_file()
    r = subprocess.run(cmd + ["recommend", "--run", str(env_run), "--user", "u0", "--k", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "title" in r.stdout
    r = subprocess.run(cmd + ["recommend", "--run", str(env_run), "--user", "nobody"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown user 'nobody'") and len(r.stderr.strip().splitlines()) == 1


def test_recommend_defaults_to_the_newest_run(tmp_path):
    import os

    from recommender.recommend import latest_run

    with pytest.raises(FileNotFoundError, match="no trained run"):
        latest_run(tmp_path)
    for name, written in (("old", 1_000), ("new", 2_000), ("older", 500)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.pt").write_bytes(b"")
        os.utime(tmp_path / name / "best.pt", (written, written))
    assert latest_run(tmp_path) == tmp_path / "new"


def test_store_adapter_reads_layers_captions_and_records_the_snapshot(tmp_path):
    from storage import CaptionRow, ExtractionBatch, ExtractorRecord, FeatureStore, HiddenStateRow
    from recommender.features import load_features, store_captions

    store = FeatureStore(tmp_path / "store")
    eid = store.upsert_extractor(ExtractorRecord("tiny", "r", "Describe.", "uniform:8", "video", "1", dim=4))
    vids = ["1", "2", "3"]  # item "4" has no features
    store.write_batch(ExtractionBatch(
        captions=[CaptionRow(v, f"sha{v}", eid, f"caption {v}", "minilm", np.full(3, float(v), np.float32)) for v in vids],
        hidden_states=[HiddenStateRow(v, f"sha{v}", eid, layer, np.full(4, 10 * float(v) + layer, np.float32))
                       for v in vids for layer in (0, 1, -1)]))
    store.tag("v1")
    items = ["", "3", "1", "4", "2"]
    bank = load_features(items, store=str(tmp_path / "store"), extractor=eid, as_of="v1")
    assert bank.layers == [-1, 0, 1]
    final = bank.layers.index(-1)
    assert bank.hidden[:, final, 0].tolist() == [0.0, 29.0, 9.0, 0.0, 19.0]
    assert bank.caption[:, 0].tolist() == [0.0, 3.0, 1.0, 0.0, 2.0]
    assert bank.missing == {"hidden": ["4"], "caption": ["4"]}
    assert bank.snapshot["kind"] == "store" and bank.snapshot["versions"] == store.resolve("v1")
    assert store_captions(str(tmp_path / "store"), ["1", "2"], eid) == {"1": "caption 1", "2": "caption 2"}


def test_train_from_store_for_flows(tmp_path):
    from storage import ExtractionBatch, ExtractorRecord, FeatureStore, HiddenStateRow
    from mvrec.config import Config
    from recommender.pipeline import train_from_store

    seqs, feats = planted(120, 40, n_topics=4, seed=3)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{u}\t{' '.join(s)}\n" for u, s in seqs.items()))
    store = FeatureStore(tmp_path / "store")
    eid = store.upsert_extractor(ExtractorRecord("tiny", "r", "Describe.", "uniform:8", "video", "1", dim=16))
    store.write_batch(ExtractionBatch(hidden_states=[HiddenStateRow(i, f"sha{i}", eid, layer, f[k])
                                                     for i, f in feats.items() for k, layer in enumerate((0, -1))]))
    cfg = Config()
    cfg.store.path, cfg.train.out = str(tmp_path / "store"), str(tmp_path / "runs")
    cfg.train.max_epochs, cfg.train.dim, cfg.train.num_threads = 2, 16, 1
    out = train_from_store(cfg, str(pairs), eid)
    assert set(out["test"]) == {"dff", "id"} and "HR@10" in out["test"]["dff"]
    assert out["snapshot"]["versions"] == store.snapshot()
    saved = json.loads((Path(out["runs"]["dff"]) / "config.json").read_text())
    assert saved["features"]["snapshot"]["extractor_id"] == eid


def test_model_evaluator_equals_a_per_user_argsort_loop():
    """evaluate()'s full-ranking path (last-position encoder, reused buffer, in-place count) against
    one user at a time: full forward pass, score all items, mask history, argsort, find the target."""
    from recommender.evaluate import full_ranking_ranks

    seqs, _ = planted(300, 60, n_topics=6, seed=3)
    data = build_sequences(seqs)
    torch.manual_seed(0)
    model = SASRec(ItemEmbedding(data.n_items, 16), 10, 16, 2, 2, 0.1).eval()
    inputs, targets = data.targets("test")
    with torch.no_grad():
        full = model.forward(torch.as_tensor(inputs))[:, -1]
        assert torch.allclose(model.user_vectors(torch.as_tensor(inputs)), full, atol=1e-5)
        ranks = full_ranking_ranks(model, data, "test", batch_size=64).numpy()  # several batches + a short one
        indptr, indices = data.history("test")
        items = model.all_items()
        for u in range(data.n_users):
            s = (model.forward(torch.as_tensor(inputs[u:u + 1]))[0, -1] @ items.T).numpy().astype(np.float64)
            s[0] = -np.inf
            hist = [h for h in indices[indptr[u]:indptr[u + 1]] if h != targets[u]]
            s[hist] = -np.inf
            order = np.argsort(-s, kind="stable")
            loop_rank = int(np.flatnonzero(order == targets[u])[0]) + 1
            # batch-1 and batched matmuls round differently: only a near-tie may move a rank
            near = np.abs(s - s[targets[u]]) < 1e-5
            near[targets[u]] = False
            if near.any():
                assert abs(int(ranks[u]) - loop_rank) <= int(near.sum())
            else:
                assert ranks[u] == loop_rank, u


def test_one_log_line_per_epoch_and_a_validation_subsample(tmp_path):
    data, _ = _planted_data()
    lines = []
    cfg = TrainConfig(dim=16, batch_size=128, max_epochs=3, patience=9, num_threads=1, eval_users=100)
    result = train(data, cfg, None, tmp_path / "run", progress=True, log=lines.append)  # not a terminal here
    assert len(lines) == result.epochs == 3
    assert all(f"epoch {e}: loss " in line and "valid HR@10" in line and "best" in line
               for e, line in enumerate(lines, start=1))
    assert result.test["cold/n_users"] == int((data.train_counts[data.test_targets] < 5).sum())  # final: every user
    sub = data.subset(np.arange(100))
    assert sub.n_users == 100 and sub.train_counts is data.train_counts


@pytest.mark.parametrize("loss,block", [("full", "sasrec"), ("sampled", "sasrec"), ("bce", "sasrec"), ("sampled", "ligr")])
def test_every_loss_trains(tmp_path, loss, block):
    data, _ = _planted_data()
    cfg = TrainConfig(dim=16, batch_size=32, lr=5e-3, max_epochs=6, num_threads=1, loss=loss, num_negatives=64,
                      block=block)
    result = train(data, cfg, None, tmp_path / loss, progress=False, log=lambda m: None)
    assert result.test["HR@10"] > 2 * 10 / data.n_items, result.test  # users follow topics: well above chance


def test_rare_items_are_content_only_and_id_dropout_trains_that_path():
    torch.manual_seed(0)
    feats = torch.randn(6, 2, 4)
    emb = ItemEmbedding(5, 8, "dff", feats, id_mask=torch.tensor([True, True, False, True, True, True]),
                        id_dropout=0.9999).eval()
    ids = torch.tensor([1, 2])
    before = emb(ids).detach().clone()
    with torch.no_grad():
        emb.id.weight.add_(1.0)  # move every ID embedding
    after = emb(ids).detach()
    assert not torch.allclose(before[0], after[0])  # item 1 uses its ID
    torch.testing.assert_close(before[1], after[1])  # item 2 (masked: rare) is content only
    emb.train()  # training: (almost) every occurrence drops its ID
    content_only = emb(ids).detach()
    with torch.no_grad():
        emb.id.weight.add_(1.0)
    torch.testing.assert_close(emb(ids).detach(), content_only)


def test_build_model_masks_items_below_id_min_count():
    from recommender.train import build_model

    counts = np.array([0, 9, 1, 5, 4])
    feats = np.zeros((5, 1, 3), np.float32)
    model = build_model(TrainConfig(representation="fuse", id_min_count=5, dim=8), 4, feats, counts)
    assert model.items.id_keep[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert not hasattr(build_model(TrainConfig(representation="fuse", id_min_count=0, dim=8), 4, feats, counts).items,
                       "id_keep")
    # the id cell gets the same mask (and its shared rare row)
    ident = build_model(TrainConfig(id_min_count=5, id_dropout=0.5, dim=8), 4, None, counts).items
    assert ident.id_keep[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0] and ident.id_dropout == 0.5


def test_the_rule_is_off_by_default_the_papers_models():
    from recommender.train import build_model

    cfg = TrainConfig(dim=8)
    assert (cfg.id_min_count, cfg.id_dropout) == (0, 0.0)
    counts = np.array([0, 9, 1, 5, 4])
    ident = build_model(cfg, 4, None, counts).items
    assert [n for n, _ in ident.named_parameters()] == ["id.weight"] and not hasattr(ident, "id_keep")
    fuse = build_model(dataclasses.replace(cfg, representation="fuse"), 4, np.zeros((5, 1, 3), np.float32), counts)
    assert not hasattr(fuse.items, "id_keep") and fuse.items.id_dropout == 0.0


def test_id_rare_items_share_one_learned_row():
    torch.manual_seed(0)
    emb = ItemEmbedding(5, 8, "id", id_mask=torch.tensor([True, True, False, True, False, True]),
                        id_dropout=0.9999).eval()
    table = emb(torch.arange(6)).detach()
    assert torch.equal(table[0], torch.zeros(8))  # padding stays zero
    torch.testing.assert_close(table[2], emb.rare.detach())
    torch.testing.assert_close(table[4], emb.rare.detach())  # rare items 2 and 4 tie exactly
    torch.testing.assert_close(table[1], emb.id.weight[1].detach())  # frequent items keep their own row
    assert not torch.allclose(table[1], table[3])
    emb.train()  # training: (almost) every occurrence takes the shared row, and the row learns
    out = emb(torch.tensor([[1, 3, 0]]))
    torch.testing.assert_close(out[0, :2].detach(), emb.rare.detach().expand(2, 8))
    out.sum().backward()
    assert emb.rare.grad is not None and emb.rare.grad.abs().sum() > 0


def test_the_study_applies_the_rule_to_every_cell(tmp_path, monkeypatch):
    from recommender.study import run_study
    from recommender.train import build_model

    seqs, item_topic = planted(60, 30, n_topics=3, seed=0)
    data = build_sequences(seqs)
    bank = FeatureBank(hidden=np.random.default_rng(0).standard_normal((data.n_items + 1, 2, 4)), layers=[0, 1])
    seen = {}

    def record(data, bank, unit, train_cfg, *rest, **kwargs):  # the unit's config, no training
        seen[unit.cell.name] = train_cfg
        raise RuntimeError("not trained")

    monkeypatch.setattr("recommender.engines.run_unit", record)
    study = StudyConfig(id_min_count=3, id_dropout=0.25, seeds=1, retries=0)
    run_study(data, bank, TrainConfig(), study, tmp_path, log=lambda m: None,
              report=lambda rows, out, bank, missing: {})
    assert set(seen) == {"id", "fuse hidden:0", "fuse hidden:1", "dff hidden:0,1"}
    for name, cfg in seen.items():
        assert (cfg.id_min_count, cfg.id_dropout) == (3, 0.25), name
        rep = name.split()[0]
        feats = None if rep == "id" else bank.hidden[:, :1 if rep == "fuse" else 2]
        items = build_model(dataclasses.replace(cfg, representation=rep), data.n_items, feats, data.train_counts).items
        assert items.id_keep[1:, 0].tolist() == (data.train_counts[1:] >= 3).astype(float).tolist()
        assert items.id_dropout == 0.25 and hasattr(items, "rare") == (rep == "id")
    assert (StudyConfig().id_min_count, StudyConfig().id_dropout) == (5, 0.5)
