"""Synthetic routing traces with the structure real MoE routing has, for tests and benchmarks.

Router logits of token t at layer l (all [E] vectors):
    z(l) = base(l) + token_affinity[token][perm(l)] + domain_bias(domain, l) + sequence_offset(seq, l)
           + noise(l),   noise(l) = rho * noise(l-1)[perm(l)] + sqrt(1 - rho^2) * fresh
so experts are skewed (Zipf-like base popularity), tokens and domains prefer experts, neighbouring layers
are correlated through a permutation (so "same index" predicts poorly but transitions predict well), and
tokens of one sequence share an offset (temporal locality). Selection is top-k of the logits with
softmax-over-top-k weights (Mixtral style). Every shard is generated independently from (seed, shard
index), vectorised, so a trace can be regenerated shard by shard without holding it in memory.
Sequence s belongs to document s // sequences_per_document of source "synthetic" (ShardData.document
holds its key, as a trace read from disk would); `write_synthetic_trace` writes the shards as a trace
folder that the CLI, the reader and Ray workers read like any capture.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from moescope.analysis.context import AnalysisContext
from moescope.trace.shard import ShardData, document_key

SOURCE = "synthetic"  # the corpus name of every synthetic sequence


@dataclass(frozen=True)
class SyntheticSpec:
    n_layers: int = 4
    n_experts: int = 8
    top_k: int = 2
    vocab_size: int = 512
    domains: tuple[str, ...] = ("code", "math", "prose")
    seq_len: tuple[int, int] = (8, 128)  # inclusive range of sequence lengths
    router_output: str | None = "logits"  # "logits" | "probs" | None
    output_entropy: bool = True
    predicted_next_ids: bool = False
    skew: float = 1.0  # Zipf exponent of base expert popularity (in logit units)
    layer_correlation: float = 0.6
    token_affinity: float = 1.0
    domain_affinity: float = 0.7
    sequence_affinity: float = 0.5
    lookahead_noise: float = 0.5  # noise of the simulated next-layer-router prediction
    expert_sizes: tuple[int, ...] | None = None  # per expert (same every layer); None: half 2432, half 128
    hidden_size: int = 640
    generated_fraction: float = 0.0
    invalid_fraction: float = 0.0  # slots replaced by -1 (dropped) or E (zero-compute expert)
    sequences_per_document: int = 1  # consecutive seq ids cut from one document
    world_seed: int = 1234  # fixes the "model" (biases, permutations); shards vary with the trace seed

    def sizes(self) -> np.ndarray:
        if self.expert_sizes is not None:
            return np.asarray(self.expert_sizes, np.int64)
        half = self.n_experts // 2
        return np.array([2432] * (self.n_experts - half) + [128] * half, np.int64)

    def context(self, **overrides) -> AnalysisContext:
        kwargs = dict(
            n_experts=self.n_experts,
            top_k=self.top_k,
            n_layers=self.n_layers,
            router_output_kind=self.router_output,
            expert_sizes=self.sizes(),
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            token_text=lambda t: f"tok{t}",
        )
        kwargs.update(overrides)
        return AnalysisContext(**kwargs)


@lru_cache(maxsize=8)
def _world(spec: SyntheticSpec) -> dict[str, np.ndarray]:
    """The fixed 'model' of a spec: biases and permutations shared by every shard."""
    rng = np.random.default_rng(spec.world_seed)
    L, E, V, D = spec.n_layers, spec.n_experts, spec.vocab_size, len(spec.domains)
    ranks = np.arange(1, E + 1)
    base = np.stack([-spec.skew * np.log(ranks)[rng.permutation(E)] for _ in range(L)])  # [L, E]
    perm = np.stack([rng.permutation(E) for _ in range(L)])  # [L, E]
    zipf = 1.0 / np.arange(1, V + 1) ** 1.1
    vocab_p = np.stack([zipf[rng.permutation(V)] for _ in range(D)])  # [D, V]
    return {
        "base": base.astype(np.float32),
        "perm": perm,
        "token": (spec.token_affinity * rng.standard_normal((V, E))).astype(np.float32),
        "domain": (spec.domain_affinity * rng.standard_normal((D, L, E))).astype(np.float32),
        "vocab_cdf": np.cumsum(vocab_p / vocab_p.sum(axis=1, keepdims=True), axis=1),
    }


def synthetic_shard(spec: SyntheticSpec, n_tokens: int, *, seed: int = 0, shard_index: int = 0) -> ShardData:
    """One shard of about n_tokens tokens (whole sequences; at least one token)."""
    rng = np.random.default_rng([seed, shard_index])
    w = _world(spec)
    L, E, k, D = spec.n_layers, spec.n_experts, spec.top_k, len(spec.domains)
    lo, hi = spec.seq_len
    n_tokens = max(n_tokens, 1)
    lengths = rng.integers(max(lo, 1), hi + 1, size=n_tokens // max(lo, 1) + 1)  # sums to >= n_tokens
    total = np.cumsum(lengths)
    cut = int(np.searchsorted(total, n_tokens))  # first sequence reaching n_tokens
    lengths = lengths[: cut + 1]
    lengths[-1] -= total[cut] - n_tokens  # trim the last sequence: exactly n_tokens tokens
    n_seq, T = lengths.size, int(lengths.sum())
    first_seq = shard_index * (n_tokens + 1)  # seq ids unique across shards
    seq_index = np.repeat(np.arange(n_seq), lengths)  # [T]
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(T) - np.repeat(starts, lengths)
    seq_domain = rng.integers(0, D, n_seq)
    domain = seq_domain[seq_index]
    u = rng.random(T)
    token = np.empty(T, np.int64)
    for d in range(D):  # a handful of domains, each vectorised
        mask = domain == d
        token[mask] = np.minimum(np.searchsorted(w["vocab_cdf"][d], u[mask]), spec.vocab_size - 1)

    seq_offset = spec.sequence_affinity * rng.standard_normal((n_seq, L, E)).astype(np.float32)
    rho = spec.layer_correlation
    logits = np.empty((L, T, E), np.float32)
    noise = rng.standard_normal((T, E), dtype=np.float32)
    for l in range(L):  # layers depend on the previous one
        if l:
            noise = rho * noise[:, w["perm"][l]] + np.sqrt(1 - rho**2) * rng.standard_normal((T, E), dtype=np.float32)
        logits[l] = (
            w["base"][l]
            + w["token"][token][:, w["perm"][l]]
            + w["domain"][domain, l]
            + seq_offset[seq_index, l]
            + noise
        )

    ids, weights = _top_k(logits, k)
    if spec.invalid_fraction:
        invalid = rng.random(ids.shape) < spec.invalid_fraction
        ids[invalid] = np.where(rng.random(int(invalid.sum())) < 0.5, -1, E)
    router_output = None
    if spec.router_output == "logits":
        router_output = logits
    elif spec.router_output == "probs":
        e = np.exp(logits - logits.max(axis=2, keepdims=True))
        router_output = (e / e.sum(axis=2, keepdims=True)).astype(np.float32)
    entropy = None
    if spec.output_entropy:
        is_large = spec.sizes() > spec.sizes().mean()  # [E]
        routed = (ids >= 0) & (ids < E)  # dropped (-1) and zero-compute (E) slots are no expert
        large = (routed & is_large[np.clip(ids, 0, E - 1)]).sum(axis=(0, 2)) / np.maximum(routed.sum(axis=(0, 2)), 1)  # [T]
        entropy = (2.0 + 1.5 * large + 0.5 * rng.standard_normal(T)).astype(np.float32)
        entropy[rng.random(T) < 0.05] = np.nan  # some positions without a recorded entropy
    seq_id = (first_seq + seq_index).astype(np.int32)
    documents, inverse = np.unique(seq_id // spec.sequences_per_document, return_inverse=True)
    keys = np.array([document_key(SOURCE, str(d)) for d in documents.tolist()], np.int64)  # one per document
    fields = dict(
        layers=np.arange(L, dtype=np.int16),
        seq_id=seq_id,
        pos=pos.astype(np.int32),
        token_id=token.astype(np.int32),
        generated=rng.random(T) < spec.generated_fraction,
        domain=domain.astype(np.int16),
        domain_names=tuple(spec.domains),
        topk_ids=ids.astype(np.int16),
        topk_weights=weights,
        router_output=router_output,
        output_entropy=entropy,
        document=keys[inverse],
    )
    if spec.predicted_next_ids:
        noisy = logits[1:] + spec.lookahead_noise * rng.standard_normal(logits[1:].shape, dtype=np.float32)
        predicted = np.full((L, T, k), -1, np.int16)
        predicted[:-1] = _top_k(noisy, k)[0]
        fields["predicted_next_ids"] = predicted
    return ShardData(**fields)


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [..., k] ids by descending logit, float32 [..., k] softmax over the k selected logits)."""
    idx = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    val = np.take_along_axis(logits, idx, axis=-1)
    order = np.argsort(-val, axis=-1, kind="stable")
    idx, val = np.take_along_axis(idx, order, axis=-1), np.take_along_axis(val, order, axis=-1)
    e = np.exp(val - val[..., :1])
    return idx, (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def synthetic_trace(spec: SyntheticSpec, n_tokens: int, shard_tokens: int, *, seed: int = 0) -> Iterator[ShardData]:
    """Shards of about `shard_tokens` tokens each, about `n_tokens` in all; regenerable from the seed."""
    n_shards = max(1, -(-n_tokens // shard_tokens))
    for i in range(n_shards):
        yield synthetic_shard(spec, min(shard_tokens, n_tokens - i * shard_tokens), seed=seed, shard_index=i)


def write_synthetic_trace(folder, spec: SyntheticSpec, n_tokens: int, shard_tokens: int, *, seed: int = 0,
                          model_id: str = "synthetic") -> None:
    """`synthetic_trace` written as a trace folder, one Parquet shard each (router logits stored as float16, as a
    capture stores them; probabilities and next-layer predictions left out). `model_id` is the manifest's model
    (e.g. a hub id that is not on the machine, as a trace copied from elsewhere would name)."""
    from moescope.trace.block import Sequence, TokenBlock, routing_table, sequences_table, tokens_table
    from moescope.trace.writer import TraceWriter

    layers = [{"moe_layer": i, "decoder_layer": i, "n_experts": spec.n_experts, "top_k": spec.top_k} for i in range(spec.n_layers)]
    manifest = {"model": {"id": model_id}, "layers": layers, "capture": {}, "corpus": {}, "weights_dtype": "float32",
                "router_output_kind": "logits" if spec.router_output == "logits" else None, "versions": {}, "shards": []}
    with TraceWriter(folder, manifest, overwrite=True) as writer:
        for shard in synthetic_trace(spec, n_tokens, shard_tokens, seed=seed):
            block = TokenBlock(seq_id=shard.seq_id, pos=shard.pos, token_id=shard.token_id, generated=shard.generated,
                               output_entropy=np.full(shard.n_tokens, np.nan, np.float32), topk_ids=shard.topk_ids,
                               topk_weights=shard.topk_weights,
                               router_output=None if spec.router_output != "logits" else shard.router_output.astype(np.float16))
            ids, first, counts = np.unique(shard.seq_id, return_index=True, return_counts=True)
            seqs = [Sequence(int(i), [], SOURCE, shard.domain_names[shard.domain[f]], str(int(i) // spec.sequences_per_document), "")
                    for i, f in zip(ids, first)]
            tables = {"routing": routing_table(block), "tokens": tokens_table(block),
                      "sequences": sequences_table(seqs, dict(zip(ids.tolist(), counts.tolist())))}
            writer.write_shard(tables, seq_id_min=int(ids.min()), seq_id_max=int(ids.max()))
        writer.finish()
