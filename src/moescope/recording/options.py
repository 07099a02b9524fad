"""CaptureOptions: how routing is recorded — one frozen type for `moescope.capture`, `moescope.record`, the
`moescope capture` command and the Ray and vLLM backends, validated once, when it is made.

    options = moescope.CaptureOptions(max_tokens=20_000, save_logits=True)
    moescope.capture("moescope:tiny-moe", "humaneval", out="traces/run1", options=options)
    with moescope.record(model, options=moescope.CaptureOptions(save_logits=True)) as rec: ...

`CaptureSettings` is what a capture loop runs with and the manifest records: the recording fields of the
options plus what capture resolved from the model and the input (padding side, the tokens that start a
sequence). Its field names are the manifest's `capture` keys (a contract of the trace format).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moescope.adapters.discover import CustomRouter
from moescope.errors import MoescopeError

FLOAT_DTYPES = ("float16", "float32")
SPLITS = ("all", "train", "eval")
BACKENDS = ("hf", "vllm")
# options that shape the batches or the model moescope runs itself: `moescope.record` observes the user's own calls
CAPTURE_ONLY = ("seq_len", "batch_size", "max_tokens", "split", "generate", "predict_next_layer", "save_expert_norms",
                "output_entropy", "device", "dtype", "device_map", "trust_remote_code", "backend", "tensor_parallel_size",
                "ray", "workers")
# the options only a transformers model in this process can honour
HF_ONLY = ("output_entropy", "predict_next_layer", "save_expert_norms", "router", "device_map")


class CaptureOptionsError(MoescopeError):
    """A capture option has a value moescope cannot use."""


@dataclass(frozen=True)
class CaptureOptions:
    """How routing is recorded. Every field has the name of its `moescope capture` flag (`--save-logits` ->
    `save_logits`); a bad value raises `CaptureOptionsError` (one line) when the options are made.

    Parameters
    ----------
    seq_len : tokens per sequence; longer documents are cut into several sequences.
    batch_size : sequences per forward pass.
    max_tokens : stop after this many tokens (default: the whole corpus).
    split : ``"all"``, ``"train"`` or ``"eval"``: which part of the corpus (built-in corpora split by document).
    generate : also generate this many tokens per sequence and record their routing (marked `generated`).
    save_logits : also store each token's full router output (logits or probabilities, as the router returns).
    logits_dtype : precision of the stored router outputs: ``"float16"`` (compact) or ``"float32"`` (exact).
    weights_dtype : precision of the stored gate weights.
    predict_next_layer : also record what layer N+1's router picks from layer N's input (prefetch predictor).
    save_expert_norms : also store the L2 norm of each chosen expert's own output (REAP; one extra expert pass per slot).
    output_entropy : also store the entropy of the next-token distribution (runs the LM head on every position).
    shard_tokens : tokens per committed shard: bounds memory and the work an interruption loses.
    router : a ``CustomRouter`` for a model moescope does not recognise.
    device, dtype, device_map, trust_remote_code : how a model given by name is loaded.
    backend : ``"hf"`` (hooks on a transformers model) or ``"vllm"`` (inside a vLLM engine); same trace either way.
    tensor_parallel_size : GPUs the vLLM engine shards the model over (``backend="vllm"``).
    ray : capture on a Ray cluster: its address, ``"auto"``, or ``"local"`` (start one here).
    workers : Ray capture workers (default: one per GPU, else per CPU).

    Examples
    --------
    >>> CaptureOptions(max_tokens=2048, save_logits=True).save_logits
    True
    >>> CaptureOptions(seq_len=0)
    Traceback (most recent call last):
    ...
    moescope.recording.options.CaptureOptionsError: seq_len must be a positive whole number, not 0
    """

    seq_len: int = 256
    batch_size: int = 8
    max_tokens: int | None = None
    split: str = "all"
    generate: int = 0
    save_logits: bool = False
    logits_dtype: str = "float16"
    weights_dtype: str = "float16"
    predict_next_layer: bool = False
    save_expert_norms: bool = False
    output_entropy: bool = False
    shard_tokens: int = 65536
    router: CustomRouter | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    backend: str = "hf"
    tensor_parallel_size: int = 1
    ray: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise CaptureOptionsError(problem)

    def _problem(self) -> str | None:
        for name in ("seq_len", "batch_size", "shard_tokens", "tensor_parallel_size", "max_tokens", "workers"):
            value = getattr(self, name)
            if (value is not None or name not in ("max_tokens", "workers")) and not _positive_int(value):
                return f"{name} must be a positive whole number, not {value!r}"
        if not _whole(self.generate) or self.generate < 0:
            return f"generate must be a whole number of tokens, 0 or more, not {self.generate!r}"
        for name, value, choices in (("logits_dtype", self.logits_dtype, FLOAT_DTYPES),
                                     ("weights_dtype", self.weights_dtype, FLOAT_DTYPES),
                                     ("split", self.split, SPLITS), ("backend", self.backend, BACKENDS)):
            if value not in choices:
                return f"{name} must be one of {', '.join(choices)}, not {value!r}"
        if self.router is not None and not isinstance(self.router, CustomRouter):
            return f"router must be a moescope.CustomRouter, not {type(self.router).__name__}"
        if self.generate and (self.predict_next_layer or self.save_expert_norms):
            return ("predict_next_layer and save_expert_norms are recorded for prompt tokens only; drop them or "
                    "generate separately")
        if self.backend == "hf" and self.tensor_parallel_size != 1:
            return "tensor parallelism is a vLLM option: add backend='vllm' (--backend vllm), or use device_map='auto'"
        if self.backend == "vllm":
            unsupported = [name for name in HF_ONLY if getattr(self, name)]
            if unsupported:
                return f"{', '.join(unsupported)} is not available with the vLLM backend; use the default hf backend"
            if self.ray is not None:
                return "ray captures with the hf backend; vLLM runs on several GPUs itself (tensor_parallel_size)"
        if self.workers is not None and self.ray is None:
            return "workers is the number of Ray capture workers: give it with ray (--ray)"
        return None

    @property
    def load_kwargs(self) -> dict:
        """How a model given by name is loaded (`recording/loading.load_model`)."""
        return dict(device=self.device, dtype=self.dtype, device_map=self.device_map, trust_remote_code=self.trust_remote_code)

    def changed(self, names: tuple[str, ...]) -> list[str]:
        """Those of `names` whose value is not the default."""
        defaults = {f.name: f.default for f in fields(self)}
        return [name for name in names if getattr(self, name) != defaults[name]]

    def settings(self, *, padding_side: str = "right", start_token_ids: tuple[int, ...] | None = None) -> "CaptureSettings":
        """What the capture loop runs with, once capture has resolved how batches are padded and sequences start."""
        return CaptureSettings(seq_len=self.seq_len, batch_size=self.batch_size, max_tokens=self.max_tokens,
                               save_router_output=self.save_logits, predict_next_layer=self.predict_next_layer,
                               save_expert_norms=self.save_expert_norms, output_entropy=self.output_entropy,
                               generate=self.generate, weights_dtype=self.weights_dtype, logits_dtype=self.logits_dtype,
                               padding_side=padding_side, shard_tokens=self.shard_tokens, backend=self.backend,
                               start_token_ids=start_token_ids)


@dataclass(frozen=True)
class CaptureSettings:
    """What a capture loop runs with; the manifest's `capture` entry records these names (the trace format)."""

    seq_len: int = 256
    batch_size: int = 8
    max_tokens: int | None = None
    save_router_output: bool = False  # the options' save_logits
    predict_next_layer: bool = False  # also record layer l+1's router applied to layer l's input (prefetch predictor)
    save_expert_norms: bool = False  # also record ||output|| of each chosen expert alone (REAP scores; k extra expert passes)
    output_entropy: bool = False
    generate: int = 0  # new tokens per sequence; their routing is recorded and marked generated
    weights_dtype: str = "float16"
    logits_dtype: str = "float16"  # precision of stored router outputs (--save-logits); float32 keeps them exactly
    padding_side: str = "right"  # how a forward batch is padded; "left" when the caller's input_ids were (generate: always left)
    shard_tokens: int = 65536  # tokens buffered before a shard is committed (bounds memory)
    backend: str = "hf"  # "hf": hooks on a transformers model; "vllm": inside a vLLM engine (recording/vllm_backend.py)
    start_token_ids: tuple[int, ...] | None = None  # what begins every sequence (BOS or nothing); None: input_ids as given


# the keyword arguments `moescope.capture` / `moescope.record` took before CaptureOptions, by option name
RENAMED = {"save_router_output": "save_logits"}


def options_from_keywords(options: CaptureOptions | None, keywords: dict, *, where: str) -> CaptureOptions:
    """`options` with the old keyword arguments of `where` applied (each with a DeprecationWarning naming the new way).

    Unknown names are a TypeError, as for any function call.
    """
    import warnings

    options = options if options is not None else CaptureOptions()
    if not isinstance(options, CaptureOptions):
        raise CaptureOptionsError(f"options must be a moescope.CaptureOptions, not {type(options).__name__}")
    if not keywords:
        return options
    known = {f.name for f in fields(CaptureOptions)}
    values = {}
    for key, value in keywords.items():
        name = RENAMED.get(key, key)
        if name not in known:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
        values[name] = value
    shown = ", ".join(f"{name}={value!r}" for name, value in values.items())
    warnings.warn(f"{where}(..., {', '.join(k + '=...' for k in keywords)}) is deprecated and will be removed in the next release; "
                  f"pass options=moescope.CaptureOptions({shown})", DeprecationWarning, stacklevel=3)
    fields_now = {f.name: getattr(options, f.name) for f in fields(CaptureOptions)}
    return CaptureOptions(**{**fields_now, **values})


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _whole(value) and value > 0
