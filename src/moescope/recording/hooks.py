"""RoutingRecorder: the only place moescope puts hooks on a model.

Hooks are global state on the model, so they live inside one context manager whose `finally`
removes exactly the handles it added. Each hook does O(1) Python work: detach, cast, copy, append.
Nothing is converted to Python objects or looped over per token here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from moescope.adapters.discover import forward_param_index
from moescope.adapters.spec import MoELayer, RouterOutput, Scoring, Selection


@dataclass
class LayerChunks:
    """What one MoE layer saw, one entry per forward call since the last `take()`."""

    ids: list[torch.Tensor] = field(default_factory=list)  # int16 [N, k] each
    weights: list[torch.Tensor] = field(default_factory=list)  # float [N, k] each
    router_output: list[torch.Tensor] = field(default_factory=list)  # float16 [N, E] each (if recorded)
    predicted_next: list[torch.Tensor] = field(default_factory=list)  # int16 [N, k]: layer N+1's router on this input


class CallObserver(Protocol):
    """Told about every call of the whole model (`moescope.record`: which sequences and positions a call feeds)."""

    def before(self, args: tuple, kwargs: dict) -> None: ...

    def after(self, output) -> None: ...


def select_topk(scores: torch.Tensor, spec, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) [N, k] from a router output [N, E], by the declared scoring rule."""
    if spec.router_output == RouterOutput.PROBS:
        weights, ids = scores.topk(k, dim=-1)
    elif spec.scoring == Scoring.SIGMOID:  # Llama4: sigmoid of the top-k logits
        top, ids = scores.topk(k, dim=-1)
        weights = top.sigmoid()
    elif spec.scoring == Scoring.SOFTMAX_TOPK:  # softmax over the k selected logits
        top, ids = scores.topk(k, dim=-1)
        return top.softmax(-1), ids
    else:  # softmax over all experts, then top-k
        weights, ids = scores.softmax(-1).topk(k, dim=-1)
    if spec.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def _router_tensor(output, index: int | None) -> torch.Tensor:
    tensor = output if index is None or isinstance(output, torch.Tensor) else output[index]
    return tensor.reshape(-1, tensor.shape[-1])


class RoutingRecorder:
    """Context manager recording, per MoE layer, the expert ids and gate weights the experts received.

    >>> with RoutingRecorder(model, layers) as rec:   # doctest: +SKIP
    ...     model(input_ids)
    ...     chunks = rec.take()                      # list[LayerChunks], one per MoE layer
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[MoELayer],
        *,
        save_router_output: bool = False,
        predict_next_layer: bool = False,
        weights_dtype: torch.dtype = torch.float16,
        calls: CallObserver | None = None,
    ):
        self.model = model
        self.calls = calls
        self.enabled = True  # False: the layer hooks record nothing (sampling); the call hooks still run
        self.layers = layers
        self.save_router_output = save_router_output
        self.predict_next_layer = predict_next_layer
        self.weights_dtype = weights_dtype
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._chunks = [LayerChunks() for _ in layers]

    # -- hooks -------------------------------------------------------------------------------
    def _experts_input_hook(self, chunks: LayerChunks, ids_pos: int | None, weights_pos: int | None, layer: MoELayer):
        ids_arg, weights_arg = layer.spec.ids_arg, layer.spec.weights_arg

        def hook(module, args, kwargs):
            if not self.enabled:
                return
            ids = kwargs[ids_arg] if ids_arg in kwargs else args[ids_pos]
            weights = kwargs[weights_arg] if weights_arg in kwargs else args[weights_pos]
            chunks.ids.append(ids.detach().reshape(-1, ids.shape[-1]).to("cpu", torch.int16, non_blocking=True))
            chunks.weights.append(
                weights.detach().reshape(-1, weights.shape[-1]).to("cpu", self.weights_dtype, non_blocking=True)
            )

        return hook

    def _router_output_hook(self, chunks: LayerChunks, index: int | None):
        def hook(module, args, output):
            if not self.enabled:
                return
            chunks.router_output.append(_router_tensor(output, index).detach().to("cpu", torch.float16))

        return hook

    def _lookahead_hook(self, chunks: LayerChunks, next_router: nn.Module, next_layer: MoELayer):
        """Apply layer N+1's router to layer N's router input: what a prefetcher could know one layer early."""
        index = next_layer.spec.router_output_index

        def hook(module, args):
            if not self.enabled:
                return
            scores = _router_tensor(next_router.forward(args[0]), index)  # forward(): bypasses hooks
            chunks.predicted_next.append(scores.topk(next_layer.top_k, dim=-1).indices.to("cpu", torch.int16))

        return hook

    def _router_topk_hook(self, chunks: LayerChunks, layer: MoELayer):
        """Routing read from the router's output (custom models, Llama4, JetMoE): select as declared."""
        spec, k = layer.spec, layer.top_k

        def hook(module, args, output):
            if not self.enabled:
                return
            scores = _router_tensor(output, spec.router_output_index).detach().float()  # [N, E]
            weights, ids = select_topk(scores, spec, k)  # [N, k] each
            chunks.ids.append(ids.to("cpu", torch.int16))
            chunks.weights.append(weights.to("cpu", self.weights_dtype))
            if self.save_router_output:
                chunks.router_output.append(scores.to("cpu", torch.float16))

        return hook

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "RoutingRecorder":
        try:
            for layer, chunks in zip(self.layers, self._chunks):
                block = self.model.get_submodule(layer.block_path)
                if layer.spec.selection == Selection.ROUTER_TOPK:
                    router = self._router_module(layer)
                    self._handles.append(router.register_forward_hook(self._router_topk_hook(chunks, layer)))
                    continue
                experts = getattr(block, layer.spec.experts_attr)
                ids_pos = forward_param_index(experts, layer.spec.ids_arg)
                weights_pos = forward_param_index(experts, layer.spec.weights_arg)
                hook = self._experts_input_hook(chunks, ids_pos, weights_pos, layer)
                self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
                if self.save_router_output:
                    router = getattr(block, layer.spec.router_attr)
                    hook = self._router_output_hook(chunks, layer.spec.router_output_index)
                    self._handles.append(router.register_forward_hook(hook))
            if self.predict_next_layer:
                for layer, nxt, chunks in zip(self.layers, self.layers[1:], self._chunks):
                    router = self._router_module(layer)
                    hook = self._lookahead_hook(chunks, self._router_module(nxt), nxt)
                    self._handles.append(router.register_forward_pre_hook(hook))
            if self.calls is not None:  # outermost: its pre-hook runs before, its hook after every layer's
                calls = self.calls
                self._handles.append(self.model.register_forward_pre_hook(lambda m, args, kwargs: calls.before(args, kwargs),
                                                                          with_kwargs=True))
                self._handles.append(self.model.register_forward_hook(lambda m, args, output: calls.after(output)))
        except BaseException:
            self._remove()
            raise
        return self

    def _router_module(self, layer: MoELayer) -> nn.Module:
        block = self.model.get_submodule(layer.block_path)
        return block.get_submodule(layer.spec.router_attr) if layer.spec.router_attr else block  # custom: the router itself

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take(self, synchronize: bool = True) -> list[LayerChunks]:
        """Hand over everything recorded since the last call and start afresh.

        The hooks' device-to-host copies are asynchronous (PyTorch pins their destination): unless
        `synchronize`, the caller must wait for the device (a CUDA event) before reading the tensors.
        """
        if synchronize and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        taken = []
        for chunks in self._chunks:  # the hooks hold these objects: empty them, don't replace them
            taken.append(LayerChunks(chunks.ids, chunks.weights, chunks.router_output, chunks.predicted_next))
            chunks.ids, chunks.weights, chunks.router_output, chunks.predicted_next = [], [], [], []
        return taken
