"""Inside a vLLM worker: record routing at vLLM's own expert-selection point, and which request each row is.

These functions run in the worker (through ``LLM.collective_rpc``), so they hold only vLLM-facing code and
return plain NumPy arrays. `SelectionPoint` is the one place moescope attaches to a vLLM model, shared by this
recorder and the live counters (moescope.serve.load_counter); its two capture points, both restored by
``uninstall``:

    router._compute_routing(hidden [N, H], router_logits [N, E]) -> (topk_weights [N, k], topk_ids [N, k])
        the point where vLLM itself captures routed experts (logical ids, before EPLB remapping); inside
        vLLM's compiled graph when the model is compiled (Python here then runs once, at tracing time)
    model forward pre-hook: input_ids [N], positions [N], input_batch.req_ids [R], query_start_loc [R + 1]
        rows of request r are query_start_loc[r]:query_start_loc[r + 1] of this step; the outer model module,
        so it runs in Python at every step, outside the compiled region

The recorder does O(1) work per layer and step (clone, append; eager mode only, see vllm_backend.py); nothing is
moved to the CPU until `take`.
"""

from __future__ import annotations

import numpy as np
import torch

ATTR = "_moescope_vllm_recorder"


class StepRecorder:
    """Per step: the rows' request ids and positions, and one (weights, ids[, logits]) per decoder layer."""

    def __init__(self, runner, decoder_layers: list[int], save_router_output: bool):
        self.runner = runner
        self.layers = {layer: i for i, layer in enumerate(decoder_layers)}  # vLLM layer_id -> moe layer index
        self.save_router_output = save_router_output
        self.steps: list[dict] = []

    # -- capture points ------------------------------------------------------------------------
    def install(self) -> None:
        self.point = SelectionPoint(self.runner.model, self.layers)
        self.point.install(self._new_step, self._record_routing)

    def _record_routing(self, moe_layer: int, router_logits, weights, ids) -> None:
        logits = router_logits.detach().clone() if self.save_router_output else None
        self.steps[-1]["layers"].setdefault(moe_layer, []).append((weights.detach().clone(), ids.detach().clone(), logits))

    def _new_step(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        req_ids, starts = step_requests(self.runner)
        self.steps.append({"req_ids": req_ids, "starts": starts, "input_ids": input_ids.detach().clone(),
                           "positions": positions.detach().clone(), "layers": {}})

    def uninstall(self) -> None:
        self.point.uninstall()

    # -- hand-over -----------------------------------------------------------------------------
    def take(self) -> dict:
        """All rows recorded since the last take, concatenated over steps; clears the buffer.

        Returns req_ids (list[str], one per request slot), req (int32 [T] index into req_ids),
        pos, token_id (int32 [T]), topk_ids (int16 [L, T, k]), topk_weights (float32 [L, T, k]),
        router_output (float32 [L, T, E] or None).
        """
        steps, self.steps = self.steps, []
        names: dict[str, int] = {}
        req, pos, tok, ids, weights, logits = [], [], [], [], [], []
        for step in steps:
            n = int(step["starts"][-1])  # rows past the last request are padding
            if n == 0 or not step["layers"]:
                continue
            slot = np.array([names.setdefault(r, len(names)) for r in step["req_ids"]], dtype=np.int32)
            req.append(np.repeat(slot, np.diff(step["starts"])))
            pos.append(step["positions"][:n].cpu().numpy().astype(np.int32))
            tok.append(step["input_ids"][:n].cpu().numpy().astype(np.int32))
            per_layer = [self._layer_rows(step["layers"], layer, n) for layer in range(len(self.layers))]
            ids.append(torch.stack([p[1] for p in per_layer]).to(torch.int16).cpu().numpy())  # [L, n, k]
            weights.append(torch.stack([p[0] for p in per_layer]).float().cpu().numpy())
            if self.save_router_output:
                logits.append(torch.stack([p[2] for p in per_layer]).float().cpu().numpy())
        if not req:
            return {"req_ids": [], "req": np.zeros(0, np.int32)}
        return {
            "req_ids": list(names), "req": np.concatenate(req), "pos": np.concatenate(pos), "token_id": np.concatenate(tok),
            "topk_ids": np.concatenate(ids, axis=1), "topk_weights": np.concatenate(weights, axis=1),
            "router_output": np.concatenate(logits, axis=1) if logits else None,
        }

    @staticmethod
    def _layer_rows(layers: dict, layer: int, n: int) -> tuple:
        calls = layers.get(layer)
        if not calls:
            raise RuntimeError(f"MoE layer {layer} did not run in a vLLM step")
        merged = tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*calls))
        if merged[1].shape[0] < n:
            raise RuntimeError(f"MoE layer {layer} routed {merged[1].shape[0]} rows for a step of {n} tokens")
        return tuple(None if t is None else t[:n] for t in merged)


# -- the capture points, shared by the recorder above and the live counters (moescope.serve) --------------
class SelectionPoint:
    """vLLM's expert-selection point in a loaded model: each router's routing result, and the start of each step.

    install(on_step, on_routing): on_step(model, args, kwargs) before every forward of the model (outside any
    compiled graph); on_routing(moe_layer, router_logits [N, E], topk_weights [N, k], topk_ids [N, k]) after
    every `_compute_routing` call, which runs inside the compiled graph when vLLM compiles the model.
    """

    def __init__(self, model, layers: dict[int, int] | None = None):
        self.model = model
        self.routers = find_routers(model, layers)  # {moe layer: router}
        self.restore: list = []  # callables undoing what install() did

    def install(self, on_step, on_routing) -> None:
        self.restore += wrap_routers(self.routers, on_routing)
        self.restore.append(self.model.register_forward_pre_hook(on_step, with_kwargs=True).remove)

    def uninstall(self) -> None:
        while self.restore:
            self.restore.pop()()


def find_routers(model, layers: dict[int, int] | None = None) -> dict:
    """{MoE-layer index: vLLM router} of the model's fused-MoE layers.

    `layers` maps vLLM's decoder `layer_id` to the MoE-layer index; None numbers the model's MoE layers
    0..L-1 in decoder order (what `find_moe_layers` does on the Hugging Face model).
    """
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    found = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        layer_id = getattr(module, "layer_id", None)
        if not isinstance(router, BaseRouter) or layer_id is None or (layers is not None and layer_id not in layers):
            continue
        if getattr(getattr(module, "_quant_method", None), "is_monolithic", False):
            raise RuntimeError(f"{name}: this vLLM MoE kernel routes inside the kernel; moescope cannot read it")
        found[layer_id] = router
    if layers is None:
        layers = {layer_id: i for i, layer_id in enumerate(sorted(found))}
    missing = sorted(set(layers) - set(found))
    if missing:
        raise RuntimeError(f"no vLLM router found for decoder layer(s) {missing}")
    return {layers[layer_id]: found[layer_id] for layer_id in sorted(found)}


def wrap_routers(routers: dict, on_routing) -> list:
    """Wrap each router's `_compute_routing` so that `on_routing(moe_layer, router_logits, weights, ids)` sees
    every call's result (`routers` as `find_routers` returns them); returns the callables that undo it."""
    return [_wrap(router, moe_layer, on_routing) for moe_layer, router in routers.items()]


def _wrap(router, moe_layer: int, on_routing):
    original = router._compute_routing  # bound method; the instance attribute shadows it until restored

    def compute_routing(hidden_states, router_logits, indices_type, **kwargs):
        weights, ids = original(hidden_states, router_logits, indices_type, **kwargs)
        on_routing(moe_layer, router_logits, weights, ids)
        return weights, ids

    router._compute_routing = compute_routing
    return lambda: router.__dict__.pop("_compute_routing", None)


def step_requests(runner) -> tuple[list[str], np.ndarray]:
    """The running requests' ids [R] and their row offsets [R + 1] in this step (rows past the last are padding)."""
    req_ids = list(runner.input_batch.req_ids)
    return req_ids, runner.query_start_loc.np[: len(req_ids) + 1].copy()


# -- collective_rpc entry points: `worker` is vLLM's worker object ---------------------------------
def install(worker, decoder_layers: list[int], save_router_output: bool) -> int:
    recorder = StepRecorder(worker.model_runner, decoder_layers, save_router_output)
    recorder.install()
    setattr(worker, ATTR, recorder)
    return len(decoder_layers)


def take(worker) -> dict:
    return getattr(worker, ATTR).take()


def uninstall(worker) -> None:
    recorder = getattr(worker, ATTR, None)
    if recorder is not None:
        recorder.uninstall()
        delattr(worker, ATTR)
