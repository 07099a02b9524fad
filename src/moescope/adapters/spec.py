"""RouterSpec: what moescope needs to know about one MoE family, declared as data.

Capture itself is generic (it records what each experts module *receives*); a spec says where to find
the pieces and what they mean, so `inspect` can describe a model and tests can check the captured
routing against an independent computation of the family's policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value


class Scoring(StrEnum):
    """How router logits become the scores that experts are chosen on."""

    SOFTMAX = "softmax"  # softmax over all experts, then top-k
    SOFTMAX_TOPK = "softmax_topk"  # top-k on logits, then softmax over the k (Mixtral/GPT-OSS style)
    SIGMOID = "sigmoid"  # sigmoid scores, top-k (optionally bias-corrected and group-limited)
    SQRTSOFTPLUS = "sqrtsoftplus"  # sqrt(softplus(logit)) scores, top-k (DeepSeek-V4)
    SPARSEMIXER = "sparsemixer"  # PhiMoE's sparsemixer
    CUSTOM = "custom"  # anything else; see `notes`


class RouterOutput(StrEnum):
    """What the tensor the router module returns (at `router_output_index`) contains."""

    LOGITS = "logits"
    PROBS = "probs"


class Selection(StrEnum):
    """Where the chosen expert ids and gate weights are read."""

    EXPERTS_INPUT = "experts_input"  # arguments of the experts module's forward (what it consumes)
    ROUTER_TOPK = "router_topk"  # custom models: top-k of the router output, computed by moescope


class NonComputeKind(StrEnum):
    """What a router choice that is not an expert does with the token."""

    IDENTITY = "identity"  # the hidden state passes through, times the gate weight (LongCat's zero-compute experts)
    SKIP = "skip"  # nothing is computed for the slot (ZAYA's skip class)


@dataclass(frozen=True)
class NonComputeChoices:
    """Router classes beyond the routed experts. In the trace they have ids n_experts .. n_experts + count - 1
    (the router's own class ids) and count toward no expert's load."""

    kind: NonComputeKind
    count: str | int  # config attribute (or constant) with how many there are
    received_as: int | None = None  # the id the experts module receives such a choice under, always with weight
    #                                 0.0 (ZAYA masks skip as expert 0): recorded as the choice's own id instead;
    #                                 None when the experts receive the choice's own id (LongCat)


@dataclass(frozen=True)
class RouterSpec:
    """Declarative description of one MoE family's router.

    Attribute names refer to the MoE block (the parent of the experts module) or to the model config.
    """

    family: str  # transformers model_type, or "custom"
    scoring: Scoring
    router_attr: str = "gate"  # child of the MoE block that computes router_output
    router_output_index: int | None = 0  # position of logits/probs in the router's return tuple; None: plain tensor
    router_output: RouterOutput = RouterOutput.LOGITS
    experts_attr: str = "experts"
    ids_arg: str = "top_k_index"  # experts.forward parameter holding expert ids   [N, k]
    weights_arg: str = "top_k_weights"  # experts.forward parameter holding gate weights [N, k]
    selection: Selection = Selection.EXPERTS_INPUT
    renormalize: str | bool | None = None  # config attribute (or constant) saying top-k weights are renormalised;
    #                                        a number p read from the config means division by the L_p norm
    bias_attr: str | None = None  # dotted path from the MoE block to a selection-only correction bias [E]
    scaling_attr: str | None = None  # config attribute with a routed scaling factor (already in the weights)
    scoring_attr: str | None = None  # config attribute naming the score function at run time (overrides `scoring`)
    output_scale_attr: str | None = None  # config attribute scaling the routed experts' summed *output*: the
    #                                     weights the experts receive exclude it; effective gate = weight * scale
    grouped: bool = False  # group-limited selection (n_group / topk_group; none when the config's n_group is unset)
    group_score: str = "top2_sum"  # a group's score: the sum of its two best selection scores, or its "max"
    group_fill: float = float("-inf")  # selection score given to experts of the groups left out (0.0: they can still win)
    group_when: tuple[str, object] | None = None  # group-limited only when config.<attr> == value (DeepSeek-V2 topk_method)
    select_on: str = "scores"  # top-k (and the correction bias) over the scores, or over the raw "logits" (Kolibri, Llama4)
    hash_table_attr: str | None = None  # router attribute of a frozen token-id -> expert-ids table; routers that have one
    #                                     select by table lookup (DeepSeek-V4's first layers), not by score
    router_inputs: tuple[str, ...] = ()  # router forward parameters that come from outside the MoE block (input_ids,
    #                                       the previous layer's router state); other extra ones are block attributes
    selection_policy: str | None = None  # CUSTOM scoring: the name of its policy in adapters/policy.py
    shared_experts_attr: str | None = None  # child of the MoE block with always-on shared experts
    shared_experts_count: str | int = 1  # config attribute (or constant): how many experts that module fuses
    non_compute: NonComputeChoices | None = None  # router choices that are not experts (identity, skip)
    notes: str = ""


@dataclass(frozen=True)
class UnsupportedFamily:
    """A family moescope knows about but cannot capture faithfully; `reason` is shown by `inspect`."""

    family: str
    reason: str


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer found in a model."""

    index: int  # MoE-layer index: 0..L-1 over MoE layers only
    decoder_layer: int  # index of the decoder layer holding it
    block_path: str  # module path of the MoE block
    n_experts: int  # routed experts, ids 0 .. n_experts - 1 (non-compute choices not included)
    top_k: int
    spec: RouterSpec
    n_shared_experts: int = 0
    expert_sizes: tuple[int, ...] | None = None  # intermediate size per expert, when they differ
    non_compute_ids: tuple[int, ...] = ()  # ids (>= n_experts) of router choices that are not experts
    extra: dict = field(default_factory=dict)
