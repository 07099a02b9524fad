"""`run_quant_sweep`: quality and routing sensitivity of an MoE model (and a dense control) to fake quantization.

    corpus -> fixed batches -> reference pass (once) -> for each configuration:
        patch weights (restored on exit) -> local routing (router configs, no forward pass)
                                          -> end-to-end: NLL + routing of every layer (one forward per batch,
                                             unquantized prefix layers replayed from the reference)
        -> one line appended to results.jsonl (resume point)
    -> configs / per_layer tables (Parquet + CSV) and summary.json

A configuration is (model, target, scheme, bits, granularity, layer); layer -1 is the whole model.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from moescope.adapters.discover import CustomRouter
from moescope.corpora import Document, load_corpus
from moescope.errors import CorpusError
from moescope.quant.formats import QuantConfigError, make_format, supports_bits
from moescope.quant.patch import quantized
from moescope.quant.reference import Reference, decoder_layer_list, end_to_end, local_deltas, reference_pass
from moescope.quant.store import ResultStore
from moescope.quant.summary import summarize
from moescope.quant.targets import TARGETS, WeightRef, moe_layers_or_none, select_weights
from moescope.recording.batches import Batch, batched, make_batch, sequences_from_documents
from moescope.recording.loading import default_router, load_model

ROUTING_KEYS = ("flip_top1", "flip_topk_set", "jaccard", "kl", "entropy_delta")
CONFIG_COLUMNS = (
    "config_id", "model", "target", "scheme", "bits", "granularity", "layer", "n_params", "rel_error",
    "max_abs_error", "sqnr_db", "bits_per_weight", "nll", "ppl", "delta_nll", "delta_nll_se", "delta_nll_per_mparam",
    *(f"{k}_local" for k in ROUTING_KEYS), *(f"{k}_e2e" for k in ROUTING_KEYS), "seconds",
)
PER_LAYER_COLUMNS = (
    "config_id", "model", "target", "scheme", "bits", "granularity", "layer", "mode", "moe_layer", "decoder_layer",
    "replayed", "n_tokens", "flip_top1", "flip_topk_set", "jaccard", "kl", "entropy_ref", "entropy_delta",
)


@dataclass(frozen=True)
class SweepConfig:
    model: str  # "moe" or "dense"
    target: str
    scheme: str
    bits: int
    granularity: str  # resolved (never "auto")
    layer: int  # decoder layer quantized alone; -1: all layers

    @property
    def config_id(self) -> str:
        scope = "all" if self.layer < 0 else f"L{self.layer}"
        return f"{self.model}:{self.target}:{self.scheme}:{self.granularity}:{self.bits}b:{scope}"


@dataclass
class SweepResult:
    out: Path
    configs: "object"  # pandas DataFrame
    per_layer: "object"  # pandas DataFrame
    summary: dict
    ran: int  # configurations evaluated in this call
    skipped: int  # configurations found finished in `out`


# -- inputs --------------------------------------------------------------------------------------
BUILTIN_SPLIT = "eval"  # built-in corpora: the side the shipped models never trained on; the user's own data: whole


def _documents(data, split: str | None) -> list[Document]:
    if isinstance(data, str):
        return load_corpus(data, split=split, builtin_split=BUILTIN_SPLIT)
    docs = [d if isinstance(d, Document) else Document(str(i), str(d), "user", "user") for i, d in enumerate(data)]
    if not docs:
        raise CorpusError("no evaluation documents given")
    return docs


def make_batches(tokenizer, data, *, seq_len: int, max_tokens: int | None, batch_size: int,
                 split: str | None = None) -> list[Batch]:
    """The fixed evaluation batches: documents cut into sequences of <= seq_len tokens, right-padded."""
    sequences = [s for s in sequences_from_documents(_documents(data, split), tokenizer, seq_len=seq_len, max_tokens=max_tokens)
                 if len(s.token_ids) >= 2]  # a sequence of one token predicts nothing
    if not sequences:
        raise CorpusError("the evaluation data holds no sequence of two or more tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [make_batch(group, pad) for group in batched(sequences, batch_size)]


def _model_fingerprint(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{float(p.double().sum()):.17g}".encode())
    return h.hexdigest()


def sweep_fingerprint(models: list[nn.Module], batches: list[Batch], measure: str) -> str:
    """Identifies what finished results depend on: the models' weights, the token batches, what is measured."""
    h = hashlib.blake2b(digest_size=8)
    h.update(measure.encode())
    for model in models:
        h.update(_model_fingerprint(model).encode())
    for batch in batches:
        h.update(batch.input_ids.numpy().tobytes())
        h.update(batch.attention_mask.numpy().tobytes())
    return h.hexdigest()


# -- planning ------------------------------------------------------------------------------------
def _as_tuple(value) -> tuple:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(value)


def plan_configs(model: nn.Module, kind: str, *, bits, targets, schemes, granularity, per_layer: bool,
                 moe_layers=None) -> tuple[list[SweepConfig], dict[SweepConfig, list[WeightRef]], list[str]]:
    """The configurations to run on `model` ("moe" or "dense"), their weights, and why others were left out."""
    plan, weights, notes = [], {}, []
    for target in targets:
        refs = select_weights(model, target, moe_layers=moe_layers) if not (kind == "dense" and target in ("router", "shared")) else []
        if not refs:
            notes.append(f"{kind}: target {target!r} names no weights in this model; left out")
            continue
        layer_ids = sorted({r.layer for r in refs if r.layer >= 0})
        scopes = [-1, *layer_ids] if per_layer else [-1]
        for scheme in schemes:
            for gran in granularity:
                for b in bits:
                    if not supports_bits(scheme, b):
                        continue
                    fmt = make_format(scheme, b, gran)
                    for layer in scopes:
                        cfg = SweepConfig(kind, target, scheme, b, str(fmt.granularity), layer)
                        if cfg in weights:
                            continue
                        plan.append(cfg)
                        weights[cfg] = refs if layer < 0 else [r for r in refs if r.layer == layer]
    return plan, weights, notes


# -- one model -----------------------------------------------------------------------------------
class _Evaluator:
    """One model (the MoE or the dense control), its batches and its reference pass."""

    def __init__(self, model: nn.Module, kind: str, batches: list[Batch], *, custom_router, per_layer: bool,
                 end_to_end: bool, reuse_prefix: bool, progress: bool):
        self.model, self.kind = model, kind
        self.layers = moe_layers_or_none(model, custom_router)
        if kind == "moe" and self.layers is None:
            raise QuantConfigError(f"{type(model).__name__} has no MoE layers moescope recognises; pass it as dense_model")
        self.layer_list = decoder_layer_list(model, [r.name for r in select_weights(model, "all", moe_layers=self.layers)])
        self.reuse_prefix = reuse_prefix and per_layer and end_to_end and self.layer_list is not None
        self.end_to_end = end_to_end
        self.ref: Reference = reference_pass(model, batches, self.layers, layer_list=self.layer_list,
                                             keep_outputs=self.reuse_prefix, progress=progress)

    def evaluate(self, cfg: SweepConfig, weights: list[WeightRef]) -> tuple[dict, list[dict]]:
        fmt = make_format(cfg.scheme, cfg.bits, cfg.granularity)
        started = time.perf_counter()
        row = {"config_id": cfg.config_id, **asdict(cfg)}
        with quantized(self.model, None, fmt, weights=weights) as patch:
            stats = patch.stats
            row.update(n_params=stats.n_params, rel_error=stats.rel_error, max_abs_error=stats.max_abs_error,
                       sqnr_db=stats.sqnr_db, bits_per_weight=stats.bits_per_weight)
            changed = {id(ref.param) for ref in patch.weights}
            local = local_deltas(self.model, self.layers, self.ref, changed) if self.layers else {}
            e2e, replayed, nll = {}, set(), None
            if self.end_to_end:
                start = cfg.layer if (self.reuse_prefix and cfg.layer > 0) else 0
                nll, e2e, replayed = end_to_end(self.model, self.layers, self.ref, start=start, layer_list=self.layer_list)
        row.update(_quality(self.ref, nll, stats.n_params))
        per_layer = self._routing_columns(row, local, e2e, replayed)
        row["seconds"] = time.perf_counter() - started
        return row, per_layer

    def _routing_columns(self, row: dict, local: dict, e2e: dict, replayed: set[int]) -> list[dict]:
        """Adds layer-mean routing columns to `row`; returns the per-layer rows."""
        per_layer = []
        for mode, results in (("local", local), ("e2e", e2e)):
            for key in ROUTING_KEYS:
                values = [r[key] for r in results.values()]
                row[f"{key}_{mode}"] = sum(values) / len(values) if values else math.nan
            for i, result in sorted(results.items()):
                per_layer.append({**{k: row[k] for k in PER_LAYER_COLUMNS[:7]}, "mode": mode, "moe_layer": i,
                                  "decoder_layer": self.layers[i].decoder_layer, "replayed": i in replayed,
                                  **{k: result[k] for k in PER_LAYER_COLUMNS[11:]}})
        return per_layer


def paired_delta(ref: torch.Tensor, quant: torch.Tensor, seq: torch.Tensor) -> tuple[float, float]:
    """Mean of quant - ref per token, and its standard error with sequences as clusters (tokens of one
    sequence are not independent)."""
    d = (quant.double() - ref.double())
    n = d.numel()
    mean = d.mean()
    _, cluster = torch.unique(seq, return_inverse=True)
    g = int(cluster.max()) + 1
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, cluster, d)
    counts = torch.zeros(g, dtype=torch.float64).index_add_(0, cluster, torch.ones_like(d))
    resid = sums - counts * mean
    se = math.sqrt(g / (g - 1) * float((resid**2).sum())) / n if g > 1 else math.nan
    return float(mean), se


def _quality(ref: Reference, nll: torch.Tensor | None, n_params: int) -> dict:
    if nll is None:
        return dict(nll=math.nan, ppl=math.nan, delta_nll=math.nan, delta_nll_se=math.nan, delta_nll_per_mparam=math.nan)
    mean = float(nll.double().mean())
    delta, se = paired_delta(ref.nll, nll, ref.nll_seq)
    return dict(nll=mean, ppl=math.exp(mean), delta_nll=delta, delta_nll_se=se,
                delta_nll_per_mparam=delta / (n_params / 1e6) if n_params else math.nan)


def _reference_info(ev: _Evaluator) -> dict:
    nll = float(ev.ref.nll.double().mean())
    return {"nll": nll, "ppl": math.exp(nll), "tokens_predicted": int(ev.ref.nll.numel()),
            "sequences": int(ev.ref.nll_seq.max()) + 1, "reference_pass_seconds": ev.ref.seconds,
            "n_params": sum(p.numel() for p in ev.model.parameters()),
            "moe_layers": len(ev.layers or []),
            "local_reference_agreement": ev.ref.local_agreement}


# -- the sweep -----------------------------------------------------------------------------------
def run_quant_sweep(
    model,
    tokenizer,
    data,
    *,
    out: str | Path,
    bits: Sequence[int] | str = (2, 3, 4, 8),
    targets: Sequence[str] | str = TARGETS,
    schemes: Sequence[str] | str = ("rtn-asym",),
    granularity: Sequence[str] | str = "auto",
    per_layer: bool = False,
    dense_model=None,
    max_tokens: int | None = 16384,
    seq_len: int = 256,
    batch_size: int = 8,
    end_to_end: bool = True,
    reuse_prefix: bool = True,
    custom_router: CustomRouter | None = None,
    split: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    model_info: dict | None = None,
) -> SweepResult:
    """Quantization sensitivity sweep of `model` (and optionally a dense control), resumable, into `out`.

    Parameters
    ----------
    model, tokenizer
        A loaded MoE causal LM and its tokenizer, or a name for `moescope.recording.loading.load_model`
        (``"moescope:tiny-moe"``, a folder, a hub id; tokenizer None: the model's own).
    data : str or iterable of Document or str
        A corpus spec (``"wiki"``, a file; see `split`) or the documents themselves.
    out : path
        Folder for results.jsonl, configs/per_layer (.parquet, .csv), summary.json. An existing sweep of
        the same model, data and batching resumes at the first unfinished configuration; a second sweep
        into a folder that one is writing is refused (QuantConfigError).
    bits : ints or "2,3,4,8"
        Bit widths; nf4/fp4/nvfp4 run at 4 only.
    targets : names or "router,experts"
        From router, experts, shared, attention, all (see `moescope.quant.targets`).
    schemes : names
        From rtn-asym, rtn-sym, nf4, fp4 (MX), nvfp4.
    granularity : "auto", "tensor", "channel", "group:N", or several
        "auto": per channel for RTN, the native block for nf4 (64), fp4 (32), nvfp4 (16).
    per_layer : bool
        Also quantize each decoder layer's share of every target alone.
    dense_model : model or name, optional
        Dense control sharing the tokenizer: the same sweep for experts (its MLPs), attention and all.
    max_tokens, seq_len, batch_size
        Evaluation budget and batching.
    end_to_end : bool
        Run the quantized model (quality and end-to-end routing). False: router-containing targets only,
        local routing only, no forward pass per configuration.
    reuse_prefix : bool
        For single-layer configurations, replay the unquantized layers before it from the reference
        (costs memory for every decoder layer's output on the evaluation set).
    custom_router : CustomRouter, optional
        For MoE models discovery does not recognise (a shipped custom model's is found from its name).
    split : str, optional
        Corpus split when `data` is a spec, for every source. None (default): built-in corpora give their eval
        split (the shipped models were not trained on it), the user's own files, folders, JSONL and hf: whole.
    device, dtype
        Used only when a model is given by name.
    overwrite : bool
        Discard results already in `out` instead of resuming.
    progress : bool
        tqdm bars for the reference pass and over configurations.

    Returns
    -------
    SweepResult
        The configs and per_layer DataFrames and the summary dict, as written to `out`.

    Examples
    --------
    >>> res = run_quant_sweep("moescope:tiny-moe", None, "wiki", out="results/quant",  # doctest: +SKIP
    ...                       bits="2,3,4,8", targets="router,experts", dense_model="moescope:tiny-dense")
    >>> res.summary["router_vs_experts"][0]["statement"]  # doctest: +SKIP
    """
    if isinstance(model, str):
        model_info = {"name": model, **(model_info or {})}
        custom_router = custom_router or default_router(model)
        model, own_tokenizer = load_model(model, device=device, dtype=dtype)
        tokenizer = tokenizer or own_tokenizer
    if isinstance(dense_model, str):
        model_info = {**(model_info or {}), "dense_name": dense_model}
        dense_model, _ = load_model(dense_model, device=device, dtype=dtype)
    try:
        bits = tuple(int(b) for b in _as_tuple(bits))
    except ValueError:
        raise QuantConfigError(f"bits must be whole numbers like 2,3,4,8, not {bits!r}") from None
    targets, schemes, granularity = _as_tuple(targets), _as_tuple(schemes), _as_tuple(granularity)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise QuantConfigError(f"unknown target(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TARGETS)}")
    for scheme in schemes:
        make_format(scheme, 4, "auto")  # validates the name before any work
    if not any(supports_bits(scheme, b) for scheme in schemes for b in bits):
        raise QuantConfigError(f"no scheme of {', '.join(schemes)} runs at {', '.join(map(str, bits))} bits "
                               "(nf4, fp4 and nvfp4 are 4-bit formats); nothing to sweep")
    for gran in granularity:
        if gran != "auto":
            make_format("rtn-sym", 4, gran)
    if not end_to_end and (set(targets) - {"router", "all"} or dense_model is not None):
        raise QuantConfigError("without end-to-end evaluation only router and all targets can be measured (local "
                               "routing); experts, shared, attention and the dense control need end_to_end=True")
    batches = make_batches(tokenizer, data, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, split=split)
    models = [(model, "moe")] + ([(dense_model, "dense")] if dense_model is not None else [])
    options = dict(bits=bits, targets=targets, schemes=schemes, granularity=granularity, per_layer=per_layer,
                   max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, end_to_end=end_to_end)
    fingerprint = sweep_fingerprint([m for m, _ in models], batches, measure="e2e" if end_to_end else "local")
    info = {"fingerprint": fingerprint, "options": options,
            "model_info": model_info or {}, "models": {kind: type(m).__name__ for m, kind in models}}
    with ResultStore(out, info, overwrite=overwrite) as store:  # holds the folder's lock until done
        return _run_plans(store, models, batches, bits=bits, targets=targets, schemes=schemes, granularity=granularity,
                          per_layer=per_layer, end_to_end=end_to_end, reuse_prefix=reuse_prefix,
                          custom_router=custom_router, progress=progress)


def _run_plans(store: ResultStore, models, batches: list[Batch], *, bits, targets, schemes, granularity, per_layer: bool,
               end_to_end: bool, reuse_prefix: bool, custom_router, progress: bool) -> SweepResult:
    """Reference passes, then every planned configuration not yet in `store`, then the tables."""
    from tqdm.auto import tqdm

    skipped_before = len(store.done)
    evaluators, plans, notes = {}, [], []
    for m, kind in models:
        m.eval()
        ev = _Evaluator(m, kind, batches, custom_router=custom_router if kind == "moe" else None, per_layer=per_layer,
                        end_to_end=end_to_end, reuse_prefix=reuse_prefix, progress=progress)
        plan, weights, why = plan_configs(m, kind, bits=bits, targets=targets, schemes=schemes,
                                          granularity=granularity, per_layer=per_layer, moe_layers=ev.layers)
        evaluators[kind] = ev
        plans.extend((cfg, weights[cfg]) for cfg in plan)
        notes.extend(why)

    todo = [(cfg, w) for cfg, w in plans if cfg.config_id not in store.done]
    ran = 0
    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), desc="quant configs", unit="cfg", disable=not progress,
               dynamic_ncols=True)
    for cfg, weights in todo:
        bar.set_postfix_str(cfg.config_id, refresh=False)
        row, layer_rows = evaluators[cfg.model].evaluate(cfg, weights)
        store.append({"config": row, "per_layer": layer_rows})
        ran += 1
        bar.update(1)
    bar.close()
    return _finish(store, [cfg.config_id for cfg, _ in plans], evaluators, notes, ran, skipped_before)


def _finish(store: ResultStore, planned: list[str], evaluators: dict, notes: list[str], ran: int, skipped: int) -> SweepResult:
    import pandas as pd

    wanted = set(planned)
    records = {r["config"]["config_id"]: r for r in store.records if r["config"]["config_id"] in wanted}
    ordered = [records[c] for c in planned if c in records]
    configs = pd.DataFrame([r["config"] for r in ordered], columns=list(CONFIG_COLUMNS))
    per_layer = pd.DataFrame([row for r in ordered for row in r["per_layer"]], columns=list(PER_LAYER_COLUMNS))
    reference = {kind: _reference_info(ev) for kind, ev in evaluators.items()}
    summary = summarize(configs, reference=reference, notes=notes)
    store.write_tables({"configs": configs, "per_layer": per_layer}, summary)
    return SweepResult(store.out, configs, per_layer, summary, ran, skipped)
