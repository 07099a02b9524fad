"""Capture on a Ray cluster: one worker per GPU (or CPU slot), each writing its own shards into one trace.

    driver: sequences -> units of about one shard (whole sequences, in order) -> workers -> commit each
    worker (actor, model loaded once): unit -> forward passes -> part files `part-<index>.parquet`
                                       (on an object store `part-<index>-<driver's tag>.parquet`, PUT by the worker)

The driver alone holds the trace folder's lock and writes the manifest; a unit's parts become part of the
trace only when the driver lists them (TraceWriter.commit_shard), kept in sequence order, so the trace reads
back as the in-process capture of the same corpus. A worker that dies mid-unit is restarted by Ray and the
unit retried under the same shard index: its part files are overwritten, never duplicated. Rerunning the
command resumes: committed sequences are skipped and unlisted part files deleted, as in-process.
A local trace folder must be reachable from every worker at the same path (one machine, or a shared
filesystem); an object-store trace (s3://...) needs nothing shared: workers PUT their parts straight to the
store, with the storage options the driver was given (the folder travels as a storage.Location), and only the
driver writes the manifest, under its lease (trace/lease.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.recording.batches import chunks
from moescope.trace.block import Sequence
from moescope.recording.options import CaptureSettings
from moescope.recording.runner import encode_shard, finish_capture, record_batches
from moescope.trace.reader import Trace
from moescope.trace.writer import TraceWriter, write_parts

IN_FLIGHT_PER_WORKER = 2  # one unit running, one queued: a worker never waits for the driver


class CaptureWorker:
    """A Ray actor's state: the model, loaded once; `capture_unit` records one unit into part files."""

    def __init__(self, model: str, load_kwargs: dict, router, threads: int):
        import torch

        from moescope.adapters.discover import find_moe_layers
        from moescope.recording.loading import default_router, load_model

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(model, **load_kwargs)
        self.layers = find_moe_layers(self.model, router or default_router(model))

    def manifest(self, opts: CaptureSettings, model_info: dict, corpus_info: dict) -> dict:
        from moescope.recording.manifest_info import build_manifest

        return build_manifest(self.model, self.layers, opts=asdict(opts), model_info=model_info, corpus_info=corpus_info)

    def capture_unit(self, folder, index: int, sequences: list[Sequence], opts: CaptureSettings,
                     die_once: tuple[str, str] | None = None, tag: str | None = None) -> dict:
        blocks = []
        for _, block, _ in record_batches(self.model, self.tokenizer, self.layers, sequences, opts):
            blocks.append(block)
            _maybe_die(die_once, "forward")
        tables, kinds = encode_shard(blocks, sequences)
        ids = [s.seq_id for s in sequences]
        files = write_parts(folder if tag else Path(folder), tables, index, tag=tag)  # tag: an object store
        _maybe_die(die_once, "written")
        return {"index": index, "files": files, "seq_id_min": min(ids), "seq_id_max": max(ids), "kinds": kinds,
                "tokens": tables["tokens"].num_rows}


def _maybe_die(die_once: tuple[str, str] | None, point: str) -> None:
    """Fault injection for tests: die_once = (marker path, point) ends this worker process abruptly at `point`
    ("forward": after the unit's first batch; "written": after its parts are on disk, before the driver hears of
    them), once: the marker file records that it happened, so the retry runs through."""
    if die_once and die_once[1] == point and not os.path.exists(die_once[0]):
        Path(die_once[0]).touch()
        os._exit(1)


def _workers(ray, device: str, workers: int | None) -> tuple[int, dict]:
    """(number of workers, Ray resources of each): one per GPU when the model goes on GPUs, else one per CPU."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    on_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    slots, what = (gpus, "GPU") if on_gpu else (cpus, "CPU")
    if not slots:
        raise MoescopeError(f"--ray: the Ray cluster has no {what} for a capture worker")
    if workers and workers > slots:  # an actor that cannot be placed would wait forever, and its units with it
        raise MoescopeError(f"--workers {workers}, but the Ray cluster has {slots} {what} slot(s): one worker each")
    return workers or slots, {"num_gpus": 1} if on_gpu else {"num_cpus": 1}


def run_ray_capture(model: str, sequences: Iterable[Sequence], out: str | os.PathLike, *, opts: CaptureSettings,
                    model_info: dict, corpus_info: dict, load_kwargs: dict, router=None, address: str | None = None,
                    workers: int | None = None, overwrite: bool = False, progress: bool = True,
                    total_tokens: int | None = None, _die_once: dict[int, tuple[str, str]] | None = None) -> Trace:
    """Capture `sequences` through `model` on the Ray cluster at `address` into the trace folder `out`.

    `_die_once` = {unit number of this run: (marker path, point)} makes that unit's first attempt kill its
    worker (tests of the retry path; see `_maybe_die`).
    """
    from tqdm.auto import tqdm

    from moescope.distributed.cluster import connect

    ray = connect(address)
    n_workers, resources = _workers(ray, load_kwargs.get("device", "auto"), workers)
    actor = ray.remote(max_restarts=3, max_task_retries=3, **resources)(CaptureWorker)
    pool = [actor.remote(model, load_kwargs, router, 1) for _ in range(n_workers)]
    try:
        manifest = _get(ray, pool[0].manifest.remote(opts, model_info, corpus_info))
        with TraceWriter(out, manifest, overwrite=overwrite) as writer:
            if writer.already_complete:  # the same capture, finished before: nothing to do
                return Trace(out)
            done = writer.committed_seq_ids
            units = chunks((s for s in sequences if s.seq_id not in done), opts.shard_tokens)  # split at committed ones
            bar = tqdm(total=total_tokens, unit="tok", disable=not progress, desc=f"capture (Ray, {n_workers} workers)")
            started, stats = time.perf_counter(), {"tokens": 0, "kinds": []}

            def commit(shard: dict) -> None:
                writer.commit_shard(shard["index"], shard["files"], seq_id_min=shard["seq_id_min"], seq_id_max=shard["seq_id_max"])
                stats["tokens"] += shard["tokens"]
                stats["kinds"] += shard["kinds"]
                bar.update(shard["tokens"])

            pending, idle, first = {}, pool * IN_FLIGHT_PER_WORKER, writer.next_index()
            for number, unit in enumerate(units):
                if not idle:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    commit(_get(ray, ready[0]))
                    idle.append(pending.pop(ready[0]))
                worker = idle.pop()
                die = (_die_once or {}).get(number)
                folder = writer.folder if writer.remote else str(writer.folder)  # a Location keeps its storage options
                pending[worker.capture_unit.remote(folder, first + number, unit, opts, die, writer.part_tag)] = worker
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                commit(_get(ray, ready[0]))
                pending.pop(ready[0])
            bar.close()
            finish_capture(writer, stats["kinds"], stats["tokens"], started, ray_workers=n_workers)
    finally:
        for worker in pool:
            ray.kill(worker)
    return Trace(out)


def _get(ray, ref):
    """ray.get, with a worker's failure (after Ray's retries) as one clear line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, MoescopeError):
            raise cause from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoescopeError(f"a Ray capture worker failed (after retries): {first}") from None
