"""Extraction benchmark: side-by-side ratios measured in one run, on the same videos.

    .venv/bin/python bench/extract.py [--videos 64] [--backend transformers|vllm] [--model DIR_OR_ID]

Prints
1. decode: tasks.decode.decode (probe + planned frames + in-decoder resize) against raw decord
   `VideoReader(path).get_batch(same indices)`, interleaved file by file (goal: within 1.3x);
2. model: videos/s batched against one video at a time, on pre-decoded frames and end to end
   through tasks.extract.extract_videos (goal: >= 3x on CPU with the test model);
3. transformers only: how to get hidden states and a caption: hooked one-pass generate (the
   backend's default), forward + generate, and generate(output_hidden_states=True,
   return_dict_in_generate=True);
4. --backend vllm: the vLLM and transformers backends side by side (videos/s, same videos, same
   batch size); with --startup-only, only the engine's start-up in-process and multiprocess. Engine knobs come from the [vllm] config (mvrec.toml, MVREC_VLLM__* variables),
   e.g. MVREC_VLLM__CPU_OMP_THREADS_BIND=nobind on a shared CPU. transformers runs first: the
   in-process vLLM engine changes the process's thread settings.

Videos come from mvrec.devtools.demo_data (the `mvrec demo-data` corpus) and are cached under --work.
Without --model a test model is built there (random weights: speed only, no meaning).
Any backend that tasks.lvlm.load_backend knows plugs in through --backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mvrec import torch_compat  # noqa: E402

torch_compat.install()

import numpy as np  # noqa: E402


def corpus(work: Path, n: int) -> list[Path]:
    """n demo videos (cached), rendered by mvrec.devtools.demo_data."""
    from mvrec.devtools.demo_data import make_demo_corpus

    out = work / f"corpus-{n}"
    videos = sorted((out / "videos").glob("*")) if (out / "corpus.json").exists() else []
    if len(videos) < n:
        t0 = time.perf_counter()
        make_demo_corpus(out, videos=n, users=max(50, n), seed=0, workers=2)
        videos = sorted((out / "videos").glob("*"))
        print(f"demo corpus: {len(videos)} videos in {time.perf_counter() - t0:.1f} s -> {out}")
    return videos[:n]


def bench_decode(paths: list[Path], policy: str, rounds: int) -> None:
    import decord

    from tasks.decode import decode

    ours, raw, fallbacks = [], [], 0
    for r in range(rounds):
        for i, p in enumerate(paths):
            order = (0, 1) if (i + r) % 2 == 0 else (1, 0)  # alternate who goes first (cache effects)
            for which in order:
                if which == 0:
                    t0 = time.perf_counter()
                    v = decode(p, policy=policy)
                    ours.append(time.perf_counter() - t0)
                    fallbacks += v.meta.backend != "decord"
                else:
                    t0 = time.perf_counter()
                    try:
                        reader = decord.VideoReader(str(p), ctx=decord.cpu(0))
                        n = len(reader)
                        idx = np.linspace(0, n - 1, min(n, int(policy.split(":")[1]))).round().astype(int)
                        reader.get_batch(idx).asnumpy()
                        del reader
                    except Exception:
                        pass
                    raw.append(time.perf_counter() - t0)
    ours_ms, raw_ms = 1e3 * sum(ours) / len(ours), 1e3 * sum(raw) / len(raw)
    print(f"decode ({len(paths)} videos x {rounds}, {policy}): tasks.decode {ours_ms:.2f} ms/video, "
          f"raw decord get_batch {raw_ms:.2f} ms/video, ratio {ours_ms / raw_ms:.2f}x (goal <= 1.3x); "
          f"median {1e3 * statistics.median(ours):.2f} vs {1e3 * statistics.median(raw):.2f} ms; "
          f"PyAV fallbacks {fallbacks // rounds}")


def bench_model(backend, videos, batch_size: int) -> tuple[float, float]:
    """videos/s batched and one at a time on pre-decoded videos (after one warm-up batch each)."""
    backend.extract(videos[:batch_size])
    backend.extract(videos[:1])
    t0 = time.perf_counter()
    for i in range(0, len(videos), batch_size):
        backend.extract(videos[i:i + batch_size])
    batched = len(videos) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for v in videos:
        backend.extract([v])
    single = len(videos) / (time.perf_counter() - t0)
    return batched, single


def bench_end_to_end(backend, paths, batch_size: int, decode_kwargs: dict) -> tuple[float, float]:
    from tasks.extract import extract_videos

    rates = []
    for bs in (batch_size, 1):
        t0 = time.perf_counter()
        results, failures = extract_videos(paths, backend, batch_size=bs, decode_kwargs=decode_kwargs)
        rates.append(len(paths) / (time.perf_counter() - t0))
        assert not failures, failures[:3]
    return rates[0], rates[1]


def bench_side_by_side(spec, vllm_backend, videos, paths, batch_size: int, decode_kwargs: dict,
                       end_to_end: bool) -> None:
    """vLLM (already loaded) and transformers on the same videos: model only, and end to end."""
    import dataclasses

    from tasks.extract import extract_videos

    rates = {}
    ref = dataclasses.replace(spec, options={})
    # transformers first: vLLM's in-process engine pins torch's thread settings for the process
    for name in ("transformers", "vllm"):
        if name == "transformers":
            from tasks.lvlm import load_backend

            backend = load_backend("transformers", ref)
        else:
            backend = vllm_backend()
        try:
            tokens = int(np.mean([f.n_prompt_tokens for f in backend.extract(videos[:batch_size])]))
            batched, single = bench_model(backend, videos, batch_size)
            e2e = float("nan")
            if end_to_end:
                t0 = time.perf_counter()
                _, failures = extract_videos(paths, backend, batch_size=batch_size, decode_kwargs=decode_kwargs)
                e2e = len(paths) / (time.perf_counter() - t0)
                assert not failures, failures[:3]
        finally:
            if name == "transformers":
                backend.close()
        rates[name] = (batched, single, e2e)
    print(f"vLLM vs transformers ({len(videos)} videos, ~{tokens} prompt tokens each, batch {batch_size}, "
          f"{spec.max_new_tokens} new tokens), videos/s:")
    print(f"  {'backend':14s} {'model, batched':>15s} {'model, 1 at a time':>19s} {'end to end':>11s}")
    for name, (b, s1, e) in rates.items():
        print(f"  {name:14s} {b:15.2f} {s1:19.2f} {e:11.2f}")
    v, t = rates["vllm"], rates["transformers"]
    print(f"  ratio vllm/transformers: batched {v[0] / t[0]:.2f}x, one at a time {v[1] / t[1]:.2f}x"
          + (f", end to end {v[2] / t[2]:.2f}x" if end_to_end else ""))


def bench_vllm_startup(spec, rounds: int) -> None:
    """Seconds from load_backend("vllm") to a ready engine, with the engine core in this process
    (vllm.multiprocessing = false, the default) and in a child process, alternated over rounds.
    vLLM is imported into this process first and timed apart; a child process imports it again."""
    import dataclasses

    from tasks.lvlm import load_backend

    t0 = time.perf_counter()
    import vllm  # noqa: F401

    print(f"import vllm in this process: {time.perf_counter() - t0:.1f} s")
    seconds = {False: [], True: []}
    for _ in range(rounds):
        for mp in (False, True):
            t0 = time.perf_counter()
            backend = load_backend("vllm", dataclasses.replace(spec, options={**spec.options, "multiprocessing": mp}))
            seconds[mp].append(time.perf_counter() - t0)
            backend.close()
    print(f"vLLM engine start-up (load_backend until ready, {rounds} rounds, load {os.getloadavg()[0]:.1f}):")
    for mp, s in seconds.items():
        print(f"  multiprocessing={str(mp).lower():5s} " + ", ".join(f"{x:.1f}" for x in s) + " s")


def bench_passes(backend, videos, batch_size: int) -> None:
    """One hooked generate vs forward + generate vs generate(output_hidden_states=True)."""
    import torch

    from tasks.lvlm_transformers import pool, pooling_weights

    batches = [videos[i:i + batch_size] for i in range(0, len(videos), batch_size)]
    prepared = [backend.prepare(b) for b in batches]

    def hooked(mode):
        backend.mode = mode
        for inputs in prepared:
            backend.run(inputs)

    def generate_with_hidden_states():
        n = backend.num_layers
        with torch.inference_mode():
            for inputs in prepared:
                out = backend.model.generate(**inputs, max_new_tokens=backend.spec.max_new_tokens, do_sample=False,
                                             temperature=None, top_p=None, top_k=None,
                                             pad_token_id=backend.tokenizer.pad_token_id,
                                             output_hidden_states=True, return_dict_in_generate=True)
                w = pooling_weights(inputs["input_ids"], inputs["attention_mask"], "video", backend.video_token_id)
                prefill = out.hidden_states[0]  # L + 1 tensors; [-1] is after the norm (no pre-norm layer L)
                torch.stack([pool(prefill[k], w) for k in range(n + 1)], dim=1)

    timings = {}
    candidates = {"one generate, pooled by hooks (default)": lambda: hooked("one_pass"),
                  "forward + generate (two_pass)": lambda: hooked("two_pass"),
                  "generate(output_hidden_states=True)": generate_with_hidden_states}
    for name, fn in candidates.items():
        fn()  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    backend.mode = "one_pass"
    base = timings["one generate, pooled by hooks (default)"]
    print(f"hidden states + caption, {len(videos)} videos in batches of {batch_size}, "
          f"{backend.spec.max_new_tokens} new tokens (best of 3):")
    for name, t in timings.items():
        print(f"  {name:42s} {1e3 * t:8.1f} ms  {t / base:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--backend", default="transformers", help="transformers | vllm (tasks.lvlm.load_backend)")
    ap.add_argument("--model", default="", help="hub id or directory; default: a test model built under --work")
    ap.add_argument("--arch", default="qwen2_5_vl", help="test-model architecture when --model is not given")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--frames", default="uniform:8")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--decode-rounds", type=int, default=2)
    ap.add_argument("--work", default="bench/out")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default). On a shared CPU, 1 avoids OpenMP spin contention.")
    ap.add_argument("--startup-only", action="store_true",
                    help="with --backend vllm: only the engine's start-up, in-process and multiprocess")
    ap.add_argument("--startup-rounds", type=int, default=2)
    args = ap.parse_args()
    if args.startup_only and args.backend != "vllm":
        ap.error("--startup-only needs --backend vllm")

    import torch

    from tasks.decode import decode
    from tasks.lvlm import ExtractSpec, load_backend
    from mvrec.devtools.test_model import build_test_model
    from tasks.lvlm import is_test_model

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}; backend {args.backend}")
    model = args.model or str(build_test_model(work / f"test-model-{args.arch}", arch=args.arch))
    if is_test_model(model):
        print(f"model: {model} is a random-weight TEST MODEL (speed only)")
    options = {}
    if args.backend == "vllm":
        import dataclasses

        from mvrec.config import load_config

        options = dataclasses.asdict(load_config().vllm)
        print(f"vllm options: {options}")
    spec = ExtractSpec(model=model, max_new_tokens=args.max_new_tokens, options=options)
    if args.startup_only:
        bench_vllm_startup(spec, args.startup_rounds)
        return
    paths = corpus(work, args.videos)
    bench_decode(paths, args.frames, args.decode_rounds)
    decode_kwargs = {"policy": args.frames}
    videos = [decode(p, **decode_kwargs) for p in paths]
    if args.backend == "vllm":
        holder = {}

        def start_vllm():
            holder["backend"] = load_backend("vllm", spec)
            return holder["backend"]

        try:
            bench_side_by_side(spec, start_vllm, videos, paths, args.batch_size, decode_kwargs,
                               not args.skip_end_to_end)
        finally:
            if "backend" in holder:
                holder["backend"].close()
        return
    backend = load_backend(args.backend, spec)
    tokens = []
    try:
        feats = backend.extract(videos[: args.batch_size])
        tokens = [f.n_prompt_tokens for f in feats]
        batched, single = bench_model(backend, videos, args.batch_size)
        print(f"model only ({len(videos)} pre-decoded videos, ~{int(np.mean(tokens))} prompt tokens each): "
              f"batch {args.batch_size} {batched:.2f} videos/s, one at a time {single:.2f} videos/s, "
              f"ratio {batched / single:.2f}x (goal >= 3x)")
        if not args.skip_end_to_end:
            batched, single = bench_end_to_end(backend, paths, args.batch_size, decode_kwargs)
            print(f"end to end (decode + model, extract_videos): batch {args.batch_size} {batched:.2f} videos/s, "
                  f"one at a time {single:.2f} videos/s, ratio {batched / single:.2f}x")
        if args.backend == "transformers":
            bench_passes(backend, videos, args.batch_size)
    finally:
        backend.close()


if __name__ == "__main__":
    main()
