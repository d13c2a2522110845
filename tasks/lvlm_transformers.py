"""The transformers LVLM backend: Qwen2.5-VL / Qwen3-VL through AutoModelForImageTextToText.

One batch goes: frames + metadata -> processor (left-padded prompts with the video tokens) ->
one greedy `generate` whose prefill forward also yields the pooled hidden states -> per video a
caption and a float32 (len(layers), D) matrix under the layer convention of tasks/lvlm.py.

How the hidden states are taken. Forward hooks on the decoder pool every selected layer as the
prefill runs, so no (B, S, D) tensor per layer is kept and the prompt is processed once:
    pre-hook on layer 0    -> k = 0, the embedding output (video features merged in)
    hook on layer k-1      -> k = 1..L, the residual stream after k layers (k = L before the norm)
    hook on the final norm -> `final`
The hooks fire on the first forward call only (the prefill); decode steps pass through.
This matches transformers' `output_hidden_states` entry for entry (tests compare them), except
that transformers replaces its last entry with the post-norm state, which is our `final`.
For Qwen3-VL, the deepstack visual features that are added after the first layers are not in
entries 1..3, as in `output_hidden_states` and in vLLM's layer outputs.

`mode` (spec.options["mode"]): "one_pass" (default; hooks inside generate) or "two_pass" (a
forward for the hidden states, then generate). bench/extract.py measures both against
`generate(output_hidden_states=True, return_dict_in_generate=True)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mvrec import torch_compat
from mvrec.config import dtype_name
from tasks.lvlm import (
    FINAL_LAYER,
    BackendOOM,
    ExtractSpec,
    ModelInfo,
    VideoFeatures,
    VideoInput,
    VideoMeta,
    chat_prompt,
    check_pooling,
    clean_caption,
    find_decoder,
    is_test_model,
    layer_rows,
    model_revision,
    parse_layers,
)

torch_compat.install()  # before transformers imports torchvision

import torch  # noqa: E402

MODES = ("one_pass", "two_pass")


# ---------------------------------------------------------------------------------------------
# pooling (tests/test_extract_transformers.py recomputes it from output_hidden_states)


def pooling_weights(input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
                    video_token_id: int) -> torch.Tensor:
    """(B, S) float32 weights, each row summing to 1, that pool a (B, S, D) hidden state."""
    if pooling == "video":
        # Qwen3-VL puts timestamp text between frame groups: the mask, not a span, finds them.
        w = (input_ids == video_token_id).float()
    elif pooling == "prompt":
        w = attention_mask.float()
    elif pooling == "last":
        w = torch.zeros_like(input_ids, dtype=torch.float32)
        w[:, -1] = 1.0  # left padding: every prompt ends at the last position
    else:
        check_pooling(pooling)
    counts = w.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        raise ValueError(f"pooling: {pooling!r} found no tokens to pool in a row of the batch")
    return w / counts


def pool(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, S, D) x (B, S) -> (B, D) float32."""
    return torch.einsum("bs,bsd->bd", weights.to(hidden.device), hidden.float())


# ---------------------------------------------------------------------------------------------
# capture hooks


class _PooledCapture:
    """Forward hooks that pool selected layers during the first forward after `arm()`."""

    def __init__(self, layers, norm, num_layers: int, rows: Sequence[int]):
        self.rows = list(rows)
        self.weights: torch.Tensor | None = None
        self.pooled: dict[int, torch.Tensor] = {}
        self.armed = False
        self.handles = []
        wanted = set(rows)
        if 0 in wanted:
            self.handles.append(layers[0].register_forward_pre_hook(self._pre_hook(0), with_kwargs=True))
        for k in range(1, num_layers + 1):
            if k in wanted:
                self.handles.append(layers[k - 1].register_forward_hook(self._hook(k)))
        # the norm hook is always on: it marks the end of the prefill
        self.handles.append(norm.register_forward_hook(self._norm_hook(num_layers + 1, num_layers + 1 in wanted)))

    def arm(self, weights: torch.Tensor) -> None:
        self.weights, self.pooled, self.armed = weights, {}, True

    def _store(self, row: int, hidden) -> None:
        if self.armed:
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            self.pooled[row] = pool(hidden, self.weights)

    def _pre_hook(self, row):
        def hook(module, args, kwargs):
            self._store(row, args[0] if args else kwargs["hidden_states"])
        return hook

    def _hook(self, row):
        def hook(module, args, output):
            self._store(row, output)
        return hook

    def _norm_hook(self, row, keep):
        def hook(module, args, output):
            if keep:
                self._store(row, output)
            self.armed = False  # decode steps after the prefill pass through
        return hook

    def result(self) -> torch.Tensor:
        """(B, len(rows), D) float32."""
        missing = [r for r in self.rows if r not in self.pooled]
        if missing:
            raise RuntimeError(f"hidden-state hooks did not fire for rows {missing}")
        return torch.stack([self.pooled[r] for r in self.rows], dim=1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# the backend


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device: {device!r} is not auto, cpu, cuda or cuda:N")
    return device


def processor_metadata(meta: VideoMeta):
    """tasks.lvlm.VideoMeta -> transformers.video_utils.VideoMetadata for already-sampled frames."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(
        total_num_frames=meta.total_num_frames, fps=meta.fps, width=meta.width, height=meta.height,
        duration=meta.duration_s, video_backend=meta.backend, frames_indices=list(meta.frames_indices),
    )


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class PreparedVideo:
    """One video through the processor, on the CPU: what a model replica needs, without the frames."""

    video_id: str
    meta: VideoMeta
    inputs: dict[str, torch.Tensor]  # the processor's tensors for a batch of one
    preprocess_s: float


class TransformersPreprocessor:
    """The processor alone (tokenizer, resize, patchify): loads no weights, so decode workers run it
    next to the decoder and the model replica's thread only runs the model."""

    def __init__(self, spec: ExtractSpec):
        from transformers import AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(spec.model, revision=spec.revision or None)
        except OSError as e:
            raise ValueError(f"model: cannot load {spec.model!r} ({str(e).splitlines()[0]})") from e
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # generation appends on the right
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.prompt_text = chat_prompt(self.processor, spec.prompt)
        # Extra processor arguments, e.g. {"size": {...}} to change the processor's pixel budget.
        self.processor_kwargs = dict(spec.options.get("processor_kwargs", {}))

    def preprocess(self, video: VideoInput) -> PreparedVideo:
        t0 = time.perf_counter()
        inputs = self.processor(text=[self.prompt_text], videos=[video.frames],
                                video_metadata=[processor_metadata(video.meta)],
                                do_sample_frames=False,  # frames arrive already sampled by tasks.decode
                                return_tensors="pt", **self.processor_kwargs)
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return PreparedVideo(video.video_id, video.meta, tensors, time.perf_counter() - t0)


def collate_prepared(items: Sequence[PreparedVideo], pad_token_id: int) -> dict[str, torch.Tensor]:
    """What the processor gives for the whole batch: per-token tensors (batch of one, prompt length)
    left-padded to the longest prompt, everything else (patches, grids) concatenated in order."""
    longest = max(item.inputs["input_ids"].shape[1] for item in items)
    out: dict[str, torch.Tensor] = {}
    for key in items[0].inputs:
        values = [item.inputs[key] for item in items]
        per_token = all(v.dim() == 2 and v.shape[0] == 1 and v.shape == item.inputs["input_ids"].shape
                        for v, item in zip(values, items, strict=True))
        if per_token:
            fill = pad_token_id if key == "input_ids" else 0
            values = [torch.nn.functional.pad(v, (longest - v.shape[1], 0), value=fill) for v in values]
        out[key] = torch.cat(values, dim=0)
    return out


class TransformersBackend:
    name = "transformers"

    def __init__(self, spec: ExtractSpec):
        from transformers import AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        check_pooling(spec.pooling)
        self.mode = spec.options.get("mode", "one_pass")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.dtype = getattr(torch, dtype_name(spec.dtype, on_cpu=self.device == "cpu"))
        revision = spec.revision or None
        try:
            self.preprocessor = TransformersPreprocessor(spec)
            self.model = AutoModelForImageTextToText.from_pretrained(spec.model, revision=revision, dtype=self.dtype)
        except OSError as e:
            raise ValueError(f"model: cannot load {spec.model!r} ({str(e).splitlines()[0]})") from e
        self.model.to(self.device).eval()
        self.processor, self.tokenizer = self.preprocessor.processor, self.preprocessor.processor.tokenizer

        config = self.model.config
        text_config = config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.video_token_id = config.video_token_id
        self.layers = parse_layers(spec.layers, self.num_layers)
        self.rows = layer_rows(self.layers, self.num_layers)
        self.info = ModelInfo(
            model=spec.model,
            revision=model_revision(spec.model, spec.revision, config),
            arch=config.model_type,
            num_layers=self.num_layers,
            hidden_size=text_config.hidden_size,
            is_test_model=is_test_model(spec.model),
            dtype=str(self.dtype).removeprefix("torch."),
            device=self.device,
        )
        self.capture = _PooledCapture(*find_decoder(self.model), self.num_layers, self.rows)
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.stop_ids.add(self.tokenizer.eos_token_id)

    # -- preprocessing: TransformersPreprocessor, which decode workers also run ----------------

    def prepare(self, batch: Sequence[VideoInput]) -> dict:
        """Processor outputs for a batch, on the model's device and dtype."""
        return self.collate([self.preprocessor.preprocess(v) for v in batch])

    def collate(self, items: Sequence[PreparedVideo]) -> dict:
        """One padded batch from videos prepared one at a time, on the model's device and dtype."""
        out = {}
        for key, value in collate_prepared(items, self.tokenizer.pad_token_id).items():
            value = value.to(self.device)
            out[key] = value.to(self.dtype) if value.is_floating_point() else value
        return out

    # -- the model ------------------------------------------------------------------------

    def _generate(self, inputs: dict) -> torch.Tensor:
        return self.model.generate(
            **inputs,
            max_new_tokens=self.spec.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def run(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled (B, len(layers), D) float32, new token ids (B, T) or None)."""
        weights = pooling_weights(inputs["input_ids"], inputs["attention_mask"], self.spec.pooling, self.video_token_id)
        prompt_len = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            if self.spec.max_new_tokens <= 0:
                self.capture.arm(weights)
                self.model(**inputs, logits_to_keep=1)
                return self.capture.result(), None
            if self.mode == "two_pass":
                self.capture.arm(weights)
                self.model(**inputs, logits_to_keep=1)
                pooled = self.capture.result()
                sequences = self._generate(inputs)
                return pooled, sequences[:, prompt_len:]
            self.capture.arm(weights)  # the prefill inside generate fills it
            sequences = self._generate(inputs)
            return self.capture.result(), sequences[:, prompt_len:]

    def _caption(self, new_ids: torch.Tensor) -> tuple[str, int]:
        ids = new_ids.tolist()
        count = len(ids)
        for i, tok in enumerate(ids):
            if tok in self.stop_ids:
                count = i + 1
                break
        text = self.tokenizer.decode(ids[:count], skip_special_tokens=True)
        return clean_caption(text), count

    def extract(self, batch: Sequence[VideoInput]) -> list[VideoFeatures]:
        return self.extract_prepared([self.preprocessor.preprocess(v) for v in batch])

    def extract_prepared(self, batch: Sequence[PreparedVideo]) -> list[VideoFeatures]:
        """extract() for videos the preprocessor has already run on (a decode worker, elsewhere)."""
        if not batch:
            return []
        try:
            t1 = time.perf_counter()
            inputs = self.collate(batch)
            pooled, new_ids = self.run(inputs)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            t2 = time.perf_counter()
        except Exception as e:
            if _is_oom(e):
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                raise BackendOOM(len(batch), str(e).splitlines()[0][:200]) from e
            raise
        finally:
            self.capture.armed = False
        pooled = pooled.cpu().numpy()
        n_video = (inputs["input_ids"] == self.video_token_id).sum(dim=1).tolist()
        n_prompt = inputs["attention_mask"].sum(dim=1).tolist()
        share = 1.0 / len(batch)
        out = []
        for i, video in enumerate(batch):
            caption, n_new = self._caption(new_ids[i]) if new_ids is not None else ("", 0)
            out.append(VideoFeatures(
                video_id=video.video_id,
                caption=caption,
                layers=list(self.layers),
                hidden=np.ascontiguousarray(pooled[i], dtype=np.float32),
                pooling=self.spec.pooling,
                n_video_tokens=int(n_video[i]),
                n_prompt_tokens=int(n_prompt[i]),
                n_new_tokens=n_new,
                timings={"preprocess_s": video.preprocess_s, "model_s": (t2 - t1) * share},
            ))
        return out

    def close(self) -> None:
        self.capture.remove()
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


__all__ = ["TransformersBackend", "TransformersPreprocessor", "PreparedVideo", "pooling_weights", "pool", "processor_metadata",
           "FINAL_LAYER"]
