"""Store maintenance (storage/maintenance.py): thresholds, compaction, vacuum and checkpoints
that keep every tag readable, the record `mvrec status` and the run report show."""

from __future__ import annotations

import glob
import os
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from storage import FeatureStore, HiddenStateRow, VideoRow, connect
from storage.maintenance import last_maintenance, maintain, table_health

D = 8
LAYERS = (0, 3)


def _commit(st: FeatureStore, i: int, value: float) -> None:
    """One small night: a video's row and its layers, one commit per table (a file per partition)."""
    seen = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(hours=value)
    st.upsert_videos([VideoRow(f"v{i}", f"/v/{i}.mp4", "s", 10, first_seen=seen, last_seen=seen)])
    st.upsert_hidden_states([HiddenStateRow(f"v{i}", "s", "e", k, np.full(D, value, np.float32)) for k in LAYERS])


def _age_logs(st: FeatureStore, days: float) -> None:
    old = time.time() - days * 86400
    for p in glob.glob(os.path.join(st.root, "*", "_delta_log", "*.json")):
        os.utime(p, (old, old))


@pytest.fixture()
def busy(tmp_path) -> FeatureStore:
    """Many small commits, a tag after the first ones, then rows replaced (files left behind)."""
    st = FeatureStore(tmp_path / "store")
    for i in range(6):
        _commit(st, i, float(i))
    st.tag("early")
    for i in range(6, 24):
        _commit(st, i, float(i))
    for i in range(4):  # replaced rows: their old files are only in older versions
        _commit(st, i, 100.0 + i)
    return st


def test_maintain_compacts_vacuums_and_checkpoints_and_every_tag_still_reads(busy):
    ids = [f"v{i}" for i in range(6)]
    tagged = busy.layer_matrix("e", 3, ids, as_of="early").values
    latest = busy.layer_matrix("e", 3, ids).values
    before = table_health(busy, "hidden_states")
    assert before["small_files"] == 24 and before["checkpoint"] is None and before["since_checkpoint"] > 28

    done = busy.maintain(max_files=10, max_versions=10, retention_hours=0)

    hs = done["hidden_states"]
    assert hs["action"] == "maintained" and hs["files_removed"] == 48 and hs["files_added"] == 2
    assert hs["files_vacuumed"] > 0  # replaced and compacted files no tag needs
    assert hs["after"]["files"] == 2 and hs["after"]["small_files"] == 1 and hs["after"]["since_checkpoint"] == 0
    assert done["videos"]["action"] == "maintained" and done["videos"]["after"]["files"] == 1
    assert done["extractors"]["action"] == "none"  # never written: under both thresholds
    assert not hs["logs_cleaned"]  # the tag pins an older version of it
    # The tagged version's files survived the vacuum; latest reads the compacted files.
    np.testing.assert_array_equal(busy.layer_matrix("e", 3, ids, as_of="early").values, tagged)
    np.testing.assert_array_equal(busy.layer_matrix("e", 3, ids).values, latest)
    with connect(busy, as_of="early") as con:
        assert con.execute("SELECT count(*) FROM hidden_states_history").fetchone() == (12,)
    # Recorded once, as a run; a second pass finds nothing to do and records nothing.
    runs = busy.read("runs")
    mine = [r for r in runs.to_pylist() if r["flow"] == "maintain-store"]
    assert len(mine) == 1 and mine[0]["status"] == "completed" and dict(mine[0]["counts"])["tables"] >= 2
    last = last_maintenance(runs)
    assert last["hidden_states"]["after"]["files"] == 2 and "extractors" not in last
    again = maintain(busy, max_files=10, max_versions=10, retention_hours=0)
    assert {r["action"] for r in again.values()} == {"none"}
    assert len([r for r in busy.read("runs").to_pylist() if r["flow"] == "maintain-store"]) == 1


def test_thresholds_off_or_not_reached_change_nothing(busy):
    version = busy.table("hidden_states").version()
    for kw in ({"max_files": 0, "max_versions": 0}, {"max_files": 100, "max_versions": 100}):
        done = maintain(busy, retention_hours=0, **kw)
        assert {r["action"] for r in done.values()} == {"none"} and not any(r["due"] for r in done.values())
    assert busy.table("hidden_states").version() == version
    done = maintain(busy, max_files=0, max_versions=20, retention_hours=0)  # only the version check
    assert done["hidden_states"]["action"] == "maintained" and done["extractors"]["action"] == "none"
    with pytest.raises(ValueError, match="max_files=-1"):
        maintain(busy, max_files=-1)


def test_old_logs_are_cleaned_only_where_no_tag_needs_them(busy):
    """deltalake cannot load a version whose log entries were cleaned up (so maintenance keeps
    the log of a table a tag pins), and an untagged table's expired log is removed."""
    _age_logs(busy, days=60)
    busy.checkpoint("videos", clean_logs=True)  # what maintenance must not do to a tagged table
    with pytest.raises(FileNotFoundError):  # deltalake: "no Delta table" at that version
        busy.read("videos", as_of="early")

    done = maintain(busy, max_files=0, max_versions=1, retention_hours=0)
    assert not done["hidden_states"]["logs_cleaned"]
    assert busy.layer_matrix("e", 0, ["v1"], as_of="early").values[0, 0] == 1.0
    assert done["snapshots"]["logs_cleaned"]  # no tag pins the tags table itself
    log = glob.glob(os.path.join(busy.root, "snapshots", "_delta_log", "*.json"))
    assert min(int(os.path.basename(p).split(".")[0]) for p in log) == done["snapshots"]["checkpoint"] > 0


def test_status_and_report_show_maintenance(busy):
    from flows.report import refresh_markdown
    from storage.status import store_status

    done = maintain(busy, max_files=10, max_versions=10, retention_hours=0)
    s = store_status(busy, check_files=False)["maintenance"]
    hs = s["hidden_states"]
    assert hs["files"] == 2 and hs["since_checkpoint"] == 0 and hs["last"]["action"] == "maintained"
    text = refresh_markdown({"extract": {}, "extractor_id": "e", "maintenance": done})
    assert "## Store maintenance" in text and "| hidden_states | maintained | 48 → 2 |" in text
