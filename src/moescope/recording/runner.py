"""The capture loop: batches in, committed shards out, memory bounded by one shard.

    sequences -> padded batches -> forward (RoutingRecorder) -> TokenBlock -> buffer -> shard

Shards hold whole sequences; sequences already committed by an interrupted run are skipped.
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from moescope.adapters.discover import CustomRouter, find_moe_layers
from moescope.adapters.spec import MoELayer
from moescope.recording.batches import Batch, batched, make_batch
from moescope.trace.block import Sequence, TokenBlock, shard_tables, with_ordered_slots
from moescope.recording.generate import block_from_generate
from moescope.recording.hooks import RoutingRecorder
from moescope.recording.options import CaptureSettings
from moescope.recording.manifest_info import build_manifest, detect_router_output_kind
from moescope.recording.rows import block_from_forward
from moescope.trace.reader import Trace
from moescope.trace.writer import TraceWriter


def _output_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return -(logp.exp() * logp).sum(-1)  # [B, T]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@dataclass
class DeferredBlock:
    """A batch's routing whose device-to-host copies may still be in flight; built on the writer thread,
    so the capture loop never waits for the GPU (it queues the next batch while this one computes)."""

    n_tokens: int
    build: Callable[[], TokenBlock]
    ready: list[torch.cuda.Event]  # one per GPU the model is on, recorded after the hooks' copies; none on the CPU

    def resolve(self) -> TokenBlock:
        for event in self.ready:
            event.synchronize()
        return self.build()


def prepare_block(block: TokenBlock | DeferredBlock) -> TokenBlock:
    """One batch's share of a shard's work: its block built (once its copies have landed) and its slots put in
    contract order. The capture loop hands each batch here on the writer thread as it arrives, so this overlaps the
    next batches' forward passes and only the last batch's share is left when the capture ends."""
    return with_ordered_slots(block.resolve() if isinstance(block, DeferredBlock) else block)


def encode_shard(blocks: list[TokenBlock | DeferredBlock], sequences: list[Sequence]) -> tuple[dict, list[str]]:
    """({table name: Arrow table} of one shard, the router output kind each block's data shows)."""
    blocks = [prepare_block(b) for b in blocks]
    kinds = [detect_router_output_kind(b.router_output) for b in blocks if b.router_output is not None]
    return shard_tables(blocks, sequences), kinds


class ShardBuffer:
    """Collects TokenBlocks and their sequences until a shard's worth, then commits them.

    Each batch's block is prepared (`prepare_block`) on a background thread as soon as it is added, and a full
    shard is encoded and written there too, so slot ordering and Parquet compression overlap the next batches'
    forward passes (NumPy and pyarrow release the GIL); the thread takes its work in order, one shard written
    while the next one fills, so memory stays bounded by two shards. Use as a context manager: leaving it waits
    for the last write (and raises its error), so the trace folder's lock is never released while a shard is half
    written.
    """

    def __init__(self, writer: TraceWriter, shard_tokens: int):
        self.writer, self.shard_tokens = writer, shard_tokens
        self.blocks: list[Future] = []  # of TokenBlock: each added block, being prepared on the writer thread
        self.n_tokens = 0  # in self.blocks
        self.sequences: list[Sequence] = []
        self.kind_votes: list[str | None] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moescope-shard-writer")
        self._pending: Future | None = None

    def add(self, block: TokenBlock | DeferredBlock, sequences: list[Sequence]) -> None:
        # A full shard is handed over when the next block arrives, not at once: the capture's last shard is then
        # always the one `flush(last=True)` writes on this thread (see flush); run_capture also hands
        # over what is buffered before the last batch, so that shard is one batch. A shard holds one
        # contiguous run of seq ids (TraceWriter.committed_seq_ids relies on it).
        if self.n_tokens >= self.shard_tokens or (
                self.sequences and sequences and sequences[0].seq_id != self.sequences[-1].seq_id + 1):
            self.flush()
        self.blocks.append(self._pool.submit(prepare_block, block))
        self.n_tokens += block.n_tokens
        self.sequences.extend(sequences)

    def flush(self, last: bool = False) -> None:
        """Hand what is buffered to the writer thread (after the previous shard is committed). The `last` shard is
        written on this thread, since no forward pass is left to overlap it with (a hand-off there only adds the
        thread's wake-up), and committed by the `finish` that follows (one manifest write, see trace/writer.py)."""
        if not self.blocks:
            return
        blocks, sequences = self.blocks, self.sequences
        self.blocks, self.sequences, self.n_tokens = [], [], 0
        self.wait()
        if last:
            self._commit(blocks, sequences, last=True)
        else:
            self._pending = self._pool.submit(self._commit, blocks, sequences, last)

    def wait(self) -> None:
        """Block until the shard being written is committed; raises the error of a failed write."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _commit(self, prepared: list[Future], sequences: list[Sequence], last: bool = False) -> None:
        tables, kinds = encode_shard([block.result() for block in prepared], sequences)
        self.kind_votes += kinds
        ids = [s.seq_id for s in sequences]
        self.writer.write_shard(tables, seq_id_min=min(ids), seq_id_max=max(ids), commit=not last)

    def __enter__(self) -> "ShardBuffer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush(last=True)
                self.wait()
            else:  # a full shard is still written (unless an earlier write failed); let the write end before the
                # lock is released, and report the loop's error
                if self.n_tokens >= self.shard_tokens and (self._pending is None or self._pending.exception() is None):
                    self.flush()
                if self._pending is not None:
                    futures_wait([self._pending])
        finally:  # after a failure, the blocks still queued for preparing are dropped
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)


def with_one_left(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, whether exactly one more item follows it), reading at most two items ahead."""
    it = iter(items)
    ahead = list(itertools.islice(it, 2))
    while ahead:
        item = ahead.pop(0)
        ahead.extend(itertools.islice(it, 1))  # refill to two: one left over means the source is spent
        yield item, len(ahead) == 1


def _forward_batches(model, layers: list[MoELayer], batches: Iterator[Batch], opts: CaptureSettings, eos: set[int]):
    """(batch, block, whether exactly one batch follows) per batch, after its forward pass."""
    device = next(model.parameters()).device
    # several with --device-map; none unless CUDA was initialised (skips a walk over every parameter on CPU)
    gpus = {p.device for p in model.parameters() if p.device.type == "cuda"} if torch.cuda.is_initialized() else set()
    forward = forward_call(model, need_logits=opts.output_entropy)
    recorder = RoutingRecorder(model, layers, save_router_output=opts.save_router_output,
                               predict_next_layer=opts.predict_next_layer, save_expert_norms=opts.save_expert_norms,
                               weights_dtype=getattr(torch, opts.weights_dtype), logits_dtype=getattr(torch, opts.logits_dtype))
    with recorder as rec, torch.inference_mode():
        for batch, one_left in with_one_left(batches):
            input_ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            if opts.generate:
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=opts.generate,
                                     do_sample=False, pad_token_id=_pad_id(model))
                yield batch, block_from_generate(batch, rec.take(), out.cpu(), eos), one_left
            else:
                output = forward(input_ids, mask)
                logits = getattr(output, "logits", None)  # None for a base model without an LM head or a plain tensor
                entropy = _output_entropy(logits).cpu() if opts.output_entropy and logits is not None else None
                chunks, ready = rec.take(synchronize=False), _copies_done(gpus)
                build = lambda batch=batch, chunks=chunks, entropy=entropy: block_from_forward(batch, chunks, entropy)
                yield batch, DeferredBlock(int(batch.attention_mask.sum()), build, ready), one_left


def _copies_done(gpus: set[torch.device]) -> list[torch.cuda.Event]:
    """Events that fire once everything queued so far on each GPU (the hooks' copies included) is done."""
    events = []
    for gpu in gpus:
        with torch.cuda.device(gpu):
            events.append(torch.cuda.Event())
            events[-1].record()
    return events


def _pad_id(model) -> int:
    """Any id will do: padded positions are masked (attention_mask) and never recorded."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)  # a plain nn.Module has no config
    return pad if pad is not None else 0


def _optional_inputs(model) -> set[str]:
    """Which of attention_mask / use_cache `model.forward` takes (a transformers model: both)."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"attention_mask", "use_cache"}
    return {"attention_mask", "use_cache"} & set(params)


def forward_call(model, *, need_logits: bool = True) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """(input_ids [B, T], attention_mask [B, T]) -> the model's output, passing only what its forward takes:
    a plain PyTorch module's `forward(ids)` works as well as a transformers model's.

    Routing never depends on the LM head, so without `need_logits` a forward that takes `logits_to_keep`
    computes the last position's logits only ([B, 1, V], not [B, T, V]: 64 MB and the head's matmul per 8x256
    batch of an 8k vocabulary; 1.2 GB of a 151k one)."""
    takes = _optional_inputs(model)
    params = inspect.signature(model.forward).parameters
    by_name = "input_ids" in params
    fixed = {"logits_to_keep": 1} if not need_logits and "logits_to_keep" in params else {}

    def call(input_ids: torch.Tensor, mask: torch.Tensor):
        kwargs = {k: v for k, v in (("attention_mask", mask), ("use_cache", False)) if k in takes} | fixed
        return model(input_ids=input_ids, **kwargs) if by_name else model(input_ids, **kwargs)

    return call


def record_batches(model, tokenizer, layers: list[MoELayer], sequences: Iterable[Sequence], opts: CaptureSettings):
    """(batch, block, whether exactly one batch follows) for each padded batch of `sequences`: the capture loop
    without the writing.

    A model whose forward takes no attention_mask is never fed padding: its batches hold sequences of one length."""
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else _pad_id(model)
    same_length = "attention_mask" not in _optional_inputs(model)
    groups = batched(sequences, opts.batch_size, same_length=same_length)
    left = bool(opts.generate) or opts.padding_side == "left"
    batches = (make_batch(group, pad_id, left_pad=left) for group in groups)
    yield from _forward_batches(model, layers, batches, opts, _eos_ids(model, tokenizer))


def run_capture(model, tokenizer, sequences: Iterable[Sequence], out: str | os.PathLike, *, opts: CaptureSettings,
                model_info: dict, corpus_info: dict, custom_router: CustomRouter | None = None,
                overwrite: bool = False, progress: bool = True, total_tokens: int | None = None) -> Trace:
    """Capture the routing of `sequences` through `model` into the trace folder `out`."""
    from tqdm.auto import tqdm

    layers = find_moe_layers(model, custom_router)
    manifest = build_manifest(model, layers, opts=asdict(opts), model_info=model_info, corpus_info=corpus_info)
    with TraceWriter(out, manifest, overwrite=overwrite) as writer:
        if writer.already_complete:  # the same capture, finished before: nothing to do
            return Trace(out)
        done = writer.committed_seq_ids
        todo = (s for s in sequences if s.seq_id not in done)
        bar = tqdm(total=total_tokens, unit="tok", disable=not progress, desc="capture", dynamic_ncols=True)
        started = time.perf_counter()
        n_tokens = 0
        with ShardBuffer(writer, opts.shard_tokens) as buffer:
            for batch, block, one_left in record_batches(model, tokenizer, layers, todo, opts):
                buffer.add(block, batch.sequences)
                if one_left:  # what is buffered is encoded while the last batch runs: the last shard is that batch
                    buffer.flush()  # alone, the only encoding the capture waits for after its last forward
                n_tokens += block.n_tokens
                bar.update(block.n_tokens)
        bar.close()
        finish_capture(writer, buffer.kind_votes, n_tokens, started)
    return Trace(out)


def finish_capture(writer: TraceWriter, kind_votes: list[str], n_tokens: int, started: float, **stats) -> None:
    """Mark the trace complete, with the router output kind the data showed ('logits'/'probs'; 'mixed' if the
    blocks disagreed; unchanged if nothing was recorded) and this run's numbers."""
    votes = set(kind_votes)
    kind = votes.pop() if len(votes) == 1 else ("mixed" if votes else writer.manifest.get("router_output_kind"))
    seconds = round(time.perf_counter() - started, 3)
    writer.finish(router_output_kind=kind, stats={"tokens_this_run": n_tokens, "seconds_this_run": seconds, **stats})
