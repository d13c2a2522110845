"""Foundation commands: config, demo corpus, local test LVLM."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mvrec.cli.common import app, console, err_console, get_config

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of TOML."),
) -> None:
    """Print the effective config (defaults < preset < mvrec.toml < MVREC_* env)."""
    cfg = get_config().to_dict()
    if as_json:
        console.print_json(json.dumps(cfg))
        return
    for section, values in cfg.items():
        console.print(f"[{section}]", style="bold", markup=False, highlight=False)
        for key, value in values.items():
            console.print(f"{key} = {json.dumps(value)}", markup=False, highlight=False)
        console.print()


@app.command("demo-data")
def demo_data_cmd(
    videos: int = typer.Option(200, "--videos", "-n", min=1, help="Number of videos (item ids 1..N)."),
    users: int = typer.Option(2000, "--users", "-u", min=1, help="Number of users (interaction sequences)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Same seed, same files (bytes and frames)."),
    out: Path = typer.Option(Path("./.mvrec/demo"), "--out", "-o", help="Directory to write the corpus to."),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Encoder processes."),
    cold_items: float = typer.Option(0.0, "--cold-items", min=0.0, max=1.0,
                                     help="Share of users whose test item is cold (a positive control for content)."),
    unrelated_visuals: bool = typer.Option(False, "--unrelated-visuals",
                                           help="Draw each video from a random topic, not its item's "
                                                "(a negative control for content)."),
) -> None:
    """Write a synthetic MicroLens-style corpus: real videos, pairs.tsv, items.csv, corpus.json."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mvrec.devtools.demo_data import make_demo_corpus

    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    t0 = time.perf_counter()
    with Progress(TextColumn("encoding videos"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("encode", total=videos)
        meta = make_demo_corpus(out, videos=videos, users=users, seed=seed, workers=workers, cold_test_share=cold_items,
                                unrelated_visuals=unrelated_visuals, progress=lambda done, total: bar.update(task, completed=done))
    stats = meta["stats"]
    console.print(
        f"wrote {videos} videos and {users} users ({stats['interactions']} interactions, "
        f"{stats['video_bytes'] / 1e6:.1f} MB) to {out} in {time.perf_counter() - t0:.1f} s: "
        "videos/, pairs.tsv, items.csv, corpus.json",
        markup=False, highlight=False, soft_wrap=True,
    )


@app.command("build-test-model")
def build_test_model_cmd(
    out: str = typer.Option("./.mvrec/test-model", "--out", "-o", help="Directory to write the model to."),
    arch: str = typer.Option("qwen2_5_vl", "--arch", help="qwen2_5_vl | qwen3_vl"),
    layers: int = typer.Option(4, "--layers", min=1, help="Decoder layers."),
    hidden: int = typer.Option(128, "--hidden", min=32, help="Text hidden size (4 heads; head_dim = hidden/4 >= 32 for vLLM CPU)."),
    seed: int = typer.Option(0, "--seed", help="Weights and tokenizer are deterministic by seed."),
) -> None:
    """Build a tiny random-weight Qwen-VL TEST MODEL locally (no hub): for tests and the demo."""
    import time

    from mvrec.devtools.test_model import ARCHS, build_test_model

    if arch not in ARCHS:
        raise typer.BadParameter(f"{arch!r} is not one of {', '.join(ARCHS)}", param_hint="--arch")
    if hidden % 4:
        raise typer.BadParameter(f"{hidden} is not divisible by the 4 attention heads", param_hint="--hidden")
    from mvrec import torch_compat

    torch_compat.install()
    # Import the (lazy) model and processor modules first so the timing below is the build alone.
    from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: F401
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration  # noqa: F401
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor  # noqa: F401
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor  # noqa: F401

    t0 = time.perf_counter()
    path = build_test_model(out, arch=arch, layers=layers, hidden=hidden, seed=seed)
    size_mb = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    console.print(f"built {arch} test model in {path} ({layers} layers, hidden {hidden}, "
                  f"{size_mb:.1f} MB, {time.perf_counter() - t0:.1f} s). Its weights are random: "
                  "captions and features from it carry no meaning.")
