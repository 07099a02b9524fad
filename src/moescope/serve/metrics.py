"""The live metrics: their names and meaning, which of them a server publishes, and the window statistics.

Per MoE layer, always (tokens that vLLM computes, so a cached prefix counts nothing):
    moescope_layer_tokens_total{layer}            counter: tokens routed through the MoE layer since start
    moescope_routing_entropy_sum_total{layer}     counter: sum over those tokens of H(softmax(router logits)), nats
    moescope_balancedness{layer}                  gauge: mean / max of the experts' window load (1 = even;
                                                  vLLM's EPLB balancedness with one expert per rank)
    moescope_max_expert_share{layer}              gauge: the busiest expert's share of the window's slots
    moescope_load_entropy{layer}                  gauge: H(window load share) / ln E (1 = even, 0 = one expert)
    moescope_active_expert_fraction{layer}        gauge: share of the layer's experts selected at least once
    moescope_routing_entropy{layer}               gauge: mean router entropy per token over the window, nats
    moescope_layer_info{layer, n_experts, top_k}  1 (what `moescope top` needs to read the rest)
    moescope_window_seconds                       the time the window covers (shorter just after start-up)
Per expert, only when asked (MOESCOPE_VLLM_EXPERT_SERIES):
    =all: moescope_expert_tokens_total{layer, expert}   counter: tokens that selected the expert (one per token
                                                        and top-k slot) since start
    =N:   moescope_hot_expert{layer, rank}              gauge: id of the rank-th busiest expert of the window
          moescope_hot_expert_share{layer, rank}        gauge: its share of the window's slots (rank 1..N)

Gauges cover the sliding window (the last `window` seconds) and are NaN while it saw no token. Series per
server: 8·L + 1 by default; + L·E with `all`; + 2·L·min(N, E) with N (L MoE layers, E experts per layer):
33 / 65 / 49 (N = 2) for tiny-moe (4 × 8), 465 / 15,313 / 929 (N = 4) for DeepSeek-V3 (58 × 256).
The hottest-N series are ranks, not expert labels, so their label set never changes (no series churn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moescope.analysis.kernels import entropy

PREFIX = "moescope_"
EXPERT_TOKENS = "moescope_expert_tokens"
LAYER_TOKENS = "moescope_layer_tokens"
ENTROPY_SUM = "moescope_routing_entropy_sum"
BALANCEDNESS = "moescope_balancedness"
MAX_EXPERT_SHARE = "moescope_max_expert_share"
LOAD_ENTROPY = "moescope_load_entropy"
ACTIVE_EXPERT_FRACTION = "moescope_active_expert_fraction"
ROUTING_ENTROPY = "moescope_routing_entropy"
HOT_EXPERT = "moescope_hot_expert"
HOT_EXPERT_SHARE = "moescope_hot_expert_share"
WINDOW_SECONDS = "moescope_window_seconds"
LAYER_INFO = "moescope_layer_info"

WINDOW_GAUGES = (BALANCEDNESS, MAX_EXPERT_SHARE, LOAD_ENTROPY, ACTIVE_EXPERT_FRACTION, ROUTING_ENTROPY)

HELP = {
    EXPERT_TOKENS: "Tokens that selected this expert (one per token and top-k slot), since the server started.",
    LAYER_TOKENS: "Tokens routed through this MoE layer since the server started.",
    ENTROPY_SUM: "Sum over routed tokens of the router entropy H(softmax(router logits)) in nats.",
    BALANCEDNESS: "Mean over max of the experts' load in the sliding window (1 = even).",
    MAX_EXPERT_SHARE: "The busiest expert's share of the layer's top-k slots in the sliding window.",
    LOAD_ENTROPY: "Entropy of the experts' load share in the sliding window over ln(n_experts) (1 = even).",
    ACTIVE_EXPERT_FRACTION: "Share of the layer's experts selected at least once in the sliding window.",
    ROUTING_ENTROPY: "Mean router entropy per token in the sliding window, nats.",
    HOT_EXPERT: "Id of the expert at this rank of the sliding window's load (rank 1 = busiest).",
    HOT_EXPERT_SHARE: "Share of the layer's top-k slots in the sliding window taken by the expert at this rank.",
    WINDOW_SECONDS: "Seconds covered by the sliding window.",
    LAYER_INFO: "One per MoE layer: its number of routed experts and top-k.",
}


@dataclass(frozen=True)
class ExpertSeries:
    """Which per-expert series a server publishes: none (the default), all, or the `hottest` busiest per layer."""

    all: bool = False
    hottest: int = 0

    @classmethod
    def parse(cls, text: str | None) -> "ExpertSeries":
        """MOESCOPE_VLLM_EXPERT_SERIES: unset, '' or 'none' -> none; 'all'; a positive integer N -> N hottest."""
        text = (text or "none").strip().lower()
        if text == "none":
            return cls()
        if text == "all":
            return cls(all=True)
        if text.isdigit() and int(text) > 0:
            return cls(hottest=int(text))
        raise ValueError(f"MOESCOPE_VLLM_EXPERT_SERIES={text!r} must be 'none', 'all' or a positive number of experts")

    def count(self, n_layers: int, n_experts: int) -> int:
        """Series a server publishes for `n_layers` MoE layers of `n_experts` experts (the formula above)."""
        per_expert = n_experts if self.all else 2 * min(self.hottest, n_experts)
        return n_layers * (8 + per_expert) + 1


def window_stats(load: np.ndarray, entropy_sum: np.ndarray, tokens: np.ndarray,
                 n_experts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-layer statistics of one window: load int [L, E] slots per expert, entropy_sum [L], tokens [L].

    `n_experts` int [L] is each layer's number of experts (default E; columns past it are zero padding).
    Returns float64 [L] arrays keyed by gauge name; a layer without tokens in the window gets NaN.
    """
    load = np.asarray(load, dtype=np.float64)
    L, E = load.shape
    n = np.full(L, E) if n_experts is None else np.asarray(n_experts)
    total, peak = load.sum(axis=1), load.max(axis=1, initial=0.0)  # [L]
    busy = total > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        balancedness = np.where(busy, total / n / peak, np.nan)
        max_share = np.where(busy, peak / total, np.nan)
        load_entropy = np.where(busy & (n > 1), entropy(load, axis=1) / np.log(n), np.nan)
        active = np.where(busy, (load > 0).sum(axis=1) / n, np.nan)
        routing_entropy = np.where(tokens > 0, np.asarray(entropy_sum, np.float64) / tokens, np.nan)
    return {BALANCEDNESS: balancedness, MAX_EXPERT_SHARE: max_share, LOAD_ENTROPY: load_entropy,
            ACTIVE_EXPERT_FRACTION: active, ROUTING_ENTROPY: routing_entropy}


def hottest(load: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` busiest experts of each layer's window load int [L, E] -> (ids int [L, n], shares float [L, n]).

    Ties go to the lower id; a layer without load gets ids -1 and shares NaN.
    """
    load = np.asarray(load, dtype=np.float64)
    n = min(n, load.shape[1])
    ids = np.argsort(-load, axis=1, kind="stable")[:, :n]  # [L, n]
    total = load.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.take_along_axis(load, ids, axis=1) / total
    idle = total[:, 0] == 0
    return np.where(idle[:, None], -1, ids), np.where(idle[:, None], np.nan, shares)
