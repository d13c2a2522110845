"""A tiny random-weight Qwen-VL model, built locally: no hub, no download.

Why: tests, the demo and the benchmarks need a real Qwen2.5-VL / Qwen3-VL *architecture* (the
same processor, video tokens, M-RoPE and decoder layers as the real checkpoints) but not real
weights. `build_test_model(dir)` writes a directory that loads with
`AutoProcessor.from_pretrained(dir)` and `AutoModelForImageTextToText.from_pretrained(dir)`
under HF_HUB_OFFLINE=1, is under 5 MB and builds in well under 2 s.

The recipe:
- a byte-level BPE tokenizer (vocab 2048) trained here on generated text, plus the Qwen special
  tokens and the Qwen2-VL chat template;
- the processor with min_pixels=56*56 and max_pixels=224*224 per frame (without min_pixels a
  224x224 frame would be upscaled to 336x336);
- text head_dim = hidden / heads >= 32, so vLLM's CPU attention accepts it, and an mrope_section
  that sums to head_dim / 2.

Its config carries `mvrec_test_model: true`; `tasks.lvlm.is_test_model()` reads it so every
command that loads such a model can say that its captions and features mean nothing.
"""

from __future__ import annotations

import random
from pathlib import Path

from mvrec import torch_compat
from tasks.lvlm import TEST_MODEL_FLAG

ARCHS = ("qwen2_5_vl", "qwen3_vl")
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224
MAX_FRAMES = 32  # Qwen3-VL's video budget is per video, so it is MAX_PIXELS * MAX_FRAMES

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The Qwen2-VL chat template (as shipped with Qwen/Qwen2-VL-*-Instruct). Qwen3-VL's own template
# differs only in the default system prompt; its processor adds the per-frame timestamps itself.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "a the this video shows person people dog cat car street city beach sea sky sun night day "
    "red green blue yellow white black orange purple pink bright dark light colour colours "
    "moving dancing running walking cooking eating playing singing talking jumping spinning "
    "circle square triangle shape shapes pattern stripes dots wave waves fast slow small large "
    "one two three in on at with and of to from over under near far left right up down camera "
    "view close clip scene micro short funny cute beautiful music food game sport travel nature "
    "describe sentence frame frames seconds title topic background foreground is are was were"
).split()


def _corpus(seed: int, n_sentences: int = 3000) -> list[str]:
    """Deterministic training text for the tokenizer: sentences of common caption words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ":"]) + f" {rng.randint(0, 999)}")
    return lines


def _build_tokenizer(seed: int, vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",  # batched generation needs left padding
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        model_max_length=32768,
    )


def _build_config(arch: str, tok, layers: int, hidden: int, heads: int, kv_heads: int):
    if hidden % heads:
        raise ValueError(f"hidden: {hidden} is not divisible by heads={heads}")
    head_dim = hidden // heads
    if head_dim % 2:
        raise ValueError(f"hidden/heads: head_dim {head_dim} must be even for rotary embeddings")
    if heads % kv_heads:
        raise ValueError(f"kv_heads: {kv_heads} must divide heads={heads}")
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width): 1/4, 3/8, 3/8.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    mrope_section = [t, h, half - t - h]
    vocab = ((len(tok) + 63) // 64) * 64
    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope_section}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = head_dim
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope_section,
                                   "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=256, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    raise ValueError(f"arch: unknown test-model architecture {arch!r} (choose {', '.join(ARCHS)})")


def _build_processor(arch: str, tok):
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        image = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        # frames arrive already capped per frame by tasks.decode; False keeps transformers quiet
        video = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, cap_pixels_per_frame=False)
        return Qwen2_5_VLProcessor(image_processor=image, video_processor=video, tokenizer=tok,
                                   chat_template=CHAT_TEMPLATE)
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    # Real Qwen3-VL checkpoints normalise images and video with mean = std = 0.5; so must we, or
    # vLLM (which normalises video with the image processor's values) disagrees with transformers.
    image = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=16,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    # Qwen3-VL's video budget counts all frames together; frames arrive already sampled.
    video = Qwen3VLVideoProcessor(size={"shortest_edge": MIN_PIXELS * 2, "longest_edge": MAX_PIXELS * MAX_FRAMES},
                                  patch_size=16, do_sample_frames=False, cap_pixels_per_frame=False)
    return Qwen3VLProcessor(image_processor=image, video_processor=video, tokenizer=tok,
                            chat_template=CHAT_TEMPLATE)


def build_test_model(
    out_dir: str | Path,
    arch: str = "qwen2_5_vl",
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-weight test model to out_dir and return the directory. Deterministic by seed."""
    torch_compat.install()
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars for a 4 MB file are noise
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown test-model architecture {arch!r} (choose {', '.join(ARCHS)})")
    if layers < 1:
        raise ValueError(f"layers: must be at least 1, got {layers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _build_tokenizer(seed)
    config = _build_config(arch, tok, layers, hidden, heads, kv_heads)
    setattr(config, TEST_MODEL_FLAG, True)

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=config.text_config.bos_token_id,
    )
    model.save_pretrained(out)
    _build_processor(arch, tok).save_pretrained(out)
    return out
