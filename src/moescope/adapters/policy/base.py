"""The generic top-k policy: scores, correction bias, group limits, hash tables, renormalisation, scaling.

    logits ──score──▶ source [N, E]  (softmax probs | sigmoid / sqrt-softplus scores | logits for top-k softmax)
           ──+bias──▶ selection [N, E] ──group limit──▶ ──top-k──▶ ids [N, k]
    source[ids] ──(softmax over the k)──▶ renormalise ──▶ × routed scaling ──▶ weights [N, k]

`exclude` / `force` are tuples of expert ids. Dropped experts leave softmax normalisation (their logits are
-inf, so the others renormalise as if the router row were removed) and get selection score -inf before the
group scores are taken and again after (a group fill of 0.0 cannot bring them back); a group's score is then
that of its best two remaining experts (one if one is left), as in a model whose group had lost them. Forced experts get
selection score +inf after the group limit, so they are chosen whatever their group.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from moescope.adapters.spec import MoELayer, RouterOutput, Scoring
from moescope.errors import RoutingPolicyError

NEG_INF = float("-inf")
# Score functions by the names config attributes spell them (RouterSpec.scoring_attr).
SCORING_NAMES = {"softmax": Scoring.SOFTMAX_TOPK, "sigmoid": Scoring.SIGMOID, "sqrtsoftplus": Scoring.SQRTSOFTPLUS}


def config_value(config, value):
    """A spec field that is a constant, or the value of a (dotted) config attribute; None when absent."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return attr_path(config, value)


def attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def router_module(model: nn.Module, layer: MoELayer) -> nn.Module:
    """The module whose forward computes the router output (the block itself for custom routers)."""
    block = model.get_submodule(layer.block_path)
    return block.get_submodule(layer.spec.router_attr) if layer.spec.router_attr else block


def router_tensor(output, index: int | None) -> torch.Tensor:
    """The logits/probabilities tensor of a router's return value, as [N, E]."""
    tensor = output if index is None or isinstance(output, torch.Tensor) else output[index]
    return tensor.reshape(-1, tensor.shape[-1])


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class Scored:
    source: torch.Tensor  # float32 [N, E]: what the chosen experts' weights are read from
    selection: torch.Tensor  # float32 [N, E]: what top-k is taken over (before groups, exclusions, forcing)


class LayerPolicy:
    """One MoE layer's selection policy, bound to the live model (see the package docstring)."""

    can_force_list = True  # forcing experts into a selection (a fixed list) is well defined
    reroute_problem: str | None = None  # why re-routing this layer (drop / force) would leave the model inconsistent

    def __init__(self, model: nn.Module, layer: MoELayer):
        spec = self.spec = layer.spec
        self.layer = layer
        self.block = model.get_submodule(layer.block_path)
        self.router = router_module(model, layer)
        self.config = _text_config(model)
        self.k = int(layer.top_k)
        if self.k <= 0:
            raise RoutingPolicyError(f"MoE layer {layer.index} ({spec.family}): top-k is unknown, so its routing cannot be re-derived")
        self.scoring = self._scoring()
        self.renormalize = config_value(self.config, spec.renormalize)
        scale = config_value(self.config, spec.scaling_attr)
        self.scale = 1.0 if scale is None else float(scale)
        self.groups = self._groups()  # (n_group, topk_group) or None
        params = inspect.signature(type(self.router).forward).parameters
        names = list(params)[2:]  # after self and the hidden states
        self.needs = tuple(n for n in spec.router_inputs if n in names)  # must be given by the caller
        self.block_inputs = tuple(n for n in names if n not in spec.router_inputs and hasattr(self.block, n))
        self.unknown_inputs = tuple(n for n in names if n not in self.needs and n not in self.block_inputs
                                    and params[n].default is inspect.Parameter.empty)
        self._masks: dict = {}

    # -- what the policy reads from the model --------------------------------------------------
    def _scoring(self) -> Scoring:
        if self.spec.scoring_attr is None:
            return self.spec.scoring
        name = config_value(self.config, self.spec.scoring_attr)
        if name not in SCORING_NAMES:
            raise RoutingPolicyError(f"{self.spec.family}: {self.spec.scoring_attr}={name!r} is a score function "
                                     f"moescope does not implement ({', '.join(SCORING_NAMES)})")
        return SCORING_NAMES[name]

    def _groups(self) -> tuple[int, int] | None:
        spec, config = self.spec, self.config
        n_group, topk_group = config_value(config, "n_group"), config_value(config, "topk_group")
        if not spec.grouped or not n_group or not topk_group:
            return None
        if spec.group_when is not None and config_value(config, spec.group_when[0]) != spec.group_when[1]:
            return None
        return int(n_group), int(topk_group)

    def correction_bias(self) -> torch.Tensor | None:
        """The selection-only bias [E], read from the block now (so a patched buffer is seen)."""
        bias = attr_path(self.block, self.spec.bias_attr) if self.spec.bias_attr else None
        return bias.detach().reshape(-1) if isinstance(bias, torch.Tensor) else None

    def hash_table(self) -> torch.Tensor | None:
        """A frozen token-id -> expert-ids table [V, k] when this layer routes by table lookup."""
        table = attr_path(self.router, self.spec.hash_table_attr) if self.spec.hash_table_attr else None
        return table if isinstance(table, torch.Tensor) else None

    def _mask(self, ids: tuple[int, ...] | None, width: int, device) -> torch.Tensor | None:
        """bool [width] marking `ids` (cached: hooks ask for the same mask every forward pass)."""
        if ids is None:
            return None
        key = (ids, width, str(device))
        if key not in self._masks:
            self._masks[key] = torch.zeros(width, dtype=torch.bool, device=device)
            self._masks[key][list(ids)] = True
        return self._masks[key]

    # -- calling the router ----------------------------------------------------------------------
    def router_output(self, x: torch.Tensor, **inputs):
        """The router module's own forward (no hooks) on x, with the block's tensors it takes."""
        missing = [n for n in (*self.needs, *self.unknown_inputs) if n not in inputs]
        if missing:
            raise RoutingPolicyError(
                f"MoE layer {self.layer.index} ({self.spec.family}): its router also takes {', '.join(missing)}, which "
                "depends on more than the router's hidden-state input, so it cannot be re-routed from that input alone")
        kwargs = {n: getattr(self.block, n) for n in self.block_inputs}
        kwargs.update(inputs)
        return self.router.forward(x, **kwargs)

    @torch.no_grad()
    def route(self, x: torch.Tensor, *, exclude=None, force=None, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64 [N, k], weights float32 [N, k]) the block would give its experts for router input x."""
        output = self.router_output(x, **inputs)
        return self.select(output, x, input_ids=inputs.get("input_ids"), exclude=exclude, force=force)

    # -- the policy ------------------------------------------------------------------------------
    def select(self, output, x=None, *, input_ids=None, exclude=None, force=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64 [N, k], weights float32 [N, k]) from the router's return value (and its input x)."""
        scored = self.scored(output, x, exclude)
        table = self.hash_table()
        if table is not None:
            ids = self._hash_ids(table, input_ids, exclude, force)
        else:
            ids = self.choose(scored.selection, exclude, force)
        return ids, self.weigh_scored(scored, ids)

    def weigh(self, output, x, ids: torch.Tensor, *, exclude=None) -> torch.Tensor:
        """Weights float32 [N, k] the block gives to `ids` [N, k] chosen some other way (a forced routing),
        with the experts in `exclude` removed from the softmax as in `select`."""
        return self.weigh_scored(self.scored(output, x, exclude), ids.long())

    def scored(self, output, x, exclude) -> Scored:
        logits = router_tensor(output, self.spec.router_output_index).float()
        mask = self._mask(exclude, logits.shape[-1], logits.device)
        if self.spec.router_output == RouterOutput.PROBS:  # softmax already applied: renormalise without the dropped
            probs = logits if mask is None else _sum_to_one(logits.masked_fill(mask, 0.0))
            return Scored(probs, self._biased(probs, probs))
        if mask is not None:
            logits = logits.masked_fill(mask, NEG_INF)
        if self.scoring == Scoring.SOFTMAX:
            source = torch.softmax(logits, dim=-1)
        elif self.scoring == Scoring.SIGMOID:
            source = torch.sigmoid(logits)
        elif self.scoring == Scoring.SQRTSOFTPLUS:
            source = torch.nn.functional.softplus(logits).sqrt()
        elif self.scoring == Scoring.SOFTMAX_TOPK:
            source = logits  # the weights are a softmax over the k chosen logits
        else:
            raise RoutingPolicyError(f"MoE layer {self.layer.index} ({self.spec.family}): scoring {self.scoring} "
                                     "is not declared precisely enough to be re-derived")
        return Scored(source, self._biased(source, logits))

    def _biased(self, scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        base = logits if self.spec.select_on == "logits" else scores
        bias = self.correction_bias()
        return base if bias is None else base + bias.to(base.dtype)

    def choose(self, selection: torch.Tensor, exclude, force) -> torch.Tensor:
        """Top-k ids [N, k] of the selection scores, group-limited, with experts dropped / forced."""
        drop = self._mask(exclude, selection.shape[-1], selection.device)
        if drop is not None:
            selection = selection.masked_fill(drop, NEG_INF)
        if self.groups is not None:
            selection = self._group_limited(selection, dropped=drop is not None)
            if drop is not None:
                selection = selection.masked_fill(drop, NEG_INF)
        forced = self._mask(force, selection.shape[-1], selection.device)
        if forced is not None:
            selection = selection.masked_fill(forced, math.inf)
        top, ids = selection.topk(self.k, dim=-1)
        if drop is not None and bool((top == NEG_INF).any()):
            raise RoutingPolicyError(
                f"MoE layer {self.layer.index}: fewer than top-k = {self.k} experts are left to choose from"
                + (" within the groups the router keeps (n_group/topk_group)" if self.groups else ""))
        return ids

    def _group_limited(self, selection: torch.Tensor, dropped: bool = False) -> torch.Tensor:
        n_group, topk_group = self.groups
        n, e = selection.shape
        grouped = selection.view(n, n_group, e // n_group)  # [N, G, E/G]
        if self.spec.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        elif not dropped:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        else:  # a group's best two *remaining* experts (one, if one is left; -inf if none)
            best = grouped.topk(2, dim=-1).values
            left = torch.isfinite(best)
            group_scores = torch.where(left, best, 0.0).sum(dim=-1).masked_fill(~left.any(-1), NEG_INF)
        kept = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        keep = keep.repeat_interleave(e // n_group, dim=-1)  # [N, E]
        return selection.masked_fill(~keep, self.spec.group_fill)

    def _hash_ids(self, table: torch.Tensor, input_ids, exclude, force) -> torch.Tensor:
        where = f"MoE layer {self.layer.index} ({self.spec.family}) selects experts by a token-id table (hash routing)"
        if exclude is not None or force is not None:
            raise RoutingPolicyError(f"{where}: its experts cannot be dropped or forced; intervene on another layer")
        if input_ids is None:
            raise RoutingPolicyError(f"{where}: re-routing it needs the token ids")
        return table[input_ids.reshape(-1).to(table.device)].long()

    def weigh_scored(self, scored: Scored, ids: torch.Tensor) -> torch.Tensor:
        weights = scored.source.gather(-1, ids)
        if self.scoring == Scoring.SOFTMAX_TOPK and self.spec.router_output != RouterOutput.PROBS:
            weights = torch.softmax(weights, dim=-1)
        return self.renormalized(weights) * self.scale

    def renormalized(self, weights: torch.Tensor) -> torch.Tensor:
        value = self.renormalize
        if value is None or value is False:
            return weights
        if value is True:
            return weights / weights.sum(dim=-1, keepdim=True)
        return weights / torch.linalg.vector_norm(weights, ord=float(value), dim=-1, keepdim=True)  # L_p (DBRX)


def _sum_to_one(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(dim=-1, keepdim=True)
