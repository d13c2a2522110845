"""bench/nightly.py at a tiny size: its own JSON says what a night read and what the store holds.

Slow: three `mvrec refresh` processes (the templates, one night with new and changed files, two
unchanged nights); two of them start Prefect and the text model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import survivors, tagged_env

BENCH = Path(__file__).resolve().parents[1] / "bench" / "nightly.py"


@pytest.mark.slow
def test_unchanged_night_reads_no_video_and_the_store_has_one_row_per_video(tmp_path):
    out = tmp_path / "nightly.json"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MVREC_", "PREFECT_"))}
    env = tagged_env("nightly-bench", {**clean, "OMP_NUM_THREADS": "1"})
    subprocess.run([sys.executable, str(BENCH), "--videos", "200", "--small", "0", "--nights", "1",
                    "--work", str(tmp_path / "work"), "--json", str(out)], env=env, check=True, timeout=800)
    nights = json.loads(out.read_text())
    assert not survivors("nightly-bench")

    first, changed, last = nights["unchanged@large"], nights["night 2"], nights["unchanged@large, last"]
    # Unchanged: every hash comes from the file index, no video byte is read, Prefect never starts.
    for night, videos in ((first, 200), (last, 202)):
        assert (night["hash_reused"], night["hash_read"], night["video_bytes_read_by_check"]) == (videos, 0, 0)
        assert not night["prefect_started"] and night["new_videos"] == 0
        assert night["store"]["videos_rows"] == night["store"]["videos_distinct"] == videos
    # The night between: 2 new files (1% of 200) and 1 changed one are read and extracted, no other.
    assert (changed["hash_read"], changed["new_videos"], changed["prefect_started"]) == (3, 3, True)
    assert changed["captions_embedded"] == 3
