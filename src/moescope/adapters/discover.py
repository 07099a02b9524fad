"""Find the MoE layers of a loaded model: declared families first, structure second, user patterns last.

Capture is generic: every supported family ends in an experts module whose forward receives the
expert ids and gate weights the model chose (after bias correction, group limits, renormalisation and
scaling). Discovery finds those modules and attaches the family's declared RouterSpec.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from dataclasses import dataclass, replace

from torch import nn

from moescope.adapters.registry import lookup_family
from moescope.adapters.spec import MoELayer, RouterOutput, RouterSpec, Scoring, Selection
from moescope.errors import NoRouterFoundError

# (ids parameter, weights parameter) names that experts modules use in transformers v5
_EXPERT_ARG_NAMES = (("top_k_index", "top_k_weights"), ("router_indices", "routing_weights"))
_ROUTER_ATTRS = ("gate", "router")
_SHARED_ATTRS = ("shared_experts", "shared_expert", "shared_mlp")
_TOP_K_CONFIG_ATTRS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token", "moe_k", "top_k_experts")  # Gemma-4: top_k_experts


@dataclass(frozen=True)
class CustomRouter:
    """How to capture a model moescope does not recognise: point at its router modules.

    pattern:    fnmatch pattern over module paths, e.g. "blocks.*.moe.router"
    output:     what the router returns (a tensor, or a tuple whose `output_index` element is it):
                "logits" (softmax is applied) or "probs"
    top_k:      experts chosen per token (top-k of the scores)
    renormalize: whether the model divides the top-k probabilities by their sum
    expert_sizes: intermediate size of each expert when they differ (for cost analyses)
    """

    pattern: str
    top_k: int
    output: RouterOutput = RouterOutput.LOGITS
    output_index: int | None = None
    renormalize: bool = True
    expert_sizes: tuple[int, ...] | None = None


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> tuple[str, ...]:
    """forward's parameter names (self excluded); inspect.signature is slow and a class's forward is fixed."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def forward_param_index(module: nn.Module, name: str) -> int | None:
    """Position of `name` among forward's positional parameters (self excluded), or None."""
    params = _forward_params(type(module))
    return params.index(name) if name in params else None


def _experts_arg_names(experts: nn.Module) -> tuple[str, str] | None:
    params = set(_forward_params(type(experts)))
    for ids_arg, weights_arg in _EXPERT_ARG_NAMES:
        if ids_arg in params and weights_arg in params:
            return ids_arg, weights_arg
    return None


def _decoder_layer_index(path: str) -> int:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else -1


def _config_top_k(config) -> int | None:
    for cfg in (config, getattr(config, "ffn_config", None), getattr(config, "text_config", None)):
        for attr in _TOP_K_CONFIG_ATTRS:
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _top_k(router: nn.Module | None, config, path: str) -> int:
    """Experts chosen per token: the router's own `top_k`, else the config's; never a guess."""
    top_k = getattr(router, "top_k", None) or _config_top_k(config)
    if not isinstance(top_k, int) or top_k <= 0:
        raise NoRouterFoundError(f"cannot tell how many experts the router of {path!r} chooses per token (no top_k on "
                                 f"it or its config); capture it with --router-pattern and --top-k")
    return top_k


def _n_experts(experts: nn.Module, router: nn.Module | None) -> int:
    """Routed experts of a layer (ids 0..n-1): the experts module's count first, since a router's can include
    non-compute choices (LongCat's router counts its zero-compute experts in n_routed_experts)."""
    for obj in (experts, router):
        for attr in ("num_routed_experts", "num_experts", "n_routed_experts", "num_local_experts"):
            value = getattr(obj, attr, None) if obj is not None else None
            if isinstance(value, int) and value > 0:
                return value
    for obj in (router, experts):
        weight = getattr(obj, "weight", None) if obj is not None else None
        if weight is not None and weight.dim() >= 2:
            return int(weight.shape[0])
    if router is not None:  # a router that wraps its Linear (DBRX `layer`, LongCat `classifier`)
        linears = [m for m in router.modules() if isinstance(m, nn.Linear)]
        if len(linears) == 1:
            return linears[0].out_features
    if isinstance(experts, (nn.ModuleList, nn.Sequential)):
        return len(experts)
    raise NoRouterFoundError(f"cannot tell how many experts {type(experts).__name__} has")


def _text_config(config):
    """The config the MoE blocks were built from (a multimodal model's text config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _n_shared(model: nn.Module, path: str, spec: RouterSpec | None, config) -> tuple[str | None, int]:
    """(attribute, count) of the always-on shared experts beside MoE block `path`: the spec's attribute or a usual
    name, on the block or on the decoder layer holding it (Granite's `shared_mlp`); the count as the spec
    declares it (a config attribute: DeepSeek fuses n_shared_experts into one MLP), else 1."""
    block = model.get_submodule(path)
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else None
    declared = (spec.shared_experts_attr,) if spec is not None and spec.shared_experts_attr else ()
    for holder in (block, parent):
        for attr in (*declared, *_SHARED_ATTRS):
            shared = getattr(holder, attr, None) if holder is not None else None
            if isinstance(shared, nn.Module) and shared is not block:
                count = spec.shared_experts_count if spec is not None else 1
                if isinstance(count, str):
                    count = getattr(_text_config(config), count, None)
                return attr, 1 if count is None else int(count)
    return None, 0


def _generic_spec(model_type: str, router_attr: str | None, arg_names: tuple[str, str]) -> RouterSpec:
    return RouterSpec(
        family=model_type,
        scoring=Scoring.CUSTOM,
        router_attr=router_attr or "",
        ids_arg=arg_names[0],
        weights_arg=arg_names[1],
        notes="not declared: found by structure; ids and weights are read where the experts consume them",
    )


def find_moe_layers(model: nn.Module, custom: CustomRouter | None = None) -> list[MoELayer]:
    """All MoE layers of `model`, in execution order (module registration order).

    A model class of your own can declare its routers once, as a class attribute
    ``moescope_router = CustomRouter(...)``, instead of passing `custom` on every call.
    Raises NoRouterFoundError naming what was searched when there are none.
    """
    custom = custom or getattr(model, "moescope_router", None)
    if custom is not None:
        return _find_custom(model, custom)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    declared = lookup_family(model_type)
    if declared is not None and declared.selection == Selection.ROUTER_TOPK:
        return _find_router_topk(model, declared, config)
    layers: list[MoELayer] = []
    for path, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module) or (arg_names := _experts_arg_names(experts)) is None:
            continue
        router_attr = next((a for a in _ROUTER_ATTRS if isinstance(getattr(block, a, None), nn.Module)), None)
        spec = declared or _generic_spec(model_type, router_attr, arg_names)
        router = getattr(block, spec.router_attr, None) if spec.router_attr else None
        shared_attr, n_shared = _n_shared(model, path, spec, config)
        spec = replace(spec, shared_experts_attr=spec.shared_experts_attr or shared_attr)
        n_experts = _n_experts(experts, router)
        layers.append(
            MoELayer(
                index=len(layers),
                decoder_layer=_decoder_layer_index(path),
                block_path=path,
                n_experts=n_experts,
                top_k=_top_k(router, config, path),
                spec=spec,
                n_shared_experts=n_shared,
                non_compute_ids=_non_compute_ids(spec, config, n_experts),
            )
        )
    if not layers:
        raise NoRouterFoundError(
            f"no MoE layers found in {type(model).__name__} (model_type={model_type!r}): searched for modules "
            f"with an `experts` child whose forward takes {' or '.join('/'.join(p) for p in _EXPERT_ARG_NAMES)}; "
            "for a custom MoE pass --router-pattern 'path.*.router' --top-k K (see the capture guide: custom MoE models)"
        )
    return layers


def _non_compute_ids(spec: RouterSpec, config, n_experts: int) -> tuple[int, ...]:
    """Ids n_experts .. n_experts + count - 1 of the spec's non-compute choices (none when it declares none)."""
    if spec.non_compute is None:
        return ()
    count = spec.non_compute.count
    if isinstance(count, str):  # a config attribute, on the config the MoE blocks were built from
        count = getattr(_text_config(config), count, None) or 0
    return tuple(range(n_experts, n_experts + int(count)))


def _config_flag(config, value) -> bool:
    """A spec flag that is either a constant or the name of a config attribute."""
    return bool(getattr(config, value, False)) if isinstance(value, str) else bool(value)


def _find_router_topk(model: nn.Module, spec: RouterSpec, config) -> list[MoELayer]:
    """Declared families whose experts do not receive ids and weights (Llama4, JetMoE): the routing
    is read from the router's output, selected by the family's declared scoring rule."""
    spec = replace(spec, renormalize=_config_flag(config, spec.renormalize))
    layers = []
    for path, block in model.named_modules():
        router = getattr(block, spec.router_attr, None)
        if not isinstance(router, nn.Module):
            continue
        top_k = _top_k(router, config, path)
        n_experts = getattr(router, "num_experts", None) or _n_experts(router, router)
        shared_attr, n_shared = _n_shared(model, path, spec, config)
        layers.append(MoELayer(index=len(layers), decoder_layer=_decoder_layer_index(path), block_path=path,
                               n_experts=int(n_experts), top_k=int(top_k), spec=spec, n_shared_experts=n_shared))
    if not layers:
        raise NoRouterFoundError(f"no `{spec.router_attr}` router modules found in {type(model).__name__}")
    return layers


def _find_custom(model: nn.Module, custom: CustomRouter) -> list[MoELayer]:
    spec = RouterSpec(
        family="custom",
        scoring=Scoring.SOFTMAX,  # a probabilities output (router_output PROBS) has had its softmax already
        router_attr="",
        router_output_index=custom.output_index,
        router_output=custom.output,
        selection=Selection.ROUTER_TOPK,
        renormalize=custom.renormalize,
    )
    layers = []
    for path, module in model.named_modules():
        if path and fnmatch.fnmatchcase(path, custom.pattern):
            weight = getattr(module, "weight", None)
            n_experts = int(weight.shape[0]) if weight is not None else 0
            if custom.expert_sizes is not None:
                n_experts = len(custom.expert_sizes)
            layers.append(
                MoELayer(
                    index=len(layers),
                    decoder_layer=_decoder_layer_index(path),
                    block_path=path,
                    n_experts=n_experts,
                    top_k=custom.top_k,
                    spec=spec,
                    expert_sizes=custom.expert_sizes,
                )
            )
    if not layers:
        raise NoRouterFoundError(f"--router-pattern {custom.pattern!r} matched no module of {type(model).__name__}")
    if any(layer.n_experts <= 0 for layer in layers):
        raise NoRouterFoundError(
            f"cannot tell the number of experts of modules matching {custom.pattern!r}: give expert sizes"
        )
    return layers
