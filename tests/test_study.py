"""The study: grid construction, aggregation, and a small end-to-end run through the Prefect flow."""

import csv
import json

import numpy as np
import pytest

from mvrec.config import StudyConfig, TrainConfig
from recommender.features import FeatureBank
from recommender.pipeline import FeatureSpec
from recommender.study import Cell, aggregate, best_layer, build_grid
from recommender.synthetic import planted


def test_grid_follows_the_paper():
    bank = FeatureBank(hidden=np.zeros((3, 3, 2)), layers=[0, 1, -1], caption=np.zeros((3, 2)))
    cells = [c.name for c in build_grid(bank)]
    assert cells == ["id", "replace caption", "fuse caption", "fuse hidden:0", "fuse hidden:1", "fuse hidden:-1",
                     "dff hidden:0,1,-1"]
    assert [c.name for c in build_grid(bank, layers="1,final", representations="fuse")] == \
        ["fuse caption", "fuse hidden:1", "fuse hidden:-1"]
    assert Cell("fuse", "hidden:-1").layer == -1 and Cell("dff", "hidden:0,1").layer is None
    with pytest.raises(ValueError, match="unknown"):
        build_grid(bank, representations="id,magic")


def test_best_layer_and_aggregate():
    rows = [{"cell": f"fuse hidden:{l}", "representation": "fuse", "source": f"hidden:{l}", "layer": l, "seed": s,
             "valid_HR@10": v, "test_HR@10": v / 2}
            for l, vals in ((0, (0.1, 0.2, 0.3)), (3, (0.3, 0.4, 0.5))) for s, v in enumerate(vals)]
    assert best_layer(rows) == 3
    agg = {a["cell"]: a for a in aggregate(rows)}
    assert agg["fuse hidden:3"]["valid_HR@10"] == pytest.approx(0.4)
    assert agg["fuse hidden:3"]["valid_HR@10_std"] == pytest.approx(0.1)  # sample std of .3 .4 .5
    assert agg["fuse hidden:0"]["test_HR@10"] == pytest.approx(0.1)


@pytest.mark.slow
def test_small_study_end_to_end_through_the_flow(tmp_path, prefect_harness):
    from flows.study import study_flow

    seqs, feats = planted(200, 80, n_topics=8, layer_signal=(0.0, 1.0, 0.3), dim=8, seed=0)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{u}\t{' '.join(s)}\n" for u, s in seqs.items()))
    ids = list(feats)
    np.savez(tmp_path / "hidden.npz", item_ids=np.array(ids), features=np.stack([feats[i] for i in ids]),
             layers=np.array([0, 1, -1]))
    (tmp_path / "caption.ids.txt").write_text("\n".join(ids[:-3]))  # 3 items without captions: reported
    np.save(tmp_path / "caption.npy", np.stack([feats[i][1] for i in ids[:-3]]))

    out = tmp_path / "study"
    spec = FeatureSpec(features=str(tmp_path / "hidden.npz"), caption_features=str(tmp_path / "caption.npy"))
    summary = study_flow(str(pairs), spec, train_cfg=TrainConfig(dim=16, num_threads=1, patience=2),
                         study_cfg=StudyConfig(seeds=3, max_epochs=3, batch_size=64), out_dir=str(out))

    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    cells = {r["cell"] for r in rows}
    best = best_layer([{**r, "layer": int(r["layer"]) if r["layer"] else None, "valid_HR@10": float(r["valid_HR@10"])}
                       for r in rows])
    assert cells == {"id", "replace caption", "fuse caption", "fuse hidden:0", "fuse hidden:1", "fuse hidden:-1",
                     "dff hidden:0,1,-1", f"replace hidden:{best}"}
    assert len(rows) == 3 * len(cells)
    md = (out / "results.md").read_text()
    assert "± " in md and "dff hidden:0,1,-1" in md and "Hidden-state fusion vs ID-only" in md
    for png in ("hr10_by_layer.png", "dff_layer_weights.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = [json.loads(r["layer_weights"]) for r in rows if r["representation"] == "dff"]
    assert all(len(w) == 3 and sum(w) == pytest.approx(1.0) for w in weights)
    assert summary["comparison"]["best_hidden_fusion"]
    # the caption run recorded the items that had no caption vector
    cfg = json.loads((out / "runs" / "fuse_caption" / "seed0" / "config.json").read_text())
    assert sorted(cfg["features"]["missing_items"]) == sorted(ids[-3:])
