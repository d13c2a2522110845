"""The local test LVLM: build, reload from disk offline, one forward pass on a real decoded video."""

from __future__ import annotations

import json
import sys

import pytest

from mvrec import torch_compat

torch_compat.install()

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from tasks.decode import decode  # noqa: E402
from tasks.lvlm_transformers import processor_metadata  # noqa: E402
from mvrec.devtools.test_model import build_test_model  # noqa: E402
from tasks.lvlm import TEST_MODEL_FLAG, is_test_model  # noqa: E402
from video_clips import encode_clip  # noqa: E402


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return encode_clip(tmp_path_factory.mktemp("clip") / "c.mp4", frames=16)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_round_trip_forward_on_a_decoded_video(tmp_path, clip, arch):
    out = build_test_model(tmp_path / arch, arch=arch)
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 5_000_000, f"{size} bytes"
    config = json.loads((out / "config.json").read_text())
    assert config[TEST_MODEL_FLAG] is True and is_test_model(out)
    text = config["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim >= 32  # vLLM's CPU attention needs it
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2

    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert model.config.model_type == arch
    assert processor.tokenizer.padding_side == "left"

    video = decode(clip, policy="uniform:8")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], videos=[video.frames], video_metadata=[processor_metadata(video.meta)],
                       do_sample_frames=False, return_tensors="pt")
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    # 8 frames of 168x224 -> 4 temporal patches of (168/28)*(224/28) = 48 merged tokens (Qwen2.5, patch 14);
    # Qwen3-VL (patch 16, factor 32) resizes 168x224 to 160x224: 4 x (5*7) = 140.
    assert n_video == (192 if arch == "qwen2_5_vl" else 140)
    with torch.inference_mode():
        out_ = model(**inputs, output_hidden_states=True)
    L = model.config.get_text_config().num_hidden_layers
    assert len(out_.hidden_states) == L + 1
    assert out_.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out_.logits).all()


def test_same_seed_same_weights(tmp_path):
    a = build_test_model(tmp_path / "a", seed=3)
    b = build_test_model(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_is_test_model_is_false_for_others(tmp_path):
    assert not is_test_model("Qwen/Qwen2.5-VL-3B-Instruct")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    assert not is_test_model(tmp_path)


def test_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        build_test_model(tmp_path, arch="llama")
    with pytest.raises(ValueError, match="heads"):
        build_test_model(tmp_path, hidden=130)


def test_two_copies_of_the_import_hook_do_not_call_each_other_forever():
    """A second copy of the hook (another import of the module, e.g. an older install's .pth) next to
    this one: each must skip the other when it looks for the real spec."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_compat_copy", torch_compat.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    torch_compat.install()
    finder = copy._CompatFinder()
    sys.meta_path.insert(0, finder)
    try:
        found = finder.find_spec("torchvision")
        assert found is not None and found.name == "torchvision"
        copy.install()  # idempotent across copies too
        assert sum(type(f).__name__ == "_CompatFinder" for f in sys.meta_path) == 2
    finally:
        sys.meta_path.remove(finder)
