"""`moescope.record(model)`: record the routing of the forward passes and `generate()` calls the user's code runs.

    with moescope.record(model) as rec:    # RoutingRecorder's hooks, plus the model's own call observed
        model.generate(**batch)            # the prefill and one call per decoding step (KV cache)
        model(input_ids)                   # a plain forward pass: new sequences
    rec.trace                              # a Trace: the schema, manifest and shards of `moescope.capture`

Which sequences a call feeds is read from the call itself:
- a call whose KV cache (`past_key_values`) an earlier call produced or fed continues that call's rows;
  any other call starts new sequences, one per row (seq ids keep increasing across calls);
- a call without a cache that repeats the previous call's tokens plus one column continues it
  (`generate(use_cache=False)`); only its new column is recorded;
- positions count real tokens: from the attention mask when it covers the cached and the new tokens (left
  padding is no position), else from the row's length so far (or the cache's length);
- a one-token-per-row continuation is a decoding step, so its tokens are `generated`; a row's EOS and what
  is fed after it are not recorded (as with `capture --generate`).
A sequence is complete once nothing can continue it (its cache object is gone, or the block ended).
Complete sequences are committed as shards of whole sequences into `out`; with `out=None` they stay in
memory up to `memory_tokens` and then go to a temporary folder (removed when the trace is dropped).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moescope.adapters.discover import find_moe_layers
from moescope.errors import MoescopeError, TraceError
from moescope.recording.batches import Batch
from moescope.trace.block import Sequence, TokenBlock, concat_blocks
from moescope.recording.hooks import GenerateArguments, RoutingRecorder
from moescope.recording.manifest_info import build_manifest
from moescope.recording.options import CAPTURE_ONLY, CaptureOptions, options_from_keywords
from moescope.recording.rows import block_from_forward
from moescope.recording.runner import _eos_ids, encode_shard, finish_capture
from moescope.trace.manifest import MANIFEST
from moescope.trace.memory import MemoryTrace
from moescope.trace.reader import Trace
from moescope.trace.storage import Location, is_url, location, with_options
from moescope.trace.writer import TraceWriter

_RECORDING: weakref.WeakSet = weakref.WeakSet()  # models inside a `record` block now (nesting is refused)


@dataclass
class _Group:
    """The rows of a call that started new sequences, followed through the calls that continue them."""

    seq_ids: np.ndarray  # int64 [B] provisional ids (renumbered densely when committed)
    placeholders: list[Sequence]  # one per row, carrying only its provisional seq id (for block_from_forward)
    lengths: torch.Tensor  # int64 [B] real tokens fed so far
    finished: torch.Tensor  # bool [B] the row fed its EOS
    cache: weakref.ref | None = None  # the KV cache that continues these rows
    last_ids: torch.Tensor | None = None  # int64 [B, T] the last call's tokens, when it had no cache
    blocks: list[TokenBlock] = field(default_factory=list)

    def alive(self) -> bool:
        return self.cache is not None and self.cache() is not None


@dataclass
class _Call:
    ids: torch.Tensor | None  # int64 [B, T] as fed (None: inputs_embeds only)
    shape: tuple[int, int]
    mask: torch.Tensor | None  # [B, past + T] or [B, T]
    cache: object
    past: int
    sampled: bool


def _cached_tokens(cache, mask: torch.Tensor | None, width: int, cache_position: torch.Tensor | None) -> int:
    """Tokens the KV cache holds before this call: the cache says (attention layers), else the call's
    `cache_position` (remote-code models get one from generate), else the mask."""
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (ValueError, AttributeError, TypeError):  # e.g. a cache of linear-attention layers only tracks no length
        if cache_position is not None and cache_position.numel():
            return int(cache_position.reshape(-1)[0])
        return max(mask.shape[1] - width, 0) if mask is not None else 0


def _first_tensor(args: tuple, kwargs: dict, name: str):
    value = kwargs.get(name)
    if value is None and name == "input_ids" and args and isinstance(args[0], torch.Tensor):
        value = args[0]
    return value if isinstance(value, torch.Tensor) else None


class Recording:
    """What `moescope.record(...)` returns: a context manager; after the block, `.trace` is the Trace."""

    def __init__(self, model: nn.Module, out=None, *, options: CaptureOptions | None = None, layers=None,
                 sample_every: int = 1, tokenizer=None, memory_tokens: int = 262144, storage_options: dict | None = None):
        options = options if options is not None else CaptureOptions()
        if not isinstance(model, nn.Module):
            raise MoescopeError(f"moescope.record needs a loaded torch model (nn.Module), not {type(model).__name__}")
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise MoescopeError(f"sample_every must be a whole number >= 1 (every Nth forward call), not {sample_every!r}")
        not_here = options.changed(CAPTURE_ONLY)
        if not_here:
            raise MoescopeError(f"moescope.record observes your own calls: the options {', '.join(not_here)} apply to "
                                "moescope.capture only; leave them at their defaults")
        found = find_moe_layers(model, options.router)  # NoRouterFoundError (one line) for a model without MoE layers
        self.layers = _pick_layers(found, layers)
        out = None if out is None else with_options(out, storage_options)
        out = None if out is None else location(out) if is_url(out) else Path(out)  # s3://...: a storage.Location
        self.model, self.out, self.tokenizer = model, out, tokenizer
        self.options, self.sample_every, self.memory_tokens = options, sample_every, memory_tokens
        self.trace: Trace | None = None
        self.calls = 0  # forward calls of the model seen in the block
        self.recorded_calls = 0
        self._groups: list[_Group] = []  # open, then closed-but-uncommitted, in seq id order
        self._by_cache: dict[int, _Group] = {}
        self._last_nocache: _Group | None = None
        self._next_provisional = 0
        self._next_seq_id = 0
        self._memory: list[dict] | None = None  # committed shard tables while in memory
        self._manifest_template: dict | None = None
        self._writer: TraceWriter | None = None
        self._folder: Path | None = None
        self._kind_votes: list[str] = []
        self._n_tokens = 0
        self._pending: _Call | None = None

    # -- the block ------------------------------------------------------------------------------------
    def __enter__(self) -> "Recording":
        if self.model in _RECORDING:
            raise MoescopeError("this model is already being recorded by an enclosing moescope.record block; "
                                "record it once (one block per model)")
        manifest = self._manifest()
        if self.out is not None:
            if self.out.size(MANIFEST) is not None if isinstance(self.out, Location) else (self.out / MANIFEST).exists():
                raise TraceError(f"{self.out} already holds a trace; record into a new folder (nothing was changed)")
            self._writer = TraceWriter(self.out, manifest)
        else:
            self._memory, self._manifest_template = [], manifest
        self._default_eos = torch.tensor(sorted(_eos_ids(self.model, self.tokenizer)), dtype=torch.long)
        self._eos = self._default_eos
        self._started = time.perf_counter()
        self._recorder = RoutingRecorder(self.model, self.layers, save_router_output=self.options.save_logits,
                                         weights_dtype=getattr(torch, self.options.weights_dtype),
                                         logits_dtype=getattr(torch, self.options.logits_dtype), calls=self)
        self._generate_args = GenerateArguments(self.model, self._generate_call)
        try:
            self._recorder.__enter__()
            self._generate_args.__enter__()
        except BaseException:
            self._recorder.__exit__(None, None, None)
            self._close_writer()
            raise
        _RECORDING.add(self.model)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._generate_args.__exit__(exc_type, exc, tb)
            self._recorder.__exit__(exc_type, exc, tb)
        finally:
            _RECORDING.discard(self.model)
            try:
                self._last_nocache, self._by_cache, self._pending = None, {}, None
                self._commit(everything=True)
                self.trace = self._finish(complete=exc_type is None)
            finally:
                self._close_writer()

    def _generate_call(self, kwargs: dict | None) -> None:
        """A `generate` call begins (its keyword arguments) or ends (None): its own EOS ids, if it passes any,
        end its rows instead of the model's (`eos_token_id=`, or a `generation_config=` that sets one)."""
        eos = None if kwargs is None else kwargs.get("eos_token_id")
        if eos is None and kwargs is not None:
            eos = getattr(kwargs.get("generation_config"), "eos_token_id", None)
        if eos is None:
            self._eos = self._default_eos
        else:
            self._eos = torch.as_tensor(eos, dtype=torch.long).reshape(-1)

    # -- CallObserver: the model's own call ----------------------------------------------------------
    def before(self, args: tuple, kwargs: dict) -> None:
        self._recorder.take()  # anything left by a call that raised midway belongs to no call
        ids = _first_tensor(args, kwargs, "input_ids")
        embeds = _first_tensor((), kwargs, "inputs_embeds")
        shape = tuple(ids.shape[:2]) if ids is not None else tuple(embeds.shape[:2]) if embeds is not None else None
        if shape is None or len(shape) != 2:
            self._recorder.enabled, self._pending = False, None  # not a call over token rows: nothing to record
            return
        mask = _first_tensor((), kwargs, "attention_mask")
        cache = kwargs.get("past_key_values")
        mask = mask if mask is not None and mask.dim() == 2 else None
        past = _cached_tokens(cache, mask, shape[1], _first_tensor((), kwargs, "cache_position"))
        sampled = self.calls % self.sample_every == 0
        self.calls += 1
        self._recorder.enabled = sampled
        self._pending = _Call(ids, shape, mask, cache, past, sampled)

    def after(self, output) -> None:
        call, self._pending = self._pending, None
        if call is None:
            return
        chunks = self._recorder.take() if call.sampled else None
        self._recorder.enabled = True
        ids = call.ids.detach().cpu() if call.ids is not None else None
        group, first_new, continued = self._group_for(call, ids)
        batch, generated = self._positions(call, ids, group, first_new, continued)
        if call.sampled:
            block = block_from_forward(batch, chunks, None)
            block.generated = generated.reshape(-1).numpy()[batch.attention_mask.reshape(-1).bool().numpy()]
            group.blocks.append(block)
            self.recorded_calls += 1
        new_cache = getattr(output, "past_key_values", None) if not isinstance(output, tuple) else None
        self._follow(group, call.cache if call.cache is not None else new_cache, ids if call.cache is None else None)
        self._commit(everything=False)

    # -- which sequences and positions a call feeds ---------------------------------------------------
    def _group_for(self, call: _Call, ids: torch.Tensor | None) -> tuple[_Group, int, bool]:
        """(the group the call feeds, index of its first new column, whether it continues earlier calls)."""
        rows, width = call.shape
        if call.cache is not None:
            group = self._by_cache.get(id(call.cache))
            if group is not None and group.cache is not None and group.cache() is call.cache and len(group.seq_ids) == rows:
                return group, 0, True
        else:
            group = self._last_nocache
            last = group.last_ids if group is not None else None
            if (last is not None and ids is not None and last.shape[0] == rows and last.shape[1] + 1 == width
                    and torch.equal(ids[:, :-1], last)):
                return group, width - 1, True
        seq_ids = np.arange(self._next_provisional, self._next_provisional + rows)
        self._next_provisional += rows
        start = torch.full((rows,), call.past if call.cache is not None else 0, dtype=torch.long)  # a cache from before the block
        group = _Group(seq_ids, [Sequence(int(s), [], "record", "record", "", "") for s in seq_ids], start,
                       torch.zeros(rows, dtype=torch.bool))
        self._groups.append(group)
        return group, 0, False

    def _positions(self, call: _Call, ids, group: _Group, first_new: int, continued: bool) -> tuple[Batch, torch.Tensor]:
        """The call as a Batch (mask: the tokens to record; pos: their positions) and its `generated` flags [B, T]."""
        rows, width = call.shape
        n_new = width - first_new
        mask = call.mask.detach().cpu().long() if call.mask is not None else None
        if mask is not None and mask.shape[1] == (call.past + width if call.cache is not None else width):
            real_new = mask[:, -n_new:].bool()  # the mask covers every token the rows were fed: count them
            pos_new = mask.cumsum(1)[:, -n_new:] - 1
        else:  # no mask, or one of the new tokens only: go on from the rows' lengths
            real_new = mask[:, -n_new:].bool() if mask is not None and mask.shape[1] >= n_new else torch.ones(rows, n_new, dtype=torch.bool)
            pos_new = group.lengths[:, None] + real_new.long().cumsum(1) - 1
        generated = torch.zeros(rows, width, dtype=torch.bool)
        if continued and n_new == 1:  # a decoding step: stop at the row's EOS (not recorded, nor what follows)
            token = ids[:, -1] if ids is not None else torch.full((rows,), -1)
            live = real_new[:, 0] & ~group.finished
            eos = torch.isin(token, self._eos)
            group.finished |= live & eos
            real_new = (live & ~eos)[:, None]
            generated[:, -1] = True
        keep = torch.zeros(rows, width, dtype=torch.bool)
        keep[:, first_new:] = real_new
        pos = torch.full((rows, width), -1, dtype=torch.long)
        pos[:, first_new:] = torch.where(real_new, pos_new, -1)
        group.lengths = torch.maximum(group.lengths, pos.max(1).values + 1)
        input_ids = ids if ids is not None else torch.full((rows, width), -1, dtype=torch.long)
        return Batch(group.placeholders, input_ids, keep.long(), pos), generated

    def _follow(self, group: _Group, cache, last_ids) -> None:
        """Remember what can continue `group`: its KV cache, or (no cache) the tokens it was just fed."""
        if cache is not None and hasattr(cache, "get_seq_length"):
            if group.cache is None or group.cache() is not cache:
                group.cache = weakref.ref(cache)
                self._by_cache[id(cache)] = group
        group.last_ids = last_ids
        self._last_nocache = group if last_ids is not None else None

    # -- committing complete sequences ----------------------------------------------------------------
    def _open(self, group: _Group) -> bool:
        return group.alive() or group is self._last_nocache

    def _commit(self, everything: bool) -> None:
        """Commit complete groups that precede every open one (a shard is a contiguous run of seq ids), in shards
        of about `shard_tokens`; at the end of the block (`everything`) all of them."""
        done, tokens = [], 0
        for group in self._groups:
            if not everything and self._open(group):
                break
            done.append(group)
            tokens += sum(b.n_tokens for b in group.blocks)
            if tokens >= self.options.shard_tokens:
                self._write_groups(done)
                done, tokens = [], 0
        if done and everything:
            self._write_groups(done)

    def _write_groups(self, groups: list[_Group]) -> None:
        self._groups = self._groups[len(groups):]
        gone = {id(g) for g in groups}
        self._by_cache = {key: g for key, g in self._by_cache.items() if id(g) not in gone}
        blocks = [b for g in groups for b in g.blocks]
        if not blocks:
            return
        block = _renumber(concat_blocks(blocks), self._next_seq_id)
        sequences = self._sequences(block)
        self._next_seq_id += len(sequences)
        self._write(block, sequences)

    def _sequences(self, block: TokenBlock) -> list[Sequence]:
        """One Sequence per seq id of `block` (rows in (seq_id, pos) order), hashed from its tokens' text."""
        seq_ids, starts = np.unique(block.seq_id, return_index=True)
        out = []
        for seq_id, ids in zip(seq_ids.tolist(), np.split(block.token_id, starts[1:])):
            text = self.tokenizer.decode(ids.tolist()) if self.tokenizer is not None else str(ids.tolist())
            out.append(Sequence(seq_id, [], "record", "record", str(seq_id), hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()))
        return out

    def _write(self, block: TokenBlock, sequences: list[Sequence]) -> None:
        tables, kinds = encode_shard([block], sequences)
        self._kind_votes += kinds
        self._n_tokens += block.n_tokens
        ids = [s.seq_id for s in sequences]
        if self._memory is not None:
            self._memory.append(tables)
            if sum(t["tokens"].num_rows for t in self._memory) > self.memory_tokens:
                self._spill()
            return
        self._writer.write_shard(tables, seq_id_min=min(ids), seq_id_max=max(ids))

    def _spill(self) -> None:
        """Past `memory_tokens`: move the in-memory shards into a temporary trace folder and go on there."""
        self._folder = Path(tempfile.mkdtemp(prefix="moescope-record-"))
        self._writer = TraceWriter(self._folder, self._manifest_template)
        for tables in self._memory:
            ids = tables["sequences"].column("seq_id").to_pylist()
            self._writer.write_shard(tables, seq_id_min=min(ids), seq_id_max=max(ids))
        self._memory = None

    def _finish(self, complete: bool) -> Trace:
        if self._memory is not None:
            manifest = {**self._manifest_template, "complete": complete, "router_output_kind": _kind(self._kind_votes, None),
                        "stats": self._stats()}
            return MemoryTrace(manifest, self._memory)
        if complete:
            finish_capture(self._writer, self._kind_votes, self._n_tokens, self._started,
                           forward_calls=self.calls, recorded_calls=self.recorded_calls)
        else:
            self._writer.update(router_output_kind=_kind(self._kind_votes, None), stats=self._stats())
        trace = Trace(self._writer.folder)
        if self._folder is not None:  # a temporary folder lives as long as the trace that reads it
            weakref.finalize(trace, shutil.rmtree, str(self._folder), True)
        return trace

    def _stats(self) -> dict:
        return {"tokens_this_run": self._n_tokens, "seconds_this_run": round(time.perf_counter() - self._started, 3),
                "forward_calls": self.calls, "recorded_calls": self.recorded_calls}

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _manifest(self) -> dict:
        config = getattr(self.model, "config", None)
        name = getattr(config, "_name_or_path", "") or type(self.model).__name__
        opts = {"mode": "record", "sample_every": self.sample_every, "save_router_output": self.options.save_logits,
                "weights_dtype": self.options.weights_dtype, "logits_dtype": self.options.logits_dtype, "recorded_moe_layers": [l.block_path for l in self.layers]}
        return build_manifest(self.model, self.layers, opts=opts, model_info={"id": name},
                              corpus_info={"spec": "record", "source": "the user's own forward and generate calls"})


def _kind(votes: list[str], default):
    distinct = set(votes)
    return distinct.pop() if len(distinct) == 1 else ("mixed" if distinct else default)


def _renumber(block: TokenBlock, first: int) -> TokenBlock:
    """Provisional seq ids -> first, first+1, ... (sequences that recorded nothing get none); rows in (seq_id, pos) order."""
    kept, dense = np.unique(block.seq_id, return_inverse=True)
    seq_id = (dense + first).astype(np.int32)
    order = np.lexsort((block.pos, seq_id))
    layer_major = lambda a: None if a is None else a[:, order]
    return replace(block, seq_id=seq_id[order], pos=block.pos[order], token_id=block.token_id[order],
                   generated=block.generated[order], output_entropy=block.output_entropy[order],
                   topk_ids=layer_major(block.topk_ids), topk_weights=layer_major(block.topk_weights),
                   router_output=layer_major(block.router_output), predicted_next=layer_major(block.predicted_next))


def _pick_layers(found: list, layers) -> list:
    """The MoE layers to record (all, or the given MoE-layer indices), renumbered 0..n-1 as the trace numbers them."""
    if layers is None:
        return found
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    picked = list(layers)
    if not picked or not all(isinstance(i, int) and not isinstance(i, bool) for i in picked):
        raise MoescopeError(f"layers must be MoE-layer indices (0..{len(found) - 1}), not {layers!r}")
    bad = [i for i in picked if not 0 <= i < len(found)]
    if bad:
        raise MoescopeError(f"MoE layer {bad[0]} is out of range: this model has {len(found)} MoE layers (0..{len(found) - 1})")
    if len(set(picked)) != len(picked):
        raise MoescopeError(f"layers lists an MoE layer twice: {picked}")
    return [replace(found[i], index=n) for n, i in enumerate(sorted(picked))]


def record(model: nn.Module, out: str | os.PathLike | None = None, *, options: CaptureOptions | None = None, layers=None,
           sample_every: int = 1, tokenizer=None, storage_options: dict | None = None, **deprecated) -> Recording:
    """Record the routing of every forward pass and ``generate()`` your code runs on `model` inside the block.

    Parameters
    ----------
    model : a loaded MoE model (any supported family, or your own with ``moescope_router = CustomRouter(...)``).
    out : a new trace folder; ``None`` keeps the trace in memory (a temporary folder past 262,144 tokens).
    options : a ``CaptureOptions``: what is stored beside ids and weights (``save_logits``, ``logits_dtype``,
        ``weights_dtype``), ``shard_tokens``, and ``router`` (a ``CustomRouter`` for a model of your own that
        does not declare ``moescope_router``). Options that shape batches or load a model are capture's only.
        ``save_logits=``, ``router=`` and ``logits_dtype=`` as keywords still work for this release, with a
        DeprecationWarning.
    layers : MoE-layer indices to record (default: all).
    sample_every : record every Nth forward call of the model (a decoding step is a call).
    tokenizer : used for the EOS id when the model's generation config has none, and for sequence text hashes.
        A ``generate(..., eos_token_id=X)`` call ends its rows at X.
    storage_options : for an object-store ``out`` (s3://bucket/prefix), the settings ``--storage-option`` takes
        (``{"endpoint_url": ..., "profile": ...}``), instead of the process's defaults.

    Returns
    -------
    Recording : a context manager; after the block ``rec.trace`` is the Trace (same schema as ``capture``).

    Examples
    --------
    >>> with moescope.record(model) as rec:                                     # doctest: +SKIP
    ...     model.generate(**tokenizer(["def f(x):", "2 + 2 ="], return_tensors="pt", padding=True), max_new_tokens=16)
    >>> rec.trace.sql("SELECT layer, topk_ids[1] AS first, count(*) FROM routing GROUP BY ALL")  # doctest: +SKIP
    """
    options = options_from_keywords(options, deprecated, where="moescope.record")
    return Recording(model, out, options=options, layers=layers, sample_every=sample_every, tokenizer=tokenizer,
                     storage_options=storage_options)
