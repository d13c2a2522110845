"""The worker side of the vLLM backend (tasks/lvlm_vllm.py): hooks that record every layer's pooled
hidden state inside the worker that runs the model.

vLLM has no `output_hidden_states`. The backend passes `HiddenStateRecorder` as the engine's
*worker extension class* (`worker_extension_cls="tasks.vllm_hooks.HiddenStateRecorder"`); vLLM
imports it by name in every worker, in-process or not, and `llm.collective_rpc("mvrec_...")` calls
its methods by name. Its hooks:

- pre-hook of decoder layer 0: its `hidden_states` input is the embedding output (layer 0);
  at this hook we also plan the step: which rows of the flattened batch belong to which request
  (`model_runner.query_start_loc` and `input_batch.req_ids`), which of them are prompt tokens
  (`num_computed_tokens` / `num_prompt_tokens`, so chunked prefill is handled), and which are
  the video tokens (`input_ids == video_token_id`);
- forward hook of decoder layer i: it returns `(hidden, residual)` and their sum is the
  residual stream after i + 1 layers. The sum is taken INSIDE the hook, because the next
  layer's fused add-norm overwrites both tensors in place;
- forward hook of the final norm: the post-norm state (`final`).

Each hook reduces its rows to one sum per request (mean pooling over video tokens, over all
prompt tokens, or the last prompt token, per `spec.pooling`) inside the worker; only those
small `(L + 2, D)` arrays ever leave it. Decode steps carry no prompt tokens and cost nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.lvlm import find_decoder


class _Recorder:
    """Hooks plus per-request accumulators, living in the worker next to the model."""

    def __init__(self, runner: Any, video_token_id: int, pooling: str):
        import torch

        self.torch = torch
        self.runner = runner
        self.video_token_id = int(video_token_id)
        self.pooling = pooling
        layers, norm = find_decoder(runner.get_model())
        self.num_layers = len(layers)
        self.handles = []
        # per step
        self.plan: list[tuple[str, int]] = []  # (req_id, n_rows) in segment order
        self.rows: Any = None  # LongTensor of flat rows to pool
        self.seg: Any = None  # LongTensor: segment (plan entry) of each row
        self.step_sums: Any = None  # (n_plan, L + 2, D) float32 on the model's device
        # across steps, keyed by vLLM's internal request id
        self.sums: dict[str, Any] = {}  # (L + 2, D) float64 on CPU
        self.counts: dict[str, int] = {}
        self.n_video: dict[str, int] = {}

        self.handles.append(layers[0].register_forward_pre_hook(self._pre_hook_first, with_kwargs=True))
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._make_layer_hook(i + 1)))
        self.handles.append(norm.register_forward_hook(self._norm_hook))

    # -- planning -----------------------------------------------------------------------------
    def _flush(self) -> None:
        if self.step_sums is None:
            return
        sums = self.step_sums.double().cpu()
        for j, (rid, n) in enumerate(self.plan):
            if rid in self.sums:
                self.sums[rid] += sums[j]
            else:
                self.sums[rid] = sums[j].clone()
            self.counts[rid] = self.counts.get(rid, 0) + n
        self.step_sums = None
        self.plan = []

    def _plan_step(self, hidden: Any) -> None:
        torch = self.torch
        self._flush()
        runner = self.runner
        ib = runner.input_batch
        num_reqs = int(ib.num_reqs)
        if num_reqs == 0:
            return
        qsl = runner.query_start_loc.np[: num_reqs + 1]
        ids = runner.input_ids.cpu
        req_ids = ib.req_ids
        plan, rows, seg = [], [], []
        for i in range(num_reqs):
            rid = req_ids[i]
            if rid is None:
                continue
            start, end = int(qsl[i]), int(qsl[i + 1])
            done = int(ib.num_computed_tokens_cpu[i])
            n_prompt = int(ib.num_prompt_tokens[i])
            if end <= start or done >= n_prompt:
                continue  # a decode step for this request
            k = min(end - start, n_prompt - done)  # prompt rows of this request in this step
            is_video = ids[start : start + k] == self.video_token_id
            self.n_video[rid] = self.n_video.get(rid, 0) + int(is_video.sum())
            if self.pooling == "video":
                r = torch.nonzero(is_video).flatten() + start
            elif self.pooling == "prompt":
                r = torch.arange(start, start + k)
            else:  # last prompt token, once the prompt's end is in this step
                r = torch.tensor([start + k - 1] if done + k == n_prompt else [], dtype=torch.long)
            plan.append((rid, int(r.numel())))
            rows.append(r)
            seg.append(torch.full((r.numel(),), len(plan) - 1, dtype=torch.long))
        if not plan:
            return
        self.plan = plan
        self.rows = torch.cat(rows).to(hidden.device)
        self.seg = torch.cat(seg).to(hidden.device)
        self.step_sums = torch.zeros(
            (len(plan), self.num_layers + 2, hidden.shape[-1]), dtype=torch.float32, device=hidden.device
        )

    def _record(self, row: int, h: Any) -> None:
        if self.step_sums is None:
            return
        picked = h.index_select(0, self.rows).float()
        self.step_sums[:, row].index_add_(0, self.seg, picked)

    # -- hooks --------------------------------------------------------------------------------
    def _pre_hook_first(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
        self._plan_step(hidden)
        residual = args[2] if len(args) > 2 else kwargs.get("residual")
        self._record(0, hidden if residual is None else hidden + residual)

    def _make_layer_hook(self, row: int):
        def hook(module: Any, args: tuple, output: Any) -> None:
            if self.step_sums is None:
                return
            if isinstance(output, tuple):
                hidden, residual = output[0], output[1] if len(output) > 1 else None
            else:
                hidden, residual = output, None
            # Sum now: the next fused add-norm overwrites hidden and residual in place.
            self._record(row, hidden if residual is None else hidden + residual)

        return hook

    def _norm_hook(self, module: Any, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self._record(self.num_layers + 1, out)

    # -- results ------------------------------------------------------------------------------
    def collect(self) -> dict[str, dict[str, Any]]:
        """Pooled (L + 2, D) float32 per request, as bytes (msgpack/pickle safe); then forget them."""
        self._flush()
        out = {}
        for rid, s in self.sums.items():
            n = self.counts.get(rid, 0)
            mean = (s / n).float().numpy() if n > 0 else np.full(tuple(s.shape), np.nan, np.float32)
            out[rid] = {
                "data": np.ascontiguousarray(mean, dtype=np.float32).tobytes(),
                "shape": list(mean.shape),
                "count": n,
                "n_video": self.n_video.get(rid, 0),
            }
        self.reset()
        return out

    def reset(self) -> None:
        self.sums, self.counts, self.n_video = {}, {}, {}
        self.plan, self.step_sums = [], None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class HiddenStateRecorder:
    """vLLM worker extension (`worker_extension_cls`): its methods become worker methods that
    `llm.collective_rpc("mvrec_...")` calls by name, in-process or in worker processes."""

    def mvrec_install_hooks(self, video_token_id: int, pooling: str) -> int:
        old = getattr(self, "_mvrec_recorder", None)
        if old is not None:
            old.remove()
        rec = _Recorder(self.model_runner, video_token_id, pooling)
        self._mvrec_recorder = rec
        return rec.num_layers

    def mvrec_collect(self) -> dict[str, dict[str, Any]]:
        return self._mvrec_recorder.collect()

    def mvrec_reset(self) -> bool:
        rec = getattr(self, "_mvrec_recorder", None)
        if rec is not None:
            rec.reset()
        return True
