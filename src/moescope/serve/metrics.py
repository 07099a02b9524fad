"""The live metrics: their names and meaning, and the sliding-window statistics computed from the counters.

Counters (cumulative since the server started; tokens that vLLM computes, so a cached prefix counts nothing):
    moescope_expert_tokens_total{layer, expert}   tokens that selected the expert (one per token and top-k slot)
    moescope_layer_tokens_total{layer}            tokens routed through the MoE layer
    moescope_routing_entropy_sum_total{layer}     sum over those tokens of the router's entropy H(softmax(logits)), nats
Gauges over the sliding window (the last `window` seconds; NaN while the window saw no token):
    moescope_balancedness{layer}                  mean / max of the experts' window load (1 = even; vLLM's EPLB
                                                  balancedness with one expert per rank)
    moescope_load_entropy{layer}                  H(window load share) / ln E (1 = even, 0 = one expert)
    moescope_routing_entropy{layer}               mean router entropy per token over the window, nats
    moescope_window_seconds                       the time the window covers (shorter just after start-up)
    moescope_layer_info{layer, n_experts, top_k}  1, one per MoE layer (what `moescope top` needs to read the rest)
"""

from __future__ import annotations

import numpy as np

from moescope.analysis.kernels import entropy

PREFIX = "moescope_"
EXPERT_TOKENS = "moescope_expert_tokens"
LAYER_TOKENS = "moescope_layer_tokens"
ENTROPY_SUM = "moescope_routing_entropy_sum"
BALANCEDNESS = "moescope_balancedness"
LOAD_ENTROPY = "moescope_load_entropy"
ROUTING_ENTROPY = "moescope_routing_entropy"
WINDOW_SECONDS = "moescope_window_seconds"
LAYER_INFO = "moescope_layer_info"

HELP = {
    EXPERT_TOKENS: "Tokens that selected this expert (one per token and top-k slot), since the server started.",
    LAYER_TOKENS: "Tokens routed through this MoE layer since the server started.",
    ENTROPY_SUM: "Sum over routed tokens of the router entropy H(softmax(router logits)) in nats.",
    BALANCEDNESS: "Mean over max of the experts' load in the sliding window (1 = even).",
    LOAD_ENTROPY: "Entropy of the experts' load share in the sliding window over ln(n_experts) (1 = even).",
    ROUTING_ENTROPY: "Mean router entropy per token in the sliding window, nats.",
    WINDOW_SECONDS: "Seconds covered by the sliding window.",
    LAYER_INFO: "One per MoE layer: its number of routed experts and top-k.",
}


def window_stats(load: np.ndarray, entropy_sum: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer statistics of one window: load int [L, E] slots per expert, entropy_sum [L], tokens [L].

    Returns float64 [L] arrays keyed by gauge name; a layer without tokens in the window gets NaN.
    """
    load = np.asarray(load, dtype=np.float64)
    busy = load.sum(axis=1) > 0  # [L]
    with np.errstate(invalid="ignore", divide="ignore"):
        balancedness = np.where(busy, load.mean(axis=1) / load.max(axis=1), np.nan)
        load_entropy = np.where(busy, entropy(load, axis=1) / np.log(load.shape[1]), np.nan) if load.shape[1] > 1 \
            else np.full(len(load), np.nan)
        routing_entropy = np.where(tokens > 0, np.asarray(entropy_sum, np.float64) / tokens, np.nan)
    return {BALANCEDNESS: balancedness, LOAD_ENTROPY: load_entropy, ROUTING_ENTROPY: routing_entropy}
