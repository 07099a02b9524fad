"""RoutingRecorder and Taps: the only place moescope puts hooks that observe a model (intervention/hooks.py holds
the ones that change what it computes).

Hooks are global state on the model, so they live inside one context manager whose `finally`
removes exactly the handles it added. Each hook does O(1) Python work: detach, cast, copy, append.
Nothing is converted to Python objects or looped over per token here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from moescope.adapters.discover import forward_param_index
from moescope.adapters.policy import PER_TOKEN_INPUTS, LayerPolicy, layer_policy, router_tensor
from moescope.adapters.spec import MoELayer, Selection
from moescope.errors import MoescopeError, RoutingPolicyError


@dataclass
class LayerChunks:
    """What one MoE layer saw, one entry per forward call since the last `take()`."""

    ids: list[torch.Tensor] = field(default_factory=list)  # int16 [N, k] each
    weights: list[torch.Tensor] = field(default_factory=list)  # float [N, k] each
    router_output: list[torch.Tensor] = field(default_factory=list)  # float16|float32 [N, E] each (if recorded)
    predicted_next: list[torch.Tensor] = field(default_factory=list)  # int16 [N, k]: layer N+1's router on this input
    expert_norms: list[torch.Tensor] = field(default_factory=list)  # float32 [N, k]: ||output|| of each chosen expert


def with_expert_args(args: tuple, kwargs: dict, positions: tuple[int | None, int | None], spec, ids, weights):
    """(args, kwargs) of an experts module's forward with its ids and weights arguments replaced."""
    args, kwargs = list(args), dict(kwargs)
    for name, pos, value in ((spec.ids_arg, positions[0], ids), (spec.weights_arg, positions[1], weights)):
        if name in kwargs or pos is None or pos >= len(args):
            kwargs[name] = value
        else:
            args[pos] = value
    return tuple(args), kwargs


class CallObserver(Protocol):
    """Told about every call of the whole model (`moescope.record`: which sequences and positions a call feeds)."""

    def before(self, args: tuple, kwargs: dict) -> None: ...

    def after(self, output) -> None: ...


def expert_args(args: tuple, kwargs: dict, positions: tuple[int | None, int | None], spec):
    """(ids, weights) an experts module's forward was called with."""
    ids = kwargs[spec.ids_arg] if spec.ids_arg in kwargs else args[positions[0]]
    weights = kwargs[spec.weights_arg] if spec.weights_arg in kwargs else args[positions[1]]
    return ids, weights


class HookHandles:
    """The handles a hook context added; `_remove()` (on exit, and by `__enter__` on a failure) removes exactly them."""

    _handles: list

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class RoutingRecorder(HookHandles):
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
        save_expert_norms: bool = False,
        weights_dtype: torch.dtype = torch.float16,
        logits_dtype: torch.dtype = torch.float16,
        calls: CallObserver | None = None,
    ):
        self.model = model
        self.calls = calls
        self.enabled = True  # False: the layer hooks record nothing (sampling); the call hooks still run
        self.layers = layers
        self.save_router_output = save_router_output
        self.predict_next_layer = predict_next_layer
        self.save_expert_norms = save_expert_norms
        self.weights_dtype = weights_dtype
        self.logits_dtype = logits_dtype
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._chunks = [LayerChunks() for _ in layers]

    # -- hooks -------------------------------------------------------------------------------
    def _experts_input_hook(self, chunks: LayerChunks, ids_pos: int | None, weights_pos: int | None, layer: MoELayer):
        ids_arg, weights_arg = layer.spec.ids_arg, layer.spec.weights_arg
        masked = layer.spec.non_compute.received_as if layer.spec.non_compute and layer.non_compute_ids else None

        def hook(module, args, kwargs):
            if not self.enabled:
                return
            ids = kwargs[ids_arg] if ids_arg in kwargs else args[ids_pos]
            weights = kwargs[weights_arg] if weights_arg in kwargs else args[weights_pos]
            if masked is not None:  # ZAYA: skip reaches the experts as (expert 0, weight 0.0); record skip's own id
                ids = ids.masked_fill((ids == masked) & (weights == 0), layer.non_compute_ids[0])
            chunks.ids.append(ids.detach().reshape(-1, ids.shape[-1]).to("cpu", torch.int16, non_blocking=True))
            chunks.weights.append(
                weights.detach().reshape(-1, weights.shape[-1]).to("cpu", self.weights_dtype, non_blocking=True)
            )

        return hook

    def _router_output_hook(self, chunks: LayerChunks, index: int | None):
        def hook(module, args, output):
            if not self.enabled:
                return
            chunks.router_output.append(router_tensor(output, index).detach().to("cpu", self.logits_dtype))

        return hook

    def _expert_norms_hook(self, chunks: LayerChunks, positions: tuple[int | None, int | None], spec):
        """||output|| of each chosen expert alone, per routing slot (for REAP scores): the experts module's own
        forward (no hooks) run once per slot with that slot's id and weight 1; k extra expert passes."""

        def hook(module, args, kwargs):
            if not self.enabled:
                return
            ids, weights = expert_args(args, kwargs, positions, spec)
            norms = []
            for slot in range(ids.shape[-1]):
                one = with_expert_args(args, kwargs, positions, spec, ids[..., slot : slot + 1],
                                       torch.ones_like(weights[..., slot : slot + 1]))
                out = module.forward(*one[0], **one[1])
                norms.append(out.detach().reshape(-1, out.shape[-1]).float().norm(dim=-1))  # [N]
            chunks.expert_norms.append(torch.stack(norms, dim=-1).to("cpu", non_blocking=True))  # [N, k]

        return hook

    def _lookahead_hook(self, chunks: LayerChunks, router: nn.Module, next_policy: LayerPolicy):
        """Layer N+1's selection policy on layer N's router input: what a prefetcher could know one layer early
        (bias, groups and scoring included); per-token inputs the next router needs (input_ids) are handed on."""
        handed = {name: forward_param_index(router, name) for name in next_policy.needs}

        def hook(module, args, kwargs):
            if not self.enabled:
                return
            inputs = {name: kwargs[name] if name in kwargs else args[pos] for name, pos in handed.items()}
            ids, _ = next_policy.route(args[0] if args else kwargs["hidden_states"], **inputs)  # no hooks run
            chunks.predicted_next.append(ids.to("cpu", torch.int16))

        return hook

    def _router_topk_hook(self, chunks: LayerChunks, policy: LayerPolicy):
        """Routing read from the router's output (custom models, Llama4, JetMoE): selected by the declared policy."""
        index = policy.spec.router_output_index

        def hook(module, args, output):
            if not self.enabled:
                return
            ids, weights = policy.select(output)  # [N, k] each
            chunks.ids.append(ids.to("cpu", torch.int16))
            chunks.weights.append(weights.to("cpu", self.weights_dtype))
            if self.save_router_output:
                chunks.router_output.append(router_tensor(output, index).detach().to("cpu", self.logits_dtype))

        return hook

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "RoutingRecorder":
        try:
            for layer, chunks in zip(self.layers, self._chunks):
                block = self.model.get_submodule(layer.block_path)
                if layer.spec.selection == Selection.ROUTER_TOPK:
                    if self.save_expert_norms:
                        raise MoescopeError(f"--save-expert-norms: the experts of MoE layer {layer.index} "
                                            f"({layer.spec.family}) take no expert ids, so one expert's output "
                                            "cannot be computed alone; capture without it")
                    router = self._router_module(layer)
                    hook = self._router_topk_hook(chunks, layer_policy(self.model, layer))
                    self._handles.append(router.register_forward_hook(hook))
                    continue
                experts = getattr(block, layer.spec.experts_attr)
                ids_pos = forward_param_index(experts, layer.spec.ids_arg)
                weights_pos = forward_param_index(experts, layer.spec.weights_arg)
                hook = self._experts_input_hook(chunks, ids_pos, weights_pos, layer)
                self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
                if self.save_expert_norms:
                    hook = self._expert_norms_hook(chunks, (ids_pos, weights_pos), layer.spec)
                    self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
                if self.save_router_output:
                    router = getattr(block, layer.spec.router_attr)
                    hook = self._router_output_hook(chunks, layer.spec.router_output_index)
                    self._handles.append(router.register_forward_hook(hook))
            if self.predict_next_layer:
                for layer, nxt, chunks in zip(self.layers, self.layers[1:], self._chunks):
                    router = self._router_module(layer)
                    hook = self._lookahead_hook(chunks, router, self._lookahead_policy(router, nxt))
                    self._handles.append(router.register_forward_pre_hook(hook, with_kwargs=True))
            if self.calls is not None:  # outermost: its pre-hook runs before, its hook after every layer's
                calls = self.calls
                self._handles.append(self.model.register_forward_pre_hook(lambda m, args, kwargs: calls.before(args, kwargs),
                                                                          with_kwargs=True))
                self._handles.append(self.model.register_forward_hook(lambda m, args, output: calls.after(output)))
        except BaseException:
            self._remove()
            raise
        return self

    def _lookahead_policy(self, router: nn.Module, nxt: MoELayer) -> LayerPolicy:
        """Layer `nxt`'s policy, or one line saying why it cannot be applied to the previous router's input."""
        try:
            policy = layer_policy(self.model, nxt)
        except RoutingPolicyError as err:
            raise RoutingPolicyError(f"--predict-next-layer: {err}") from None
        for name in policy.needs:
            if name not in PER_TOKEN_INPUTS or forward_param_index(router, name) is None:
                raise RoutingPolicyError(
                    f"--predict-next-layer cannot predict MoE layer {nxt.index} ({nxt.spec.family}): its router also "
                    f"takes {name}, which the previous layer's router input does not determine (only "
                    f"{', '.join(PER_TOKEN_INPUTS)} can be handed on); capture without --predict-next-layer")
        return policy

    def _router_module(self, layer: MoELayer) -> nn.Module:
        block = self.model.get_submodule(layer.block_path)
        return block.get_submodule(layer.spec.router_attr) if layer.spec.router_attr else block  # custom: the router itself

    def take(self, synchronize: bool = True) -> list[LayerChunks]:
        """Hand over everything recorded since the last call and start afresh.

        The hooks' device-to-host copies are asynchronous (PyTorch pins their destination): unless
        `synchronize`, the caller must wait for the device (a CUDA event) before reading the tensors.
        """
        if synchronize and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        taken = []
        for chunks in self._chunks:  # the hooks hold these objects: empty them, don't replace them
            taken.append(LayerChunks(chunks.ids, chunks.weights, chunks.router_output, chunks.predicted_next,
                                     chunks.expert_norms))
            chunks.ids, chunks.weights, chunks.router_output, chunks.predicted_next = [], [], [], []
            chunks.expert_norms = []
        return taken


class Taps(HookHandles):
    """Hooks for a sweep: router inputs and float32 router scores per MoE layer, decoder-layer outputs.

    Same discipline as RoutingRecorder: O(1) work per hook, removed in `__exit__` (also on error).
    """

    def __init__(self, routers: list[nn.Module], layers: list[MoELayer], *, inputs: bool,
                 decoder_layers: list[nn.Module] = ()):
        self.routers, self.layers, self.inputs, self.decoder_layers = routers, layers, inputs, list(decoder_layers)
        self.x = [[] for _ in routers]
        self.rank = [2 for _ in routers]  # of each router's input: 3 when the block hands it [B, T, H]
        self.scores = [[] for _ in routers]
        self.outputs = [[] for _ in self.decoder_layers]
        self._handles = []

    def __enter__(self) -> "Taps":
        try:
            for i, (router, layer) in enumerate(zip(self.routers, self.layers)):
                index = layer.spec.router_output_index
                self._handles.append(router.register_forward_hook(
                    lambda m, a, out, i=i, index=index: self.scores[i].append(router_tensor(out, index).detach().float())))
                if self.inputs:
                    self._handles.append(router.register_forward_pre_hook(lambda m, a, i=i: self._input(i, a[0])))
            for i, module in enumerate(self.decoder_layers):  # copied: a later layer may work in place
                self._handles.append(module.register_forward_hook(lambda m, a, out, i=i: self.outputs[i].append(clone_output(out))))
        except BaseException:
            self._remove()
            raise
        return self

    def _input(self, i: int, x: torch.Tensor) -> None:
        self.rank[i] = x.dim()
        self.x[i].append(x.detach().reshape(-1, x.shape[-1]))

    def take(self):
        taken = (self.x, self.scores, self.outputs)
        self.x, self.scores = [[] for _ in self.routers], [[] for _ in self.routers]
        self.outputs = [[] for _ in self.decoder_layers]
        return taken


def clone_output(output):
    """A module's output, detached and copied (tensors inside tuples and lists too)."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, (tuple, list)):
        return type(output)(clone_output(o) for o in output)
    return output


class GenerateArguments:
    """Context manager that lets `on_call(kwargs)` see the keyword arguments of every `model.generate(...)` call
    (the EOS a call passes never reaches the forward passes the other hooks see). It shadows the bound method
    with an instance attribute for the block and deletes exactly that attribute on exit; nothing else changes."""

    def __init__(self, model: nn.Module, on_call: Callable[[dict | None], None]):
        self.model, self.on_call = model, on_call
        self._installed = False

    def __enter__(self) -> "GenerateArguments":
        original = getattr(self.model, "generate", None)
        if callable(original) and "generate" not in vars(self.model):
            def generate(*args, **kwargs):
                self.on_call(kwargs)
                try:
                    return original(*args, **kwargs)
                finally:
                    self.on_call(None)

            self.model.generate = generate
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            del self.model.generate
            self._installed = False
