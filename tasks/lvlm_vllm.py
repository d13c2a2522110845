"""The vLLM LVLM backend: captions and every layer's pooled hidden state from ONE `generate` call.

Same interface and layer convention as tasks/lvlm.py (and tasks/lvlm_transformers.py):
row k of `hidden` is the residual stream after k decoder layers (k = 0: embeddings, k = L: the
last decoder layer before the final norm) and `final` is the post-norm state.

How the hidden states are captured: PyTorch hooks on the language model's decoder layers, inside
the worker that runs the model (tasks/vllm_hooks.py). Calling them through `llm.collective_rpc` by
name needs no pickled callables, so `VLLM_ALLOW_INSECURE_SERIALIZATION` is not needed in either
engine mode. Prefix caching is off so that every prompt token is really computed, and the engine
runs eager (no torch.compile / CUDA graphs), because compiled graphs do not call Python hooks.

Engine modes
------------
`[vllm] multiprocessing = false` (the default) runs the engine core in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`): it starts in about 3 s instead of about 20 s, needs no
`__main__` guard and suits Prefect's thread task runner. `true` runs it in a child process; the
calling script then needs an `if __name__ == "__main__":` guard. Both modes are tested.
Tensor parallelism always uses worker processes; the hooks reach them the same way.
One backend is one engine on the GPUs its process sees: more replicas are the data plane's
(`extract.replicas`; tasks/placement.py pins each to its own GPU set).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

from mvrec.config import dtype_name
from tasks.lvlm import (
    ExtractSpec,
    ModelInfo,
    VideoFeatures,
    VideoInput,
    chat_prompt,
    check_pooling,
    clean_caption,
    is_test_model,
    layer_rows,
    model_revision,
    parse_layers,
)

# The worker extension that carries the hooks; vLLM imports it by name in every worker.
_EXT_CLS = "tasks.vllm_hooks.HiddenStateRecorder"


class VideoRejected(ValueError):
    """The engine refused one video's input (too long, malformed frames, ...). The engine lives on."""

    permanent = True  # the same input is refused again

    def __init__(self, video_id: str, reason: str):
        super().__init__(f"{video_id}: the vLLM backend rejected the input: {reason}")
        self.video_id = video_id
        self.reason = reason

    def __reduce__(self):  # crosses process boundaries (replica processes)
        return type(self), (self.video_id, self.reason)


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _set_engine_env(opts: dict[str, Any], on_cpu: bool) -> dict[str, str]:
    """Environment vLLM reads at start-up. Keys present in `opts` win over the environment."""
    env: dict[str, str] = {}
    mp = opts.get("multiprocessing")
    if mp is not None:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if mp else "0"
    elif "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if on_cpu:
        # An explicit KV-cache size also skips vLLM's start-up check that a fraction
        # (gpu_memory_utilization) of the node's RAM is free, which fails on a busy machine.
        if opts.get("cpu_kvcache_space_gib") is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(opts["cpu_kvcache_space_gib"]))
        elif not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        bind = opts.get("cpu_omp_threads_bind")
        if bind is not None:
            if str(bind) == "all":
                raise ValueError("vllm.cpu_omp_threads_bind: 'all' is invalid (use auto, nobind or e.g. 0-1)")
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(bind)
    os.environ.update(env)
    try:  # an earlier engine in this process froze vLLM's env cache
        import vllm.envs as envs

        if hasattr(envs, "disable_envs_cache"):
            envs.disable_envs_cache()
    except Exception:  # pragma: no cover - older/newer vLLM
        pass
    return env


def _norm_params(proc: Any) -> tuple | None:
    if proc is None:
        return None
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is None or std is None:
        return None
    return tuple(round(float(x), 6) for x in (*mean, *std)), float(getattr(proc, "rescale_factor", 1 / 255))


def _video_norm_differs(processor: Any) -> bool:
    """vLLM normalises video pixels on the device with the IMAGE processor's mean/std. Where the
    video processor uses other values, that would change every feature: normalise on the host."""
    img = _norm_params(getattr(processor, "image_processor", None))
    vid = _norm_params(getattr(processor, "video_processor", None))
    return img is not None and vid is not None and img != vid


class VLLMBackend:
    """Offline vLLM engine; `extract` returns captions and pooled layers from one generate call."""

    name = "vllm"

    def __init__(self, spec: ExtractSpec):
        check_pooling(spec.pooling)
        self.spec = spec
        opts = dict(spec.options or {})
        on_cpu = _is_cpu_platform()
        self.engine_env = _set_engine_env(opts, on_cpu)
        # [vllm] dtype wins over [extract] dtype unless it is auto
        dtype = dtype_name(opts.get("dtype") if opts.get("dtype") not in (None, "", "auto") else spec.dtype, on_cpu)

        from transformers import AutoProcessor
        from vllm import LLM

        self.processor = AutoProcessor.from_pretrained(spec.model, revision=spec.revision or None)
        self.tokenizer = self.processor.tokenizer
        self._prompt_text = chat_prompt(self.processor, spec.prompt)

        engine_kwargs: dict[str, Any] = dict(
            model=spec.model,
            revision=spec.revision or None,
            dtype=dtype,
            max_model_len=int(opts.get("max_model_len", 8192)),
            max_num_seqs=int(opts.get("max_num_seqs", 8)),
            tensor_parallel_size=int(opts.get("tensor_parallel_size", 1)),
            limit_mm_per_prompt={"video": 1, "image": 0},
            enable_prefix_caching=False,  # every prompt token must be computed (and hooked)
            enforce_eager=True,  # compiled graphs / CUDA graphs would bypass the hooks
            worker_extension_cls=_EXT_CLS,
            seed=0,
        )
        if _video_norm_differs(self.processor):
            engine_kwargs["mm_device_do_normalize"] = False
        if not on_cpu:
            engine_kwargs["gpu_memory_utilization"] = float(opts.get("gpu_memory_utilization", 0.85))
        if opts.get("mm_processor_kwargs"):
            engine_kwargs["mm_processor_kwargs"] = dict(opts["mm_processor_kwargs"])
        # Any other vLLM engine argument (e.g. max_num_batched_tokens); not part of lineage.
        engine_kwargs.update(dict(opts.get("engine_kwargs") or {}))
        import torch

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process
        # (in-process mode); close() puts the original back.
        self._set_num_threads = torch.set_num_threads
        t0 = time.perf_counter()
        self.llm = LLM(**engine_kwargs)
        self.startup_s = time.perf_counter() - t0

        hf = self.llm.llm_engine.model_config.hf_config
        self.video_token_id = int(hf.video_token_id)
        text_cfg = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        num_layers = self.llm.collective_rpc("mvrec_install_hooks", args=(self.video_token_id, spec.pooling))[0]
        self.layers = parse_layers(spec.layers, num_layers)
        self.rows = layer_rows(self.layers, num_layers)
        self.info = ModelInfo(
            model=spec.model,
            revision=model_revision(spec.model, spec.revision, hf),
            arch=str(getattr(hf, "model_type", "")),
            num_layers=num_layers,
            hidden_size=int(text_cfg.hidden_size),
            is_test_model=is_test_model(spec.model),
            dtype=dtype,
            device="cpu" if on_cpu else "cuda",
        )
        self._sampling = self._sampling_params()

    def _sampling_params(self):
        from vllm import SamplingParams

        kw: dict[str, Any] = {}
        # transformers' generate() applies the model's generation_config; so do we (greedy).
        try:
            diff = self.llm.llm_engine.model_config.get_diff_sampling_param()
        except Exception:
            diff = {}
        if diff.get("repetition_penalty") not in (None, 1.0):
            kw["repetition_penalty"] = float(diff["repetition_penalty"])
        return SamplingParams(
            temperature=0.0, max_tokens=int(self.spec.max_new_tokens), detokenize=False, **kw
        )

    def _request(self, v: VideoInput) -> dict[str, Any]:
        frames = np.ascontiguousarray(v.frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0 or frames.dtype != np.uint8:
            raise VideoRejected(v.video_id, f"frames must be (T>0, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        m = v.meta
        meta = {
            "total_num_frames": int(m.total_num_frames),
            "fps": float(m.fps),
            "duration": float(m.duration_s),
            "frames_indices": [int(i) for i in m.frames_indices],
            "video_backend": m.backend or "decord",
            "do_sample_frames": False,
            "width": int(frames.shape[2]),
            "height": int(frames.shape[1]),
        }
        return {"prompt": self._prompt_text, "multi_modal_data": {"video": (frames, meta)}}

    def _generate(self, prompts: list[dict[str, Any]]):
        """One generate call; returns (outputs, pooled per external request id)."""
        self.llm.collective_rpc("mvrec_reset")
        outs = self.llm.generate(prompts, self._sampling, use_tqdm=False)
        pooled_by_rid = self.llm.collective_rpc("mvrec_collect")[0]
        by_ext: dict[str, dict[str, Any]] = {}
        for rid, val in pooled_by_rid.items():
            by_ext[rid] = val
            by_ext.setdefault(rid.rsplit("-", 1)[0], val)  # vLLM's internal id: "<ours>-<suffix>"
        return outs, by_ext

    def extract(self, batch: Sequence[VideoInput]) -> list[VideoFeatures]:
        if not batch:
            return []
        t0 = time.perf_counter()
        prompts = [self._request(v) for v in batch]
        t1 = time.perf_counter()
        try:
            outs, pooled = self._generate(prompts)
        except Exception as e:  # noqa: BLE001 - the engine refused an input; it stays usable
            self.llm.collective_rpc("mvrec_reset")
            if len(batch) == 1:
                raise VideoRejected(batch[0].video_id, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
            # tasks.extract retries a failed batch one video at a time to name the culprit.
            raise
        t2 = time.perf_counter()
        results = []
        share = 1.0 / len(batch)
        for v, out in zip(batch, outs, strict=True):
            entry = pooled.get(out.request_id)
            if entry is None:
                raise RuntimeError(f"{v.video_id}: no hidden states were recorded for request {out.request_id}")
            full = np.frombuffer(entry["data"], dtype=np.float32).reshape(entry["shape"])
            if not np.isfinite(full).all():
                raise VideoRejected(v.video_id, "no tokens to pool (no video tokens in the prompt?)")
            ids = list(out.outputs[0].token_ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            results.append(
                VideoFeatures(
                    video_id=v.video_id,
                    caption=clean_caption(text),
                    layers=list(self.layers),
                    hidden=np.ascontiguousarray(full[self.rows], dtype=np.float32),
                    pooling=self.spec.pooling,
                    n_video_tokens=int(entry["n_video"]),
                    n_prompt_tokens=len(out.prompt_token_ids or []),
                    n_new_tokens=len(ids),
                    timings={"preprocess_s": (t1 - t0) * share, "model_s": (t2 - t1) * share},
                )
            )
        return results

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        del llm
        import gc

        gc.collect()
        original = getattr(self, "_set_num_threads", None)
        if original is not None:
            import torch

            torch.set_num_threads = original
