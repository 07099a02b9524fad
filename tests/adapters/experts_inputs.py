"""What every experts module of a model received in one forward pass, read by the test's own hooks.

Independent of moescope's discovery and of families.py: an experts module is any module whose forward
takes expert ids and gate weights under the names transformers uses; its pre-hook binds the call's
arguments and keeps them as float64/int64 NumPy arrays. Hooks are removed in `finally`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

_ARG_NAMES = (("top_k_index", "top_k_weights"), ("router_indices", "routing_weights"))


@dataclass
class ExpertsInput:
    path: str  # module path of the experts module
    ids: np.ndarray  # int64 [N, k]: what the experts received, in the order they received it
    weights: np.ndarray  # float64 [N, k]
    n_modules_experts: int  # the module's own expert count (num_experts / num_routed_experts / first dim of its weights)


def _arg_names(module: nn.Module) -> tuple[str, str] | None:
    params = set(inspect.signature(type(module).forward).parameters)
    return next(((i, w) for i, w in _ARG_NAMES if i in params and w in params), None)


def _module_experts(module: nn.Module) -> int:
    for attr in ("num_routed_experts", "num_experts"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return int(next(module.parameters()).shape[0])


def experts_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[ExpertsInput]:
    """One entry per experts module the forward pass reached, in module order."""
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    handles = []

    def pre_hook(path: str, names: tuple[str, str]):
        def hook(module, args, kwargs):
            bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
            ids, weights = bound[names[0]], bound[names[1]]
            seen[path] = (ids.detach().reshape(-1, ids.shape[-1]).long().numpy(),
                          weights.detach().reshape(-1, weights.shape[-1]).double().numpy())

        return hook

    modules = {path: m for path, m in model.named_modules() if _arg_names(m) is not None}
    try:
        for path, module in modules.items():
            handles.append(module.register_forward_pre_hook(pre_hook(path, _arg_names(module)), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return [ExpertsInput(path, *seen[path], _module_experts(modules[path])) for path in modules if path in seen]


def first_choice(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[N]: the id with the largest weight per row, the lower id among equal weights (a plain loop)."""
    out = np.empty(len(ids), np.int64)
    for row, (row_ids, row_w) in enumerate(zip(ids.tolist(), weights.tolist())):
        out[row] = min(zip(row_ids, row_w), key=lambda slot: (-slot[1], slot[0]))[0]
    return out
