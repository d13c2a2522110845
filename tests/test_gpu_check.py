"""bench/gpu_check.py cannot rot: its CPU dry run (--tiny) runs end to end, and the real-size shapes
and FLOP formula it reports MFU with agree with the architecture transformers builds."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_dry_run_at_tiny_shape(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--work", str(tmp_path), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # The GPU machine has no Prefect, DuckDB, vLLM or deltalake: the check must not need them.
    assert report["forbidden_imported"] == []
    for subset in ("demo", "portrait_720x1280"):
        d = report["decode"][subset]
        assert d["videos"] >= 1 and d["frames"] >= 2 * d["videos"] and d["videos_per_cpu_s"] > 0
    assert report["errors"] == []
    assert report["matmul_tflops"] > 0  # the device's own dense matmul rate, measured by the check
    runs = report["runs"]
    assert [r["new_tokens"] for r in runs] == [16, 0]
    for r in runs:
        assert r["videos"] == 8 and r["failures"] == 1  # --tiny adds a file that is not a video
        assert r["layers_pooled"] == r["num_layers"] + 2  # embeddings, every layer, final norm
        assert r["prompt_tokens"] > 0 and r["padded_tokens"] >= r["prompt_tokens"]
        assert 0 < r["mfu_model"] < 1 and 0 < r["mfu_wall"] <= r["mfu_model"] and r["of_matmul_model"] > 0
        assert r["videos_per_s"] > 0 and r["cores_needed"] > r["decode_cores_needed"] > 0
        assert 0 < r["busy_bound_collate"] < 1 and r["preprocess_s_per_video"] > 0  # the processor ran on decode workers
    assert runs[0]["tflop"]["decode"] > 0 and runs[1]["tflop"]["decode"] == 0
    assert "TEST MODEL" in proc.stdout and "failure: " in proc.stdout and "not_a_video.mp4: decode" in proc.stdout


@pytest.mark.parametrize("name, published_params", [("3b", 3.75e9), ("7b", 8.29e9)])
def test_real_shapes_and_flop_formula_match_the_architecture(tmp_path, name, published_params):
    bench = _load_bench()
    from mvrec import torch_compat

    torch_compat.install()
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(bench.write_model_dir(bench.SHAPES[name], tmp_path / name))
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - published_params) / published_params < 0.01

    def linear_weights(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    # N_text and the vision per-patch weights in the FLOP formula are the model's matmul weights.
    assert bench.text_params(config.get_text_config()) == linear_weights(model.model.language_model.layers)
    vc = config.vision_config
    d = vc.hidden_size
    assert vc.depth * (4 * d * d + 3 * d * vc.intermediate_size) == linear_weights(model.model.visual.blocks)


def test_vision_window_attention_term():
    bench = _load_bench()

    class VC:  # a 16x20-patch frame pair: windows of 8x8 patches -> 2x3 windows (8/8, 8/8/4)
        hidden_size, depth, intermediate_size, patch_size, temporal_patch_size = 1, 2, 0, 14, 2
        spatial_merge_size, out_hidden_size, window_size, fullatt_block_indexes = 2, 0, 112, [1]

    flops = bench.vision_flops(VC, t=1, gh=16, gw=20)
    per_patch = 2 * (2 * 4 + 3 * 2 * 14 * 14)  # 2 x (qkv + proj of 2 blocks + patch embed), d=1
    merger = 2 * (16 * 20 / 4) * 16
    windows = sum((a * b) ** 2 for a in (8, 8) for b in (8, 8, 4))
    assert flops == pytest.approx(16 * 20 * per_patch + merger + 4 * ((16 * 20) ** 2 + windows))
