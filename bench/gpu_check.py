"""GPU readiness check: the transformers backend at the real Qwen2.5-VL-3B and -7B shapes, fed by
the production decode loop, in one run of a few minutes.

    bench/gpu_check.sh                         # on the GPU machine (installs carried decord/av wheels)
    python bench/gpu_check.py --tiny           # CPU dry run at a tiny shape (tests/test_gpu_check.py)
    python bench/gpu_check.py --decode-only    # decode cost per CPU core, no model

The models are TEST MODELS: the published Qwen2.5-VL-3B/7B shapes (text layers, hidden,
intermediate, heads, KV heads, vocab; vision depth, hidden, heads, out_hidden) with random
weights, so captions and features mean nothing; only speed and memory do. The tokenizer and
processor come from mvrec.devtools.test_model. To avoid writing and reading GBs of random
weights, `from_pretrained` is redirected for the backend's load to build the model from its
config.json straight on the device (`random_weights_on`); everything after loading (processor,
hooks pooling all layers, generate) is the production TransformersBackend.

Steps:
1. the demo corpus (mvrec.devtools.demo_data) plus a 720x1280 portrait subset, rendered here;
2. decode cost: every video decoded once in one thread by tasks.extract.decode_one (production
   defaults), as videos per CPU-second (process CPU time, all decoder threads counted) and wall;
3. per shape and per caption length (16 new tokens and 0, i.e. prefill only): the corpus through
   the production data plane on threads (tasks/dataplane.py: --decode-workers decode + processor
   workers feed one model replica), batched, pooling every layer. --tiny adds one file that is not a video,
   so the failure path runs too. Printed: videos/s, prefill tokens/s, estimated MFU, GPU busy fraction,
   cores needed to keep the model fed, peak GPU memory. JSON of everything goes to --out.

FLOPs (forward, 2 per multiply-add; weights of norms, biases and embeddings lookups left out):
  text, per video of S useful prompt tokens (padding not counted):
      2 * N_text * S  +  2 * L * h * S^2 (causal QK^T and AV)  +  2 * h * V (logits, last position)
      N_text = L * (2*h*h + 2*h*kv*hd + 3*h*I)   (q, o; k, v; SwiGLU MLP)
  each generated token after the first: 2 * N_text + 2 * h * V + 4 * L * h * context
  vision, per video of P = t*gh*gw patches (14x14 pixels x 2 frames) and d = vision hidden:
      2 * P * (depth * (4*d*d + 3*d*I_v) + 1176*d)          (qkv, proj, SwiGLU MLP, patch embed)
    + 2 * (P/4) * (16*d*d + 4*d*out_hidden)                   (patch merger)
    + 4 * d * (n_full * t * (gh*gw)^2 + n_window * sum over 8x8-patch windows of size^2)
MFU = FLOPs / (seconds * 989.4e12): 989.4 TFLOP/s is the dense BF16 Tensor Core peak of the H100 SXM
and the H200 SXM by NVIDIA's specifications (their sheets give 1,979 TFLOP/s "with sparsity", twice
the dense rate). "model" uses the GPU time of the backend's model calls (CUDA events), "wall" the
whole run. The check also measures the rate a plain dense matmul reaches on the device
(--matmul-n cubed, random data, best of three rounds) and prints the model's FLOP rate against it:
what a kernel could get out of this device, next to the spec.
GPU busy: the model calls' CUDA-event time over the wall time (an upper bound: gaps inside a
call count as busy), and NVML's utilization sampled every 0.1 s (torch.cuda.utilization).
Cores to keep the model fed = (videos/s of the model alone) x (decode CPU-seconds + processor
seconds per video, both on the decode workers) + 1 for the replica's own thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

PEAK_FLOPS = 989.4e12  # H100/H200 SXM, dense BF16 Tensor Core, NVIDIA's spec (1,979 "with sparsity" / 2)
FORBIDDEN = ("prefect", "duckdb", "vllm", "deltalake")  # not on the GPU machine


# ---------------------------------------------------------------------------------------------
# shapes (published configs of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct)


@dataclass(frozen=True)
class Shape:
    name: str
    text: dict
    vision: dict
    mrope_section: tuple[int, int, int]


_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=112,
               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
SHAPES = {
    "3b": Shape("qwen2.5-vl-3b", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                      num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                      tie_word_embeddings=True),
                {**_VISION, "out_hidden_size": 2048}, (16, 24, 24)),
    "7b": Shape("qwen2.5-vl-7b", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                      tie_word_embeddings=False),
                {**_VISION, "out_hidden_size": 3584}, (16, 24, 24)),
    # the dry run: the same code at a size a CPU test can afford
    "tiny": Shape("tiny", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                               tie_word_embeddings=True),
                  {**_VISION, "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                   "fullatt_block_indexes": [1], "out_hidden_size": 128}, (4, 6, 6)),
}


def write_model_dir(shape: Shape, out: Path) -> Path:
    """A test-model directory (tokenizer, processor, config.json) with the shape's config."""
    from mvrec.devtools.test_model import build_test_model
    from tasks.lvlm import TEST_MODEL_FLAG

    build_test_model(out, arch="qwen2_5_vl", layers=1, hidden=128, heads=4, kv_heads=2)
    for f in out.glob("*.safetensors"):
        f.unlink()  # the 1-layer weights are not this shape's; random_weights_on builds them
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"]
    text.update(shape.text)
    text.pop("layer_types", None)  # derived from num_hidden_layers again on load
    text["rope_parameters"] = {**text.get("rope_parameters", {}), "rope_type": "default",
                               "rope_theta": 1e6, "mrope_section": list(shape.mrope_section)}
    config["vision_config"].update(shape.vision)
    config["tie_word_embeddings"] = shape.text["tie_word_embeddings"]
    config[TEST_MODEL_FLAG] = True  # every report of the backend says "test model"
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


@contextmanager
def random_weights_on(device: str):
    """While active, AutoModelForImageTextToText.from_pretrained builds the model from config.json
    with random weights directly on `device` (no weight files are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText
    own = vars(cls).get("from_pretrained")

    def build(model, revision=None, dtype=None, **kwargs):
        config = AutoConfig.from_pretrained(model)
        torch.manual_seed(0)
        with torch.device(device):
            return cls.from_config(config, dtype=dtype)

    cls.from_pretrained = build
    try:
        yield
    finally:
        if own is None:
            del cls.from_pretrained
        else:
            cls.from_pretrained = own


# ---------------------------------------------------------------------------------------------
# FLOPs


def text_params(tc) -> int:
    """Matmul weights per token of the text decoder (N_text)."""
    h, kv, hd = tc.hidden_size, tc.num_key_value_heads, tc.hidden_size // tc.num_attention_heads
    return tc.num_hidden_layers * (2 * h * h + 2 * h * kv * hd + 3 * h * tc.intermediate_size)


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def vision_flops(vc, t: int, gh: int, gw: int) -> float:
    d, P = vc.hidden_size, t * gh * gw
    per_patch = vc.depth * (4 * d * d + 3 * d * vc.intermediate_size) + 3 * vc.temporal_patch_size * vc.patch_size ** 2 * d
    merger = 2 * (P / vc.spatial_merge_size ** 2) * (16 * d * d + 4 * d * vc.out_hidden_size)
    n_full = len(vc.fullatt_block_indexes)
    win = vc.window_size // vc.patch_size  # patches per window side (8)
    window_sq = t * sum(a * a * b * b for a in _chunks(gh, win) for b in _chunks(gw, win))
    attn = 4 * d * (n_full * t * (gh * gw) ** 2 + (vc.depth - n_full) * window_sq)
    return 2 * P * per_patch + merger + attn


def batch_flops(config, grid_thw, prompt_tokens, new_steps: int) -> dict:
    """FLOPs of one backend call: vision, text prefill and generated tokens (see module doc)."""
    tc, vc = config.get_text_config(), config.vision_config
    n_text, h, L, V = text_params(tc), tc.hidden_size, tc.num_hidden_layers, tc.vocab_size
    vision = sum(vision_flops(vc, int(t), int(gh), int(gw)) for t, gh, gw in grid_thw)
    prefill = sum(2 * n_text * s + 2 * L * h * s * s + 2 * h * V for s in prompt_tokens)
    decode = sum(2 * n_text + 2 * h * V + 4 * L * h * (s + j) for s in prompt_tokens for j in range(1, new_steps))
    return {"vision": vision, "prefill": prefill, "decode": decode}


# ---------------------------------------------------------------------------------------------
# metering the backend's calls


@dataclass
class Meter:
    """Times the replica's collate (padding and the copy to the device, on the model's thread) and
    run (the model) calls. The processor itself runs on the decode workers (tasks/dataplane.py)."""

    cuda: bool
    config: object
    collate_s: float = 0.0  # wall: the model waits for it
    collate_cpu_s: float = 0.0  # CPU of the calling thread alone (torch's intra-op threads not counted)
    model_s: float = 0.0  # CUDA-event time on GPU, wall time on CPU
    calls: int = 0
    prompt_tokens: int = 0
    padded_tokens: int = 0
    flops: dict = field(default_factory=lambda: {"vision": 0.0, "prefill": 0.0, "decode": 0.0})

    def attach(self, backend) -> None:
        import torch

        collate, run = backend.collate, backend.run

        def timed_collate(batch):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = collate(batch)
            self.collate_s += time.perf_counter() - t0
            self.collate_cpu_s += time.thread_time() - c0
            return out

        def timed_run(inputs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            pooled, new_ids = run(inputs)
            if self.cuda:
                end.record()
                end.synchronize()
                self.model_s += start.elapsed_time(end) / 1e3
            else:
                self.model_s += time.perf_counter() - t0
            mask = inputs["attention_mask"]
            tokens = mask.sum(dim=1).tolist()
            self.calls += 1
            self.prompt_tokens += sum(tokens)
            self.padded_tokens += mask.numel()
            steps = 0 if new_ids is None else new_ids.shape[1]
            for k, v in batch_flops(self.config, inputs["video_grid_thw"].tolist(), tokens, steps).items():
                self.flops[k] += v
            return pooled, new_ids

        backend.collate, backend.run = timed_collate, timed_run


class UtilSampler:
    """NVML GPU utilization (torch.cuda.utilization) every `every` seconds in a thread."""

    def __init__(self, every: float = 0.1):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import torch

        while not self._stop.wait(self.every):
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # no NVML (pynvml) here: report n/a
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


# ---------------------------------------------------------------------------------------------
# corpus and decode cost


def make_corpus(work: Path, videos: int, portrait: int, portrait_frames: int, workers: int) -> tuple[list[Path], list[Path]]:
    """Demo corpus videos and 720x1280 portrait clips (both cached under work)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from mvrec.devtools.demo_data import VideoSpec, encode_video, make_demo_corpus

    demo = work / f"demo-{videos}"
    if not (demo / "corpus.json").exists():
        make_demo_corpus(demo, videos=videos, users=max(50, videos), seed=0, workers=workers)
    tall = work / f"portrait-{portrait}x{portrait_frames}"
    specs = [VideoSpec(item_id=i, topic=i % 10, codec="libx264", ext="mp4", width=720, height=1280, fps=30,
                       n_frames=portrait_frames, seed=i, title="") for i in range(1, portrait + 1)]
    missing = [s for s in specs if not (tall / s.file).exists()]
    if missing:
        with ProcessPoolExecutor(max(1, min(workers, len(missing))), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(encode_video, missing, [tall] * len(missing)))
    return sorted((demo / "videos").iterdir()), [tall / s.file for s in specs]


def matmul_tflops(device: str, dtype: str, n: int, reps: int = 10) -> float:
    """TFLOP/s of a dense n x n x n matmul on random data, best of three rounds of reps."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: cuBLAS picks its kernel
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best / 1e12


def decode_cost(refs: list, opts) -> dict:
    """Decode each video once, one at a time, as the extraction loop does (tasks.extract.decode_one):
    videos per CPU-second and per wall second."""
    from tasks.extract import decode_one

    cpu0, wall0 = time.process_time(), time.perf_counter()
    frames = source_frames = 0
    for ref in refs:
        video, _ = decode_one(ref, opts)
        if not hasattr(video, "frames"):
            raise RuntimeError(f"{ref.uri}: a corpus video failed to decode: {video.message}")
        frames += len(video.frames)
        source_frames += video.meta.total_num_frames  # uniform sampling decodes about all of them
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"videos": len(refs), "cpu_s": cpu, "wall_s": wall, "frames": frames, "source_frames": source_frames,
            "videos_per_cpu_s": len(refs) / cpu, "videos_per_wall_s": len(refs) / wall}


# ---------------------------------------------------------------------------------------------
# one shape


def run_shape(shape: Shape, args, refs: list, decode_cpu_s_per_video: float, deadline: float) -> list[dict]:
    import torch

    from tasks.dataplane import PlaneSpec, run_plane
    from tasks.extract import decode_one
    from tasks.lvlm import ExtractSpec, load_backend

    cuda = args.device.startswith("cuda")
    model_dir = write_model_dir(shape, args.work / f"model-{shape.name}")
    rows = []
    spec = ExtractSpec(model=str(model_dir), device=args.device, dtype=args.dtype, layers="all",
                       pooling="video", max_new_tokens=args.new_tokens[0])
    t0 = time.perf_counter()
    with random_weights_on(args.device):
        backend = load_backend("transformers", spec)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in backend.model.parameters())
    assert backend.info.is_test_model, "the check must only ever run on test models"
    warm = [video for video, _ in (decode_one(ref, args.opts) for ref in refs[:args.batch]) if hasattr(video, "frames")]
    plane = PlaneSpec("transformers", spec, args.opts, batch_size=args.batch, replicas=1,
                      decode_workers=args.decode_workers)
    try:
        for new_tokens in args.new_tokens:
            if time.perf_counter() > deadline:
                print(f"[{shape.name}] new_tokens={new_tokens}: skipped, past --budget-s")
                continue
            backend.spec.max_new_tokens = new_tokens
            backend.extract(warm)  # compile/cuBLAS/allocator warm-up, not timed
            meter = Meter(cuda=cuda, config=backend.model.config)
            meter.attach(backend)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            results, failures = [], []
            with UtilSampler() as util:
                t0 = time.perf_counter()
                # the production data plane on threads: decode + processor workers feed one replica
                for batch, _ in run_plane(refs, plane, backends=[backend]):
                    results += batch.results
                    failures += batch.failures
                wall = time.perf_counter() - t0
            del backend.collate, backend.run  # back to the class methods
            for f in failures[:3]:
                print(f"  failure: {f.uri}: {f.stage} {f.error_type}: {f.message[:300]}")
            n = len(results)
            if n == 0:
                rows.append({"shape": shape.name, "new_tokens": new_tokens, "videos": 0, "failures": len(failures)})
                continue
            flops = sum(meter.flops.values())
            preprocess_s = sum(r.features.timings.get("preprocess_s", 0.0) for r in results) / n  # on decode workers
            model_rate = n / meter.model_s  # videos/s if the model never waited for input
            rows.append({
                "shape": shape.name, "params": n_params, "build_s": build_s, "new_tokens": new_tokens,
                "batch": args.batch, "videos": n, "failures": len(failures), "wall_s": wall,
                "videos_per_s": n / wall, "model_s": meter.model_s, "model_videos_per_s": model_rate,
                "collate_s_per_video": meter.collate_s / max(n, 1),
                "collate_thread_cpu_s_per_video": meter.collate_cpu_s / max(n, 1),
                "preprocess_s_per_video": preprocess_s,
                "prompt_tokens": meter.prompt_tokens, "padded_tokens": meter.padded_tokens,
                "prefill_tokens_per_s": meter.prompt_tokens / wall,
                "prefill_tokens_per_model_s": meter.prompt_tokens / meter.model_s,
                "tflop": {k: v / 1e12 for k, v in meter.flops.items()},
                "mfu_model": flops / (meter.model_s * PEAK_FLOPS), "mfu_wall": flops / (wall * PEAK_FLOPS),
                "of_matmul_model": flops / meter.model_s / (args.matmul_tflops * 1e12),
                "gpu_busy_events": meter.model_s / wall if cuda else None,
                "gpu_util_nvml": util.mean() if cuda else None,
                "decode_cores_needed": model_rate * (decode_cpu_s_per_video + preprocess_s),
                "cores_needed": model_rate * (decode_cpu_s_per_video + preprocess_s) + 1,  # + the replica's thread
                # collate runs on the model's thread between model calls: GPU busy cannot exceed this
                "busy_bound_collate": meter.model_s / (meter.model_s + meter.collate_s),
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "layers_pooled": len(results[0].features.layers) if results else 0,
                "num_layers": backend.num_layers,
            })
            print_row(rows[-1])
    finally:
        backend.close()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _fmt(x, spec=".2f", na="n/a") -> str:
    return na if x is None else format(x, spec)


def print_row(r: dict) -> None:
    tf = r["tflop"]
    print(f"[{r['shape']}] new_tokens={r['new_tokens']} batch={r['batch']} videos={r['videos']} "
          f"failures={r['failures']} params={r['params'] / 1e9:.2f}B (TEST MODEL, random weights)")
    print(f"  videos/s {r['videos_per_s']:.2f} (model alone {r['model_videos_per_s']:.2f}); "
          f"prefill tokens/s {r['prefill_tokens_per_s']:.0f} (per model second {r['prefill_tokens_per_model_s']:.0f}; "
          f"padding {1 - r['prompt_tokens'] / r['padded_tokens']:.1%})")
    print(f"  TFLOP vision {tf['vision']:.1f} + prefill {tf['prefill']:.1f} + decode {tf['decode']:.1f}; "
          f"MFU vs {PEAK_FLOPS / 1e12:.1f} TFLOP/s (spec): model {r['mfu_model']:.1%}, wall {r['mfu_wall']:.1%}; "
          f"model vs the measured matmul rate {r['of_matmul_model']:.1%}")
    print(f"  GPU busy: events {_fmt(r['gpu_busy_events'], '.1%')}, NVML {_fmt(r['gpu_util_nvml'], '.1%')}; "
          f"peak GPU memory {_fmt(r['peak_gpu_gib'])} GiB; processor {1e3 * r['preprocess_s_per_video']:.1f} ms/video "
          f"on the decode workers; collate {1e3 * r['collate_s_per_video']:.1f} ms/video on the model's thread")
    print(f"  cores to keep the model fed: {r['cores_needed']:.1f} = decode + processor {r['decode_cores_needed']:.1f} "
          f"+ 1 for the model's thread; collate on that thread caps GPU busy at {r['busy_bound_collate']:.0%}")


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny shape, few videos, float32")
    p.add_argument("--decode-only", action="store_true", help="only the decode cost per CPU core")
    p.add_argument("--shapes", default="3b,7b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--videos", type=int, default=512, help="demo corpus size")
    p.add_argument("--portrait", type=int, default=8, help="720x1280 portrait clips")
    p.add_argument("--portrait-frames", type=int, default=120, help="frames per portrait clip (30 fps)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", default="16,0", help="caption lengths to run (0: prefill only)")
    p.add_argument("--decode-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                   help="batches decoding ahead of the model, one thread each (extract.decode_workers)")
    p.add_argument("--policy", default="uniform:8")
    p.add_argument("--budget-s", type=float, default=420, help="start no new measurement after this many seconds")
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the dense matmul whose rate is measured")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: $OUT or --work)")
    args = p.parse_args(argv)
    if args.tiny:
        args.shapes, args.device, args.dtype = "tiny", "cpu", "float32"
        args.videos, args.portrait, args.portrait_frames, args.batch, args.matmul_n = 8, 1, 16, 4, 256
        args.decode_workers = min(args.decode_workers, 2)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"--shapes: unknown {', '.join(bad)} (choose from {', '.join(SHAPES)})")
    args.new_tokens = [int(x) for x in args.new_tokens.split(",")]
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else args.work / "gpu_check.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from mvrec import torch_compat

    torch_compat.install()
    report = {"argv": sys.argv[1:], "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    t0 = time.perf_counter()
    demo, tall = make_corpus(args.work, args.videos, args.portrait, args.portrait_frames,
                             workers=max(1, min(16, os.cpu_count() or 1)))
    print(f"corpus: {len(demo)} demo videos + {len(tall)} portrait 720x1280 clips "
          f"({time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    from tasks.discover import VideoRef
    from tasks.extract import DecodeOptions

    args.opts = DecodeOptions(policy=args.policy)  # production defaults otherwise (frames <= 224x224)
    demo, tall = ([VideoRef(video_id=p.stem, uri=str(p)) for p in paths] for paths in (demo, tall))
    report["decode"] = {"demo": decode_cost(demo[:128], args.opts), "portrait_720x1280": decode_cost(tall, args.opts)}
    if args.tiny:  # the dry run also takes the failure path: one video that cannot decode
        bad = args.work / "not_a_video.mp4"
        bad.write_text("not a video\n")
        demo.append(VideoRef(video_id=bad.stem, uri=str(bad)))
    for name, d in report["decode"].items():
        print(f"decode {name}: {d['videos_per_cpu_s']:.1f} videos per CPU-second "
              f"({1e3 / d['videos_per_cpu_s']:.1f} ms CPU/video, {d['source_frames'] / d['videos']:.0f} source frames/video), "
              f"{d['videos_per_wall_s']:.1f} videos/s wall, one worker thread, {args.policy}")
    save(report, args.out)
    status = 0
    if not args.decode_only:
        import torch

        print(f"torch {torch.__version__}, device {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
        args.matmul_tflops = report["matmul_tflops"] = matmul_tflops(args.device, args.dtype, args.matmul_n)
        print(f"dense matmul {args.matmul_n}^3 {args.dtype}: {args.matmul_tflops:.1f} TFLOP/s measured "
              f"({args.matmul_tflops * 1e12 / PEAK_FLOPS:.1%} of the {PEAK_FLOPS / 1e12:.1f} TFLOP/s spec)")
        cpu_s = 1 / report["decode"]["demo"]["videos_per_cpu_s"]
        report["runs"], report["errors"] = [], []
        for name in args.shapes:
            try:  # one shape failing must not cost the other's figures on a short device lease
                report["runs"] += run_shape(SHAPES[name], args, demo, cpu_s, deadline=t0 + args.budget_s)
            except Exception as e:
                traceback.print_exc()
                report["errors"].append(f"{name}: {type(e).__name__}: {e}")
                status = 1
            save(report, args.out)
    report["loadavg_end"] = os.getloadavg()
    report["forbidden_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    save(report, args.out)
    print(f"results -> {args.out}; load {os.getloadavg()[0]:.2f}")
    return status


def save(report: dict, path: Path) -> None:
    """Written after every step, so a run stopped at its time limit still leaves its figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
