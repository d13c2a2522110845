"""`mvrec extract VIDEO_DIR --model PATH_OR_ID --out FILE.parquet`: features without a store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from mvrec.cli.common import app, console, get_config, test_model_notice, work_started


def _rows(results, failures, info, spec, opts) -> list[dict]:
    """One row per video: the features, or the failure with its reason."""
    common = {"model": info.model, "revision": info.revision, "arch": info.arch,
              "is_test_model": info.is_test_model, "prompt": spec.prompt, "frames": opts.policy}
    rows = []
    for done in results:
        features, meta = done.features, done.meta
        rows.append({
            "video_id": features.video_id, "path": done.ref.uri, "status": "ok", "error_stage": None,
            "error_type": None, "error": None, "caption": features.caption, "layers": [int(k) for k in features.layers],
            "hidden": features.hidden.astype("float32").tolist(), "pooling": features.pooling,
            "n_video_tokens": features.n_video_tokens, "n_prompt_tokens": features.n_prompt_tokens,
            "n_new_tokens": features.n_new_tokens, "num_frames": len(meta.frames_indices),
            "frame_count": meta.total_num_frames, "partial": meta.partial, "fps": meta.fps,
            "duration_s": meta.duration_s, "width": meta.width, "height": meta.height, "rotation": meta.rotation,
            "decoder": meta.backend, "timings": json.dumps({"decode_s": done.decode_s, **features.timings}), **common,
        })
    empty = {key: None for key in ("caption", "layers", "hidden", "n_video_tokens", "n_prompt_tokens", "n_new_tokens",
                                   "num_frames", "frame_count", "partial", "fps", "duration_s", "width", "height",
                                   "rotation", "decoder", "timings")}
    for failure in failures:
        rows.append({"video_id": failure.video_id, "path": failure.uri, "status": "failed",
                     "error_stage": failure.stage, "error_type": failure.error_type, "error": failure.message,
                     "pooling": spec.pooling, **empty, **common})
    return rows


def _quality_gate(results, dim: int) -> tuple[list, list]:
    """The store's quality gate (storage/quality.py) on every vector: a NaN/Inf, wrong-size or
    all-zero embedding makes its video a failed row here too."""
    from storage.quality import check_embedding
    from tasks.lvlm import FINAL_LAYER, Failure

    kept, rejected = [], []
    for done in results:
        problems = [(layer, problem) for layer, vec in zip(done.features.layers, done.features.hidden, strict=True)
                    if (problem := check_embedding(vec, dim))]
        if not problems:
            kept.append(done)
            continue
        layer, (error_type, message) = problems[0]
        where = "final" if layer == FINAL_LAYER else layer
        rejected.append(Failure(done.ref.video_id, done.ref.uri, "model", error_type, f"layer {where}: {message}"))
    return kept, rejected


def _write_parquet(rows: list[dict], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.schema import EXTRACT_FILE

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=EXTRACT_FILE), tmp)
    tmp.replace(out)  # a reader never sees half a file


@app.command("extract")
def extract_cmd(
    video_dir: Path = typer.Argument(..., help="Directory of video files (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Parquet file to write, one row per video."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local directory [extract.model]."),
    frames: Optional[str] = typer.Option(None, "--frames", help="uniform:N or fps:F [extract.frames]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Videos per model batch [extract.batch_size]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="all or e.g. 0,2,final [extract.layers]."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="video | prompt | last [extract.pooling]."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Caption prompt [extract.prompt]."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=0, help="Caption length; 0 skips captions."),
    backend: Optional[str] = typer.Option(None, "--backend", help="transformers | vllm [extract.backend]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N [extract.device]."),
) -> None:
    """Decode the videos in VIDEO_DIR, run the LVLM, write captions and per-layer pooled hidden states."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from tasks.discover import discover_videos
    from tasks.extract import decode_options, extract_spec, extract_videos
    from mvrec.errors import ModelLoadError, one_line
    from tasks.lvlm import check_model_dir, load_backend

    config = get_config(**{
        "extract.model": model, "extract.frames": frames, "extract.batch_size": batch_size,
        "extract.layers": layers, "extract.pooling": pooling, "extract.prompt": prompt,
        "extract.max_new_tokens": max_new_tokens, "extract.backend": backend, "extract.device": device,
    })
    cfg = config.extract
    if not video_dir.exists():
        raise typer.BadParameter(f"{video_dir} does not exist", param_hint="VIDEO_DIR")
    if not video_dir.is_dir():
        raise typer.BadParameter(f"{video_dir} is not a directory", param_hint="VIDEO_DIR")
    refs = discover_videos(video_dir)
    if not refs:
        raise typer.BadParameter(f"no video files in {video_dir}", param_hint="VIDEO_DIR")

    spec, opts = extract_spec(config), decode_options(config)  # the same as the flow's
    check_model_dir(cfg.model)  # a path with no model in it: one line, exit 2
    test_model_notice(cfg.model)
    work_started()
    with console.status(f"loading {cfg.model} ({cfg.backend})"):
        try:
            lvlm = load_backend(cfg.backend, spec)
        except Exception as e:  # noqa: BLE001 - one line naming the model, whatever the backend raised
            raise ModelLoadError(f"model {cfg.model} did not load: {one_line(e)}") from None
    info = lvlm.info
    console.print(f"{info.arch}: {info.num_layers} layers, hidden {info.hidden_size}, {info.dtype} on {info.device}; "
                  f"{len(refs)} videos, batch {cfg.batch_size}, frames {cfg.frames}, pooling {cfg.pooling}")

    start = time.perf_counter()
    columns = [TextColumn("extract"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.2f} videos/s"), TextColumn("ETA"), TimeRemainingColumn(),
               TimeElapsedColumn(), TextColumn("[red]{task.fields[failed]} failed")]
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("extract", total=len(refs), rate=0.0, failed=0)

            def show(done: int, failed: int, total: int) -> None:
                progress.update(task, completed=done, rate=done / max(time.perf_counter() - start, 1e-9), failed=failed)

            results, failures = extract_videos(refs, lvlm, batch_size=cfg.batch_size, opts=opts, on_progress=show,
                                               decode_workers=cfg.decode_workers)
    finally:
        lvlm.close()
    elapsed = time.perf_counter() - start
    results, rejected = _quality_gate(results, info.hidden_size)
    failures += rejected
    _write_parquet(_rows(results, failures, info, spec, opts), out)
    console.print(f"wrote {out}: {len(results)} ok, {len(failures)} failed, "
                  f"{len(refs) / elapsed:.2f} videos/s over {elapsed:.1f} s")
    for failure in failures[:10]:
        console.print(f"  [red]failed[/] {failure.uri}: {failure.stage} {failure.error_type}: {failure.message}",
                      highlight=False)
    if len(failures) > 10:
        console.print(f"  ... and {len(failures) - 10} more (status = 'failed' rows in {out})")
    if any(not failure.permanent for failure in failures):
        raise typer.Exit(1)  # transient failures: a rerun may succeed (exit codes: docs/cli.md)
