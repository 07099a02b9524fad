"""The unquantized reference pass a sweep reuses, and the evaluation of one quantized configuration.

One forward pass per evaluation batch records, for the real (non-padding) tokens:
    nll          per predicted token, and the sequence it belongs to          [n]
    ids/weights  per MoE layer: what the experts received                     [n, k]
    logp         per MoE layer: log of the router distribution over experts   [n, E]
    x            per MoE layer: the router's input (pre-hook)                 [n, H]
    outputs      per decoder layer: what the layer returned (for prefix replay)

Local routing re-applies each router module's own forward to the cached x and selects by the family's
declared policy (adapters/policy: bias, groups, scoring, scaling), so a router-only configuration costs
one small matmul per layer instead of a forward pass. End-to-end evaluation
runs the model; when a configuration touches one decoder layer l only, layers 0..l-1 are replaced by
stubs returning their cached reference outputs, so only layers l.. run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from moescope.adapters.policy import LayerPolicy, layer_policy, router_tensor
from moescope.adapters.spec import MoELayer
from moescope.errors import MoescopeError, RoutingPolicyError
from moescope.quant.routing import RoutingDelta, router_log_probs
from moescope.quant.targets import decoder_layer_of, router_module
from moescope.recording.batches import Batch
from moescope.recording.hooks import RoutingRecorder, Taps, clone_output

LOCAL_CHUNK = 32768  # router-input rows per local forward call
LSE_CHUNK = 1 << 18  # logits per logsumexp call in the NLL


@dataclass
class BatchReference:
    batch: Batch
    keep: torch.Tensor  # bool [B*T]: real tokens
    nll: torch.Tensor  # float32 [n_pred]
    nll_seq: torch.Tensor  # int64 [n_pred]: global sequence index of each predicted token
    ids: list[torch.Tensor] = field(default_factory=list)  # per MoE layer [n, k]
    weights: list[torch.Tensor] = field(default_factory=list)  # per MoE layer [n, k]
    logp: list[torch.Tensor] = field(default_factory=list)  # per MoE layer [n, E]
    outputs: list = field(default_factory=list)  # per decoder layer: its return value (prefix replay)


@dataclass
class Reference:
    batches: list[BatchReference]
    x: list[torch.Tensor]  # per MoE layer: router inputs of all real tokens [N, H]
    local: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]  # per MoE layer: policy on x (ids, w, logp)
    local_agreement: list[float]  # per MoE layer: fraction of tokens whose local top-k set equals the recorded one
    seconds: float
    token_ids: torch.Tensor | None = None  # int64 [N]: the real tokens (hash-routed layers select by them)
    x_rank: list[int] = field(default_factory=list)  # per MoE layer: 2 or 3, the rank of the router's input
    local_skipped: dict[int, str] = field(default_factory=dict)  # MoE layer -> why it has no local routing

    @property
    def nll(self) -> torch.Tensor:
        return torch.cat([b.nll for b in self.batches])

    @property
    def nll_seq(self) -> torch.Tensor:
        return torch.cat([b.nll_seq for b in self.batches])


def token_nll(logits: torch.Tensor, batch: Batch, seq_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL of each real token that has a real successor, and its sequence index."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    rows = max(1, LSE_CHUNK // V)  # row blocks that stay in cache: about twice as fast as one pass on CPU
    lse = torch.cat([torch.logsumexp(flat[s : s + rows].float(), -1) for s in range(0, B * T, rows)]).view(B, T)
    target = batch.input_ids[:, 1:, None].to(logits.device)
    picked = logits[:, :-1].gather(-1, target).squeeze(-1).float()  # [B, T-1]
    nll = (lse[:, :-1] - picked).cpu()
    valid = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool()  # [B, T-1]
    rows = (torch.arange(B) + seq_offset)[:, None].expand(B, T - 1)
    return nll[valid], rows[valid]


def _rows(chunks: list[torch.Tensor], keep: torch.Tensor, what: str) -> torch.Tensor:
    tensor = torch.cat(chunks) if len(chunks) != 1 else chunks[0]
    if tensor.shape[0] != keep.shape[0]:
        raise MoescopeError(f"a router saw {tensor.shape[0]} {what} rows for {keep.shape[0]} token slots; this model "
                            "does not route every token exactly once per forward pass and cannot be swept")
    return tensor[keep]


class _Replay(nn.Module):
    """Stands in for decoder layer j: returns its cached reference output for the current batch."""

    def __init__(self, outputs: list, cursor: list[int]):
        super().__init__()
        self.outputs, self.cursor = outputs, cursor

    def forward(self, *args, **kwargs):
        return clone_output(self.outputs[self.cursor[0]])  # the cache must survive in-place work downstream


@contextmanager
def replay_prefix(layer_list: nn.ModuleList, start: int, outputs: list[list], cursor: list[int]) -> Iterator[None]:
    """Replace decoder layers 0..start-1 by their cached outputs (`outputs[j][batch]`); restored on exit."""
    originals = []
    try:
        for j in range(start):
            originals.append((j, layer_list[j]))
            layer_list[j] = _Replay(outputs[j], cursor)
        yield
    finally:
        for j, module in originals:
            layer_list[j] = module


def decoder_layer_list(model: nn.Module, paths: list[str]) -> nn.ModuleList | None:
    """The ModuleList of decoder layers holding the modules at `paths` (e.g. model.layers)."""
    lists = {found[0] for path in paths if (found := decoder_layer_of(path)) is not None}
    if len(lists) != 1:
        return None
    module = model.get_submodule(lists.pop())
    return module if isinstance(module, nn.ModuleList) else None


def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                 use_cache=False).logits


def reference_pass(model: nn.Module, batches: list[Batch], layers: list[MoELayer] | None, *,
                   layer_list: nn.ModuleList | None, keep_outputs: bool, progress: bool = False,
                   local: bool = True) -> Reference:
    """Run the unquantized model once over `batches` and cache everything the sweep reuses (`local`: also
    the router inputs and their local routing, which only router perturbations need)."""
    from tqdm.auto import tqdm

    layers = layers or []
    routers = [router_module(model, layer) for layer in layers]
    decoder_layers = list(layer_list)[:-1] if keep_outputs and layer_list is not None else []
    started = time.perf_counter()
    refs, xs, tokens, offset = [], [[] for _ in layers], [], 0
    recorder = RoutingRecorder(model, layers, weights_dtype=torch.float32)
    with recorder as rec, Taps(routers, layers, inputs=local, decoder_layers=decoder_layers) as taps, torch.inference_mode():
        for batch in tqdm(batches, desc="reference pass", unit="batch", disable=not progress, leave=False):
            logits = _forward(model, batch)
            keep = batch.attention_mask.reshape(-1).bool()
            nll, seq = token_nll(logits, batch, offset)
            offset += batch.input_ids.shape[0]
            chunks = rec.take() if layers else []
            x, scores, outputs = taps.take()
            ref = BatchReference(batch, keep, nll, seq, outputs=[o[0] for o in outputs])
            for i, layer in enumerate(layers):
                ref.ids.append(_rows(chunks[i].ids, keep, "expert-id").long())
                ref.weights.append(_rows(chunks[i].weights, keep, "gate-weight"))
                ref.logp.append(router_log_probs(_rows([s.cpu() for s in scores[i]], keep, "router-score"), layer))
                if local:
                    xs[i].append(_rows(x[i], keep, "router-input"))
            tokens.append(batch.input_ids.reshape(-1)[keep])
            refs.append(ref)
    seconds = time.perf_counter() - started
    ref = Reference(refs, [torch.cat(chunks) for chunks in xs if chunks], [], [], seconds,
                    token_ids=torch.cat(tokens).long(), x_rank=list(taps.rank))
    for i, layer in enumerate(layers if local else []):
        policy = _local_policy(model, layer, ref)
        ref.local.append(None if policy is None else local_routing(policy, layer, ref.x[i], ref.token_ids, ref.x_rank[i]))
        recorded = torch.cat([r.ids[i] for r in refs])
        ref.local_agreement.append(float("nan") if policy is None else _agreement(recorded, ref.local[i][0]))
    return ref


def _local_policy(model: nn.Module, layer: MoELayer, ref: Reference) -> LayerPolicy | None:
    """The layer's selection policy, or None (and the reason in ref.local_skipped) when its router cannot be
    re-run on its cached input alone (e.g. ZAYA's router also reads the previous layer's router state)."""
    try:
        policy = layer_policy(model, layer)
    except RoutingPolicyError as err:
        ref.local_skipped[layer.index] = str(err)
        return None
    missing = [n for n in policy.needs if n != "input_ids"]
    if missing:
        ref.local_skipped[layer.index] = f"MoE layer {layer.index}: its router also takes {', '.join(missing)}"
        return None
    return policy


def _agreement(recorded: torch.Tensor, local_ids: torch.Tensor) -> float:
    """Fraction of tokens whose top-k set from the router module alone equals what the experts received
    (below 1: the block changes the router's choice, and local flips describe the router module only)."""
    same = (recorded[:, :, None] == local_ids[:, None, :]).any(-1).all(-1)
    return float(same.float().mean()) if len(same) else float("nan")


def local_routing(policy: LayerPolicy, layer: MoELayer, x: torch.Tensor, token_ids: torch.Tensor | None = None,
                  rank: int = 2):
    """(ids, weights, logp) of the router's own forward on cached inputs x [N, H], selected by the layer's
    policy, in row chunks, no hooks. `rank` 3: the router takes [1, N, H] as its block hands it."""
    ids, weights, logps = [], [], []
    with torch.inference_mode():
        for start in range(0, max(len(x), 1), LOCAL_CHUNK):
            rows = x[start : start + LOCAL_CHUNK]
            rows = rows[None] if rank == 3 else rows
            inputs = {}
            if "input_ids" in policy.needs:
                tokens = token_ids[start : start + LOCAL_CHUNK]
                inputs["input_ids"] = tokens[None] if rank == 3 else tokens
            out = policy.router_output(rows, **inputs)
            logp = router_log_probs(router_tensor(out, layer.spec.router_output_index), layer)
            i, w = policy.select(out, rows, input_ids=inputs.get("input_ids"))
            ids.append(i.cpu())
            weights.append(w.cpu())
            logps.append(logp.cpu())
    return torch.cat(ids), torch.cat(weights), torch.cat(logps)


def local_deltas(model: nn.Module, layers: list[MoELayer], ref: Reference, changed: set[int]) -> dict[int, dict]:
    """Per MoE layer with a router parameter in `changed` (ids of parameters): local routing change."""
    results = {}
    for i, layer in enumerate(layers):
        router = router_module(model, layer)
        if ref.local[i] is None or not any(id(p) in changed for p in router.parameters()):
            continue
        ids, w, logp = local_routing(layer_policy(model, layer), layer, ref.x[i], ref.token_ids, ref.x_rank[i])
        delta = RoutingDelta()
        delta.add(*ref.local[i][:2], ids, w, ref.local[i][2], logp)
        results[i] = delta.result()
    return results


def end_to_end(model: nn.Module, layers: list[MoELayer] | None, ref: Reference, *, start: int,
               layer_list: nn.ModuleList | None) -> tuple[torch.Tensor, dict[int, dict], set[int]]:
    """Forward every batch through the (patched) model. Returns (nll [n], per MoE layer routing change,
    MoE layers replayed from the reference). `start` > 0 replays decoder layers 0..start-1."""
    layers = layers or []
    live = [i for i, layer in enumerate(layers) if layer.decoder_layer >= start or start == 0]
    replayed = set(range(len(layers))) - set(live)
    routers = [router_module(model, layers[i]) for i in live]
    deltas = {i: RoutingDelta() for i in range(len(layers))}
    cursor, nlls = [0], []
    outputs = [[b.outputs[j] for b in ref.batches] for j in range(start)]
    recorder = RoutingRecorder(model, [layers[i] for i in live], weights_dtype=torch.float32)
    replay = replay_prefix(layer_list, start, outputs, cursor) if start > 0 else nullcontext()
    with replay, recorder as rec, Taps(routers, [layers[i] for i in live], inputs=False) as taps, torch.inference_mode():
        for b, bref in enumerate(ref.batches):
            cursor[0] = b
            logits = _forward(model, bref.batch)
            nlls.append(token_nll(logits, bref.batch, 0)[0])
            chunks = rec.take() if live else []
            _, scores, _ = taps.take()
            for j, i in enumerate(live):
                ids = _rows(chunks[j].ids, bref.keep, "expert-id").long()
                w = _rows(chunks[j].weights, bref.keep, "gate-weight")
                logp = router_log_probs(_rows([s.cpu() for s in scores[j]], bref.keep, "router-score"), layers[i])
                deltas[i].add(bref.ids[i], bref.weights[i], ids, w, bref.logp[i], logp)
            for i in replayed:  # unchanged by construction: compare the reference with itself
                deltas[i].add(bref.ids[i], bref.weights[i], bref.ids[i], bref.weights[i], bref.logp[i], bref.logp[i])
    return torch.cat(nlls), {i: d.result() for i, d in deltas.items()}, replayed
