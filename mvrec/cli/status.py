"""`mvrec status`: one screen of store health (Rich), or the same data as JSON (--json)."""

from __future__ import annotations

import json
import sys

import typer
from rich.table import Table

from mvrec.cli.common import app, console, get_config


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _counts(c: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in c.items())


def _sha(path: str) -> str:
    from tasks.discover import VideoRef, hash_video

    return hash_video(VideoRef(video_id="", uri=path)).content_sha256


@app.command("status")
def status_cmd(
    runs: int = typer.Option(10, "--runs", "-n", min=0, help="How many of the last runs to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON (for scripts)."),
    files: bool = typer.Option(True, "--files/--no-files", help="Check the videos' files for changes since extraction."),
) -> None:
    """Store health: last runs, open failures by reason, extractors, tables and their maintenance,
    changed files, size."""
    from storage import open_store
    from storage.status import store_status

    s = store_status(open_store(get_config().store, create=False), runs=runs, check_files=files, hash_file=_sha)
    if as_json:
        sys.stdout.write(json.dumps(s, indent=1, default=str) + "\n")
        return
    console.print(f"[bold]store[/] {s['store']}  ({_bytes(s['size']['live_bytes'])} live, "
                  f"{_bytes(s['size']['bytes_on_disk'])} on disk with old versions)")

    t = Table("started", "flow", "status", "duration", "counts", title=f"last {len(s['runs'])} runs",
              title_justify="left")
    for r in s["runs"]:
        style = {"completed": "green", "failed": "red", "abandoned": "red", "running": "yellow"}.get(r["status"], "")
        t.add_row(r["started"][:19].replace("T", " "), r["flow"], f"[{style}]{r['status']}[/]" if style else r["status"],
                  "-" if r["duration_s"] is None else f"{r['duration_s']:.1f} s", _counts(r["counts"]))
    console.print(t)
    for r in s["runs"]:
        if r["message"] and r["status"] == "completed":  # a note: e.g. fewer replicas placed than asked
            console.print(f"  note on run {r['run_id']}: {r['message']}", markup=False, highlight=False)

    f = s["failures"]
    t = Table("stage", "error", "videos", "examples", title=f"open failures: {f['open']}", title_justify="left")
    for g in f["by_reason"]:
        t.add_row(g["stage"], g["error_type"], str(g["count"]), ", ".join(e["video_id"] for e in g["examples"]))
    console.print(t)

    t = Table("extractor", "model", "dim", "layers", "videos", "partial", "last run", "newest tag", "tags",
              title="extractors", title_justify="left")
    for e in s["extractors"]:
        last = e["last_run"]
        t.add_row(e["extractor_id"], e["model"], str(e["dim"]), str(len(e["layers"])), str(e["videos_done"]),
                  str(e["partial"]), f"{last['finished'][:16].replace('T', ' ')} {last['status']}" if last else "-",
                  e["newest_tag"] or "-", ", ".join(e["tags"][1:4]) + (" …" if len(e["tags"]) > 4 else ""))
    console.print(t)

    t = Table("table", "version", "files", "most small files in a partition", "versions since checkpoint",
              "last maintained", title="store tables", title_justify="left")
    for name, m in s["maintenance"].items():
        last = m["last"]
        t.add_row(name, str(m["version"]), str(m["files"]), str(m["small_files"]), str(m["since_checkpoint"]),
                  f"{last['finished'][:16].replace('T', ' ')} {last['action']}" if last else "-")
    console.print(t)

    console.print(f"partial videos (fewer frames decoded than the header promises): {s['partial_videos']}")
    changed = s["changed_files"]
    if changed is None:
        console.print("changed files: not checked (--no-files)")
    else:
        console.print(f"videos whose file changed since extraction: {changed['count']}")
        for c in changed["videos"][:10]:
            console.print(f"  {c['video_id']}  {c['reason']}  {c['uri']}", markup=False, highlight=False)
        if changed["count"] > 10:
            console.print(f"  … {changed['count'] - 10} more (--json lists all)")
