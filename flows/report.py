"""Run reports as Prefect artifacts: what a flow run extracted, skipped and failed, and the
study's results, readable in the Prefect UI next to the run.

The markdown builders are plain functions of the run's summary dict (tested without Prefect);
`publish` attaches one to the current flow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

FIRST_PATHS = 3  # example paths listed per failure group

COUNTS = (("discovered", "discovered"), ("processed", "extracted"), ("skipped_done", "skipped (done)"),
          ("skipped_broken", "skipped (known broken)"), ("failed", "failed"), ("partial", "partial"))


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def failure_groups(failures: list[dict]) -> list[tuple[str, str, int, list[str]]]:
    """(stage, error_type, count, first paths), largest group first."""
    groups: dict[tuple[str, str], list[str]] = {}
    for f in failures:
        groups.setdefault((f.get("stage", ""), f.get("error_type", "")), []).append(f.get("uri") or f.get("video_id", ""))
    return sorted(((s, e, len(p), p[:FIRST_PATHS]) for (s, e), p in groups.items()), key=lambda g: (-g[2], g[0], g[1]))


def _counts(summary: dict) -> str:
    return _table([label for _, label in COUNTS], [[summary.get(k, 0) for k, _ in COUNTS]])


def extract_markdown(summary: dict) -> str:
    """The extraction run's report: counts, failures by stage and error type (first paths),
    table versions written, videos/s and per-layer embedding norms."""
    seconds = float(summary.get("seconds") or 0.0)
    rate = summary.get("processed", 0) / seconds if seconds > 0 else 0.0
    text = f"# Extraction run `{summary.get('run_id', '')}`\n\n"
    text += (f"Extractor `{summary.get('extractor_id', '')}` · {seconds:.1f} s · "
             f"**{rate:.2f} videos/s** ({summary.get('lvlm_batches', 0)} model batches)\n\n")
    text += _counts(summary)
    note = (summary.get("plane") or {}).get("note")
    if note:  # fewer model replicas than asked for
        text += f"\n**Placement:** {note}\n"
    groups = failure_groups(summary.get("failures") or [])
    text += "\n## Failures by stage and error type\n\n"
    text += _table(["stage", "error type", "videos", f"first {FIRST_PATHS} paths"],
                   [[s, e, n, ", ".join(paths)] for s, e, n, paths in groups]) if groups else "None.\n"
    versions = summary.get("versions") or {}
    text += "\n## Table versions written\n\n"
    text += _table(["table", "version"], sorted(versions.items())) if versions else "No commit.\n"
    norms = summary.get("norms") or {}
    if norms:
        text += "\n## Embedding L2 norms per layer (accepted videos)\n\n"
        text += _table(["layer", "videos", "mean", "std", "min", "max"],
                       [["final" if k == "-1" else k, s.get("count", 0), *(f"{s[c]:.4g}" if c in s else "-"
                                                                          for c in ("mean", "std", "min", "max"))]
                        for k, s in sorted(norms.items(), key=lambda kv: int(kv[0]))])
    return text


def refresh_markdown(result: dict) -> str:
    """The nightly refresh: what extraction did (its own run has the full report), caption vectors
    added, and the retrained model's test metrics."""
    ext = result.get("extract") or {}
    text = f"# Nightly refresh\n\nExtractor `{result.get('extractor_id', '')}`\n\n"
    if "error" in ext:
        text += f"**Extraction failed:** {_cell(ext['error'])}\n\n"
    else:
        text += (f"Extraction run `{ext['run_id']}` (full report: its `extract-features` artifact)\n\n"
                 if ext.get("run_id") else "Nothing new to extract: no extraction run.\n\n")
        text += _counts(ext)
    text += f"\nCaption vectors added: {result.get('captions_embedded', 0)}\n"
    text += maintenance_markdown(result.get("maintenance"))
    test = (result.get("train") or {}).get("test") or {}
    if test:
        metrics = sorted({m for v in test.values() for m in v})
        text += "\n## Retrained recommender (test split)\n\n"
        text += _table(["model", *metrics], [[name, *(f"{v[m]:.4f}" if m in v else "-" for m in metrics)]
                                             for name, v in test.items()])
    return text


def maintenance_markdown(done: dict | None) -> str:
    """The store maintenance step (storage.maintenance.maintain's result): what each table past
    its thresholds went through, files and versions since its checkpoint before and after."""
    if done is None:
        return ""
    text = "\n## Store maintenance\n\n"
    rows = [[name, r["action"], f"{r['before']['files']} → {r.get('after', r['before'])['files']}",
             f"{r['before']['since_checkpoint']} → {r.get('after', r['before'])['since_checkpoint']}",
             r.get("files_vacuumed", "-"), "; ".join(r["due"])]
            for name, r in done.items() if r["action"] != "none"]
    if not rows:
        return text + "No table past its thresholds.\n"
    return text + _table(["table", "action", "files", "versions since checkpoint", "files vacuumed", "why"], rows)


def study_markdown(result: dict) -> str:
    """The study's results table (its results.md) and where its files and plots are."""
    files = result.get("files") or {}
    md = files.get("results_md")
    text = Path(md).read_text() if md and Path(md).is_file() else "# Study results\n\n(results.md not found)\n"
    text += "\n## Files\n\n" + _table(["what", "path"], sorted(files.items()))
    return text


def publish(key: str, markdown: str, description: str = "") -> Any:
    """Attach `markdown` to the current flow run as a markdown artifact under `key`
    (lowercase letters, digits and dashes); returns the artifact id."""
    from prefect.artifacts import create_markdown_artifact

    return create_markdown_artifact(markdown=markdown, key=key, description=description or None)
