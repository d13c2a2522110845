"""The study: grid construction, aggregation, and a small end-to-end run through the Prefect flow."""

import csv
import json

import numpy as np
import pytest

from mvrec.config import StudyConfig, TrainConfig
from recommender.evaluate import metrics_from_ranks
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
    state = study_flow(str(pairs), spec, train_cfg=TrainConfig(dim=16, num_threads=1, patience=2),
                       study_cfg=StudyConfig(seeds=3, max_epochs=3, batch_size=64), out_dir=str(out),
                       return_state=True)
    summary = state.result()

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
    # every unit (cell x seed) is a task run of the flow: a failed one shows, and can be retried, alone
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    units = sorted(r.name for r in runs if r.name.startswith("unit "))
    assert units == sorted(f"unit {c} seed {s}" for c in cells for s in range(3))
    assert all(r.state.is_completed() for r in runs)
    # the caption run recorded the items that had no caption vector
    cfg = json.loads((out / "runs" / "fuse_caption" / "seed0" / "config.json").read_text())
    assert sorted(cfg["features"]["missing_items"]) == sorted(ids[-3:])


def _runs(tmp_path, cell_ranks: dict[str, list[np.ndarray]], cold: np.ndarray) -> list[dict]:
    """Result rows of fake runs whose run directories hold the test ranks, as train() writes them."""
    rows = []
    for cell, per_seed in cell_ranks.items():
        rep, _, source = cell.partition(" ")
        for seed, ranks in enumerate(per_seed):
            run_dir = tmp_path / cell.replace(" ", "_").replace(":", "-") / f"seed{seed}"
            run_dir.mkdir(parents=True)
            np.savez(run_dir / "test_ranks.npz", ranks=ranks, cold=cold)
            metrics = {f"{split}_{m}": float(v) for split, rs in (("valid", ranks), ("test", ranks),
                                                                  ("test_cold", ranks[cold]))
                       for m, v in metrics_from_ranks(rs).items()}
            rows.append({"cell": cell, "representation": rep, "source": source, "layer": None, "seed": seed,
                         **metrics, "run_dir": str(run_dir)})
    return rows


def test_verdict_needs_enough_cold_targets(tmp_path):
    """The demo's case: 4 cold targets, fusion hits one, id none, the same in every seed. The seeds
    agree (std 0), which is no evidence: too few targets to judge, whatever the difference."""
    from recommender.study import write_report

    cold = np.zeros(2000, bool)
    cold[:4] = True
    rng = np.random.default_rng(0)
    base = rng.integers(1, 40, 2000)
    fusion, ident = base.copy(), base.copy()
    fusion[:4], ident[:4] = [1, 50, 50, 50], [50, 50, 50, 50]
    rows = _runs(tmp_path, {"id": [ident] * 3, "fuse hidden:0": [fusion] * 3}, cold)
    summary = write_report(rows, tmp_path)
    verdict = summary["comparison"]["best_hidden_fusion_vs_id_test_cold_HR@10"]
    assert verdict["diff"] == pytest.approx(0.25) and verdict["n_targets"] == 4
    assert verdict["verdict"] == "too few cold targets to judge (4 < 50)" and not verdict["beats_id"]
    md = (tmp_path / "results.md").read_text()
    assert "cold_HR@10: 0.2500 vs 0.0000" in md and "-> too few cold targets to judge (4 < 50)" in md
    assert "-> beats ID-only" not in md
    overall = summary["comparison"]["best_hidden_fusion_vs_id_test_HR@10"]  # 2,000 targets: judged
    assert overall["n_targets"] == 2000 and overall["verdict"] == "does not beat"


def test_paired_bootstrap_verdicts():
    from recommender.study import judge, paired_bootstrap

    rng = np.random.default_rng(1)
    ident = (rng.random((3, 400)) < 0.3).astype(float)
    better = ident.copy()
    better[:, rng.choice(400, 40, replace=False)] = 1.0  # the same targets, plus up to 40 more hits
    v = judge(better, ident, "cold targets")
    assert v["verdict"] == "beats" and v["ci95"][0] > 0 and v["diff"] == pytest.approx(better.mean() - ident.mean())
    assert judge(ident, better, "cold targets")["verdict"] == "is worse than"
    # same hit rate, other targets: no verdict either way
    other = (rng.random((3, 400)) < 0.3).astype(float)
    assert judge(other, ident, "cold targets")["verdict"] == "does not beat"
    # paired: extra hits on the same targets have a far smaller error than two independent draws
    paired, unpaired = judge(better[:1], ident[:1], "cold targets"), judge(other[:1], ident[:1], "cold targets")
    assert paired["se"] < 0.5 * unpaired["se"]
    # the seeds' spread counts too: the same targets with three different seeds widen the interval
    assert v["se"] > paired["se"]
    # seeded: the same draw again, another with another seed
    assert (paired_bootstrap(better, ident, 200) == paired_bootstrap(better, ident, 200)).all()
    assert not (paired_bootstrap(better, ident, 200) == paired_bootstrap(better, ident, 200, seed=1)).all()
