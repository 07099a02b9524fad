"""Which weights a quantization target names: router, experts, shared, attention, all.

    router     each MoE layer's router weight matrices ([E, H], also when the router wraps its Linear, and every
               matrix of an MLP router); its biases and any correction bias stay exact
    experts    routed experts: fused 3-D tensors (gate_up_proj [E, 2I, H], down_proj [E, H, I]; transposed
               layouts such as gpt-oss' are recognised by the experts module's `is_transposed`) or the
               Linear weights of per-expert modules. In a dense model: the decoder layers' MLPs.
    shared     the always-on shared experts of each MoE block
    attention  the matrices of modules named self_attn / attention / attn
    all        every matrix inside the decoder layers (the above, plus dense MLP layers and shared-expert
               gates); embeddings, the LM head and norms are never quantized

Only tensors with >= 2 dimensions whose name does not end in "bias" are weights here. A weight is
reported once even when several targets reach it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from moescope.adapters.discover import find_moe_layers
from moescope.adapters.policy import router_module
from moescope.adapters.spec import MoELayer
from moescope.errors import NoRouterFoundError
from moescope.quant.formats import QuantConfigError

TARGETS = ("router", "experts", "shared", "attention", "all")
_ATTENTION_NAMES = ("self_attn", "attention", "attn")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_LAYER_INDEX = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class WeightRef:
    """One weight a target names. `layer` is the decoder-layer index (-1 outside the decoder layers)."""

    name: str  # parameter path, e.g. model.layers.0.mlp.experts.gate_up_proj
    param: nn.Parameter
    target: str  # router / experts / shared / attention / mlp (dense) / other
    layer: int
    transposed: bool  # stored [.., in, out] rather than [.., out, in]


def decoder_layer_of(path: str) -> tuple[str, int] | None:
    """(path of the layer list, index) of the first numbered module in `path`, e.g. ('model.layers', 3)."""
    match = _LAYER_INDEX.match(path)
    return (match.group(1), int(match.group(2))) if match else None


def moe_layers_or_none(model: nn.Module, custom_router=None) -> list[MoELayer] | None:
    """The model's MoE layers, or None for a dense model."""
    try:
        return find_moe_layers(model, custom_router)
    except NoRouterFoundError:
        return None


def experts_module(model: nn.Module, layer: MoELayer) -> nn.Module | None:
    block = model.get_submodule(layer.block_path)
    experts = getattr(block, layer.spec.experts_attr, None)
    if experts is None and "." in layer.block_path:  # custom router path: experts are the router's sibling
        parent = model.get_submodule(layer.block_path.rsplit(".", 1)[0])
        experts = getattr(parent, layer.spec.experts_attr, None)
    return experts if isinstance(experts, nn.Module) else None


def _matrices(module: nn.Module, prefix: str):
    transposed = bool(getattr(module, "is_transposed", False))
    for name, param in module.named_parameters(prefix=prefix):
        if param.dim() >= 2 and not name.endswith("bias"):
            # fused tensors take the experts module's layout; per-expert Linear weights are [out, in]
            yield name, param, transposed and param.dim() == 3


def _layer_of(name: str) -> int:
    found = decoder_layer_of(name)
    return found[1] if found else -1


def _modules_named(model: nn.Module, names: tuple[str, ...]):
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in names and decoder_layer_of(path) is not None:
            yield path, module


def _by_target(model: nn.Module, moe: list[MoELayer] | None) -> dict[str, list[tuple[str, nn.Parameter, bool]]]:
    found: dict[str, list] = {t: [] for t in ("router", "experts", "shared", "attention", "mlp")}
    param_names = {id(p): name for name, p in model.named_parameters()}
    module_paths = {id(m): path for path, m in model.named_modules()}
    for layer in moe or []:
        router = router_module(model, layer)  # its matrices: a Linear's weight, or a wrapped one (router.gate.weight)
        found["router"].extend((param_names[id(w)], w, False) for w in router.parameters() if w.dim() == 2)
        experts = experts_module(model, layer)
        if experts is not None:
            found["experts"].extend(_matrices(experts, module_paths[id(experts)]))
        if layer.spec.shared_experts_attr:
            shared = getattr(model.get_submodule(layer.block_path), layer.spec.shared_experts_attr, None)
            if isinstance(shared, nn.Module):
                found["shared"].extend(_matrices(shared, module_paths[id(shared)]))
    for path, module in _modules_named(model, _ATTENTION_NAMES):
        found["attention"].extend(_matrices(module, path))
    if moe is None:  # dense model: its MLPs play the experts' part
        for path, module in _modules_named(model, _MLP_NAMES):
            found["mlp"].extend(_matrices(module, path))
    return found


def select_weights(model: nn.Module, targets, *, layers=None, moe_layers: list[MoELayer] | None = None,
                   custom_router=None) -> list[WeightRef]:
    """The weights that `targets` (a name or names from TARGETS) name, optionally only in decoder `layers`.

    For a dense model `experts` means its MLPs and `router`/`shared` name nothing. Pass `moe_layers`
    when already discovered (None: discover; a dense model is one where discovery finds nothing).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise QuantConfigError(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    moe = moe_layers if moe_layers is not None else moe_layers_or_none(model, custom_router)
    found = _by_target(model, moe)
    wanted: dict[int, WeightRef] = {}

    def add(kind: str, entries) -> None:
        for name, param, transposed in entries:
            wanted.setdefault(id(param), WeightRef(name, param, kind, _layer_of(name), transposed))

    for target in targets:
        if target == "all":
            for kind in ("router", "experts", "shared", "attention", "mlp"):
                add(kind, found[kind])
            decoder_lists = {decoder_layer_of(ref.name)[0] for ref in wanted.values() if ref.layer >= 0}
            for list_path in decoder_lists:
                add("other", _matrices(model.get_submodule(list_path), list_path))
        elif target == "experts" and moe is None:
            add("mlp", found["mlp"])
        else:
            add(target, found[target])
    layer_set = None if layers is None else {layers} if isinstance(layers, int) else set(layers)
    refs = [ref for ref in wanted.values() if layer_set is None or ref.layer in layer_set]
    return sorted(refs, key=lambda r: r.name)
