"""`run_importance`: which experts matter, measured by dropping them.

    corpus -> fixed batches -> trace with expert output norms (capture, resumable) -> routing statistics
           -> reference pass (once; every decoder layer's output kept)
           -> per (MoE layer, expert): drop it and run only the decoder layers from its own on, the ones before
              replayed from the reference (quant/reference.py's prefix replay) -> ΔNLL overall and per domain
           -> pruning curves: per criterion and n, drop the n least important experts of every swept layer
           -> tables (experts, correlations, pruning, specialisation) and summary.json   (tables.py)

Each configuration is one line in results.jsonl, appended as it finishes (the resume point); the folder is
locked while a sweep writes it (quant/store.py's ResultStore, shared with `moescope quant`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moescope.adapters.discover import find_moe_layers
from moescope.adapters.spec import MoELayer
from moescope.errors import ImportanceError, InterventionError
from moescope.intervention.context import intervene
from moescope.intervention.plan import plan_interventions
from moescope.intervention.statistics import STATISTICS, domain_frequency, expert_statistics, pruning_order, routing_sums
from moescope.intervention.tables import build_tables
from moescope.quant.reference import decoder_layer_list, end_to_end, reference_pass
from moescope.quant.store import ResultStore
from moescope.quant.sweep import make_batches, paired_delta, sweep_fingerprint
from moescope.recording.batches import Batch
from moescope.recording.loading import load_model

CRITERIA = ("delta_nll", *STATISTICS, "random")  # orders the pruning curves follow (least important first)
TRACE = "trace"


@dataclass
class ImportanceResult:
    out: Path
    tables: dict  # name -> pandas DataFrame, as written to `out`
    summary: dict
    ran: int  # configurations evaluated in this call
    skipped: int  # configurations found finished in `out`


class _Evaluator:
    """The model, its reference pass and the per-token domains; `evaluate(drop)` is one configuration."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], batches: list[Batch], *, reuse_prefix: bool,
                 progress: bool):
        self.model, self.layers = model, layers
        self.layer_list = decoder_layer_list(model, [layer.block_path for layer in layers])
        self.replay = reuse_prefix and self.layer_list is not None
        self.ref = reference_pass(model, batches, layers, layer_list=self.layer_list, keep_outputs=self.replay,
                                  progress=progress, local=False)
        domains = [s.domain for batch in batches for s in batch.sequences]
        self.domain_names = tuple(sorted(set(domains)))
        codes = torch.tensor([self.domain_names.index(d) for d in domains])
        self.token_domain = codes[self.ref.nll_seq]  # [n_pred]

    def evaluate(self, drop: dict[int, list[int]]) -> dict:
        started = time.perf_counter()
        start = min(self.layers[i].decoder_layer for i in drop) if self.replay else 0
        with intervene(self.model, drop=drop, layers=self.layers):
            nll, _, _ = end_to_end(self.model, None, self.ref, start=start, layer_list=self.layer_list)
        delta, se = paired_delta(self.ref.nll, nll, self.ref.nll_seq)
        diff = (nll.double() - self.ref.nll.double())
        per_domain = {name: float(diff[self.token_domain == d].mean()) for d, name in enumerate(self.domain_names)}
        return {"nll": float(nll.double().mean()), "delta_nll": delta, "delta_nll_se": se, "replayed_decoder_layers": start,
                "seconds": time.perf_counter() - started, "domains": per_domain}

    def reference_info(self) -> dict:
        nll = float(self.ref.nll.double().mean())
        counts = torch.bincount(self.token_domain, minlength=len(self.domain_names)).tolist()
        return {"nll": nll, "ppl": float(np.exp(nll)), "tokens_predicted": int(self.ref.nll.numel()),
                "sequences": int(self.ref.nll_seq.max()) + 1, "reference_pass_seconds": self.ref.seconds,
                "tokens_per_domain": dict(zip(self.domain_names, counts))}


def swept_layers(model: nn.Module, layers: list[MoELayer], wanted=None) -> tuple[list[int], list[str]]:
    """The MoE layers to sweep (all that can drop experts, or those asked for) and notes on the others."""
    if wanted is not None:
        wanted = sorted({int(w) for w in wanted})
        plan_interventions(model, layers, drop={w: [0] for w in wanted})  # unknown or unusable layer: one error
        return wanted, []
    chosen, notes = [], []
    for layer in layers:
        try:
            plan_interventions(model, layers, drop={layer.index: [0]})
            chosen.append(layer.index)
        except InterventionError as err:
            notes.append(f"MoE layer {layer.index} not swept: {err}")
    if not chosen:
        raise ImportanceError(f"no MoE layer of {type(model).__name__} can drop experts: " + "; ".join(notes))
    return chosen, notes


def run_importance(model, tokenizer, data, *, out, layers=None, max_tokens: int | None = 8192, seq_len: int = 256,
                   batch_size: int = 8, split: str | None = None, prune: bool = True, reuse_prefix: bool = True,
                   device: str = "auto", dtype: str = "float32", overwrite: bool = False, progress: bool = True,
                   model_info: dict | None = None) -> ImportanceResult:
    """ΔNLL of every expert when dropped, routing statistics, their rank correlation, pruning curves and
    specialisation by domain, resumable, into `out`.

    Parameters
    ----------
    model, tokenizer : a loaded MoE causal LM and its tokenizer, or a name (``"moescope:tiny-moe"``, a folder).
    data : a corpus spec or the documents themselves; a mixture (``"humaneval,wiki"``) gives the per-domain answers.
    split : corpus split for every source of a spec. None (default): built-in corpora give their eval split (the
        shipped models were not trained on it), the user's own files, folders, JSONL and hf: whole (as `moescope quant`).
    out : folder for the trace (``out/trace``), results.jsonl, the tables and summary.json. Rerunning resumes at
        the first unfinished configuration; a second sweep into a folder one is writing is refused.
    layers : MoE-layer indices to sweep (default: every layer that can drop experts).
    prune : also draw the pruning curves (one pass over the data per criterion and number pruned).
    reuse_prefix : replay the decoder layers before the intervened one from the reference pass (memory: every
        decoder layer's output on the evaluation set); False runs the whole model for every configuration.

    Examples
    --------
    >>> res = run_importance("moescope:tiny-moe", None, "humaneval,wiki", out="results/imp")  # doctest: +SKIP
    >>> res.tables["experts"].sort_values("delta_nll").tail()                                # doctest: +SKIP
    """
    if isinstance(model, str):
        model_info = {"id": model, **(model_info or {})}
        model, own_tokenizer = load_model(model, device=device, dtype=dtype)
        tokenizer = tokenizer or own_tokenizer
    model.eval()
    all_layers = find_moe_layers(model)
    swept, notes = swept_layers(model, all_layers, layers)
    batches = make_batches(tokenizer, data, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, split=split)
    options = dict(layers=swept, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, split=split, prune=prune)
    info = {"fingerprint": sweep_fingerprint([model], batches, measure=f"importance:{swept}"), "options": options,
            "model_info": model_info or {}, "model": type(model).__name__}
    with ResultStore(out, info, overwrite=overwrite, command="moescope importance", what="importance sweep",
                     error=ImportanceError) as store:
        skipped = len(store.done)
        trace = _trace(model, tokenizer, batches, store.out / TRACE, options, model_info or {}, overwrite, progress)
        sums = routing_sums(trace)
        stats = expert_statistics(sums)
        ev = _Evaluator(model, all_layers, batches, reuse_prefix=reuse_prefix, progress=progress)
        ran = _run(store, ev, [(f"drop:L{l}:E{e}", {l: [e]}, {"kind": "drop", "layer": l, "expert": e})
                               for l in swept for e in range(all_layers[l].n_experts)], progress)
        records = {r["config"]["config_id"]: r for r in store.records}
        if prune:
            ran += _run(store, ev, _pruning_configs(all_layers, swept, stats, records), progress)
            records = {r["config"]["config_id"]: r for r in store.records}
        tables, summary = build_tables(all_layers, swept, stats, records, ev.reference_info(), ev.domain_names,
                                       notes=notes, options=options, trace_path=TRACE, domain_stats=domain_frequency(sums))
        store.write_tables(tables, summary)
    return ImportanceResult(Path(out), tables, summary, ran, skipped)


def _trace(model, tokenizer, batches: list[Batch], folder: Path, options: dict, model_info: dict, overwrite: bool,
           progress: bool):
    """The evaluation tokens' trace with expert output norms: captured once (resumably), then reused."""
    from moescope.recording.options import CaptureSettings
    from moescope.recording.runner import run_capture
    from moescope.trace.reader import Trace

    if not overwrite and (folder / "manifest.json").exists() and Trace(folder).manifest.get("complete"):
        return Trace(folder)
    sequences = [s for batch in batches for s in batch.sequences]
    opts = CaptureSettings(seq_len=options["seq_len"], batch_size=options["batch_size"], save_expert_norms=True,
                          weights_dtype="float32")
    corpus = {"spec": "importance evaluation batches", "split": options["split"], "sequences": len(sequences)}
    return run_capture(model, tokenizer, sequences, folder, opts=opts, model_info=model_info or {"id": type(model).__name__},
                       corpus_info=corpus, overwrite=overwrite, progress=progress)


def _pruning_configs(layers: list[MoELayer], swept: list[int], stats, records: dict) -> list[tuple]:
    """(config id, drop, fields) of every pruning-curve point: per criterion, n = 1 .. E - k per swept layer."""
    import pandas as pd

    single = pd.DataFrame([{"layer": r["config"]["layer"], "expert": r["config"]["expert"], "delta_nll": r["config"]["delta_nll"]}
                           for r in records.values() if r["config"]["kind"] == "drop"])
    scores = stats[stats.layer.isin(swept)].merge(single, on=["layer", "expert"], how="left")
    most = min(layers[l].n_experts - layers[l].top_k for l in swept)
    configs = []
    for criterion in CRITERIA:
        if scores[criterion if criterion != "random" else "layer"].isna().all():
            continue  # e.g. REAP without expert norms
        order = pruning_order(scores, criterion)
        for n in range(1, most + 1):
            drop = {l: order[l][:n] for l in swept}
            configs.append((f"prune:{criterion}:{n}", drop,
                            {"kind": "prune", "criterion": criterion, "n_pruned": n, "drop": {str(l): v for l, v in drop.items()}}))
    return configs


def _run(store: ResultStore, ev: _Evaluator, configs: list[tuple], progress: bool) -> int:
    from tqdm.auto import tqdm

    todo = [c for c in configs if c[0] not in store.done]
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="importance", unit="cfg",
               disable=not progress, dynamic_ncols=True)
    for config_id, drop, fields in todo:
        bar.set_postfix_str(config_id, refresh=False)
        result = ev.evaluate(drop)
        domains = result.pop("domains")
        store.append({"config": {"config_id": config_id, **fields, **result}, "domains": domains})
        bar.update(1)
    bar.close()
    return len(todo)
