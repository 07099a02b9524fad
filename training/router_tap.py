"""What the shipped models' routers computed in a forward pass, for training losses and evaluation.

moescope's capture (`moescope.recording`) records what the experts RECEIVED; training needs something
else: the router logits with their autograd graph (for the balance and z-losses) next to the ids the
model chose. `tap_routers` hooks the routers of the three shipped MoE architectures, which all sit at
``*.mlp.gate`` (Qwen3-MoE's and DeepSeek-V3's TopkRouter: ``(logits, top-k weights, top-k ids)``) or
``*.moe.router`` (tiny-varmoe's plain Linear: logits, then softmax -> top-k, as its block does). The
hooks live only inside the context manager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class RouterCall:
    """One MoE layer's router outputs, one entry per forward call since the last `clear()`."""

    logits: list[torch.Tensor] = field(default_factory=list)  # (N, E) each, graph kept
    ids: list[torch.Tensor] = field(default_factory=list)  # (N, k) each, the experts the model chose

    def clear(self) -> None:
        self.logits.clear()
        self.ids.clear()


def router_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of every router, in layer order (DeepSeek-V3's dense first layer has none)."""
    return [(n, m) for n, m in model.named_modules() if n.endswith(".mlp.gate") or n.endswith(".moe.router")]


@contextlib.contextmanager
def tap_routers(model) -> Iterator[list[RouterCall]]:
    """Yield one RouterCall per MoE layer, filled by every forward inside the block."""
    top_k = getattr(model.config, "num_experts_per_tok", None)  # None: a dense model, no routers
    calls = [RouterCall() for _ in router_modules(model)]

    def hook_for(call: RouterCall):
        def hook(module, args, output):
            if isinstance(output, tuple):  # TopkRouter: (logits, top-k weights, top-k ids)
                call.logits.append(output[0])
                call.ids.append(output[2].detach())
            else:  # plain linear router: softmax -> top-k, as tiny-varmoe's block does
                call.logits.append(output)
                call.ids.append(torch.topk(output.detach().float().softmax(-1), top_k, dim=-1).indices)
        return hook

    handles = [m.register_forward_hook(hook_for(c)) for c, (_, m) in zip(calls, router_modules(model))]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def n_routed_experts(config) -> int | None:
    """Routed experts per MoE layer (Qwen3-MoE/varmoe `num_experts`, DeepSeek-V3 `n_routed_experts`), None if dense."""
    return getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None)
