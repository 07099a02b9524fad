"""RoutingMonitor: routing statistics and alerts every N training steps, inside `Trainer` or a plain loop.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[moescope.RoutingMonitor(every=10, out="monitor")])

    with moescope.RoutingMonitor(model, every=10, out="monitor") as monitor:    # a plain PyTorch loop
        for batch in loader:
            model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
            monitor.step()

The forward passes of every Nth step (steps 0, N, 2N, ...) are recorded by RoutingRecorder (its layer hooks
only between the start and the end of one top-level call of the model, so a recomputed forward pass of
gradient checkpointing is not counted twice), padding dropped by the attention mask, router logits kept.
At the step's end the statistics are computed (metrics.py), checked (alerts.py), kept as rows (step, layer,
metric, value) — `out/metrics.parquet`, written when training ends — and, inside Trainer, logged as scalars
`moe/<metric>` (all layers) and `moe/<metric>/layer<L>`, so TensorBoard and W&B get them; alerts are
appended to `out/alerts.jsonl` as they trip.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from moescope.adapters.discover import find_moe_layers
from moescope.errors import MoescopeError
from moescope.monitor.alerts import AlertState, Thresholds
from moescope.monitor.metrics import step_metrics
from moescope.pipeline.analyze import analysis_context
from moescope.recording.batches import Batch
from moescope.trace.block import Sequence, TokenBlock, shard_tables
from moescope.recording.hooks import RoutingRecorder
from moescope.recording.manifest_info import build_manifest
from moescope.recording.rows import block_from_forward
from moescope.recording.session import _RECORDING, _pick_layers
from moescope.trace.manifest import atomic_write_bytes
from moescope.trace.memory import MemoryTrace


class RoutingMonitor(TrainerCallback):
    """Router health during training: load, entropy, aux losses, dead experts, alerts (see the module docstring).

    Parameters
    ----------
    model : the MoE model (optional inside Trainer, which hands it over at the start of training).
    every : check every Nth optimizer step.
    out : folder for metrics.parquet and alerts.jsonl (None: kept in memory, `.metrics` and `.alerts`).
    layers, router : MoE layers to watch (default all); a ``CustomRouter`` for a model of your own.
    cold_factor, dead_after, collapse_ratio, trend_window, trend_drop : alert thresholds (alerts.py).
    """

    def __init__(self, model: nn.Module | None = None, *, every: int = 10, out: str | os.PathLike | None = None,
                 layers=None, router=None, cold_factor: float = 0.1, dead_after: int = 3, collapse_ratio: float = 0.3,
                 trend_window: int = 5, trend_drop: float = 0.2):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise MoescopeError(f"every must be a whole number of steps >= 1, not {every!r}")
        self.every, self.out = every, (Path(out) if out is not None else None)
        self.thresholds = Thresholds(cold_factor, dead_after, collapse_ratio, trend_window, trend_drop)
        self._layer_choice, self._router = layers, router
        self.model: nn.Module | None = None
        self.alerts: list[dict] = []
        self._frames: list[pd.DataFrame] = []
        self._recorder: RoutingRecorder | None = None
        self._steps = 0  # optimizer steps finished (plain loop)
        self._measuring = False
        self._blocks: list[TokenBlock] = []
        self._sequences: list[Sequence] = []
        self._pending_logs: dict[str, float] = {}
        if model is not None:
            self._prepare(model)

    # -- set-up ---------------------------------------------------------------------------------------
    def _prepare(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise MoescopeError(f"RoutingMonitor watches a torch model (nn.Module), not {type(model).__name__}")
        self.model = model
        self.layers = _pick_layers(find_moe_layers(model, self._router), self._layer_choice)  # one line if no MoE layers
        self._manifest = build_manifest(model, self.layers, opts={"mode": "monitor", "weights_dtype": "float16"},
                                        model_info={"id": getattr(getattr(model, "config", None), "_name_or_path", "")
                                                    or type(model).__name__}, corpus_info={"spec": "training"})
        self._ctx = analysis_context(MemoryTrace(self._manifest, []), router_output_kind="logits")
        self._state = AlertState(self.thresholds, len(self.layers), self._ctx.n_experts)

    def start(self, model: nn.Module | None = None) -> "RoutingMonitor":
        """Put the hooks on (the model given here or at construction); `stop()` takes them off."""
        if model is not None and model is not self.model:
            self._prepare(model)
        if self.model is None:
            raise MoescopeError("RoutingMonitor has no model: pass it (RoutingMonitor(model)) or use it as a Trainer callback")
        if self._recorder is not None:
            return self
        if self.model in _RECORDING:
            raise MoescopeError("this model is already being recorded or monitored; one recorder per model")
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        self._recorder = RoutingRecorder(self.model, self.layers, save_router_output=True, calls=self)
        self._recorder.__enter__()
        self._recorder.enabled = False
        _RECORDING.add(self.model)
        self._measuring = self._steps % self.every == 0
        return self

    def stop(self) -> None:
        """Take the hooks off and write metrics.parquet."""
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None
            _RECORDING.discard(self.model)
        self._write_metrics()

    def __enter__(self) -> "RoutingMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- CallObserver: only the top-level calls of a measured step are recorded -----------------------
    def before(self, args: tuple, kwargs: dict) -> None:
        self._recorder.take()
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        self._call = (ids, kwargs.get("attention_mask")) if self._measuring and isinstance(ids, torch.Tensor) else None
        self._recorder.enabled = self._call is not None

    def after(self, output) -> None:
        if self._call is None:
            return
        (ids, mask), self._call = self._call, None
        chunks = self._recorder.take()
        self._recorder.enabled = False
        ids = ids.detach().cpu()
        keep = mask.detach().cpu().bool() if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else torch.ones_like(ids, dtype=torch.bool)
        first = len(self._sequences)
        rows = [Sequence(first + i, [], "train", "train", "", "") for i in range(ids.shape[0])]
        pos = torch.where(keep, keep.long().cumsum(1) - 1, -1)
        self._blocks.append(block_from_forward(Batch(rows, ids, keep.long(), pos), chunks, None))
        self._sequences += [s for s, n in zip(rows, keep.sum(1).tolist()) if n]

    # -- the plain loop -------------------------------------------------------------------------------
    def step(self, step: int | None = None) -> list[dict]:
        """Call once after each optimizer step; returns the alerts this step raised (a check every `every` steps)."""
        if self._recorder is None:
            self.start()
        step = self._steps if step is None else step
        alerts = self._check(step) if self._measuring else []
        self._steps += 1
        self._measuring = self._steps % self.every == 0
        return alerts

    @property
    def metrics(self) -> pd.DataFrame:
        """Every check so far: rows (step, layer, metric, value); layer -1 pools all layers."""
        if not self._frames:
            return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype="int64"),
                                 "metric": pd.Series(dtype="str"), "value": pd.Series(dtype="float64")})
        return pd.concat(self._frames, ignore_index=True)

    # -- one check ------------------------------------------------------------------------------------
    def _check(self, step: int) -> list[dict]:
        blocks, sequences = self._blocks, self._sequences
        self._blocks, self._sequences = [], []
        if not sequences:
            return []
        tables = shard_tables(blocks, sequences)
        shard = next(MemoryTrace(self._manifest, [tables]).shards())
        stats = step_metrics(shard, self._ctx)
        n_layers = stats.share.shape[0]
        alerts, n_cold, n_dead = self._state.check(step, stats.share, stats.values["router_entropy"][:n_layers],
                                                   stats.labels[:n_layers])
        counts = {"n_cold": n_cold, "n_dead": n_dead}
        self._frames.append(stats.rows(step, counts))
        self._pending_logs = stats.scalars(counts)
        self.alerts += alerts
        if alerts and self.out is not None:
            with open(self.out / "alerts.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(a) + "\n" for a in alerts)
        return alerts

    def _write_metrics(self) -> None:
        if self.out is None or not self._frames:
            return
        import io

        buffer = io.BytesIO()
        self.metrics.to_parquet(buffer, index=False)
        atomic_write_bytes(self.out / "metrics.parquet", buffer.getvalue())

    # -- transformers Trainer -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _run_first(self)
        self._steps = state.global_step
        self.start(model if model is not None else self.model)

    def on_step_begin(self, args, state, control, **kwargs):
        self._measuring = state.global_step % self.every == 0

    def on_step_end(self, args, state, control, **kwargs):
        if self._measuring:
            self._check(state.global_step)
            control.should_log = True  # the scalars go out with this step's log (on_log)
        self._measuring = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending_logs:
            logs.update(self._pending_logs)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending_logs)  # Trainer copied this log there before on_log
            self._pending_logs = {}

    def on_save(self, args, state, control, **kwargs):
        self._write_metrics()

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()


def _run_first(monitor: RoutingMonitor) -> None:
    """Move the monitor to the front of the Trainer's callbacks, so the logging integrations (TensorBoard, W&B),
    which Trainer puts before user callbacks, see the scalars it adds to each log. transformers hands a callback
    no handle on the Trainer, so the handler is the caller of this event."""
    frame = inspect.currentframe()
    caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
    handler = caller.f_locals.get("self") if caller is not None else None
    if isinstance(handler, CallbackHandler) and monitor in handler.callbacks:
        handler.callbacks.remove(monitor)
        handler.callbacks.insert(0, monitor)
