"""`quantized(model, targets, fmt)`: the only place moescope changes a model's weights.

Inside the context, each target parameter's storage is swapped for a fake-quantized copy; on exit
(normal or by exception) the original tensors themselves are put back, so every parameter is
bit-identical to before, shares its original storage, and nothing was ever written into it.

>>> with quantized(model, "router", make_format("rtn-sym", 4)) as patch:   # doctest: +SKIP
...     model(input_ids)
...     patch.stats.rel_error
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from moescope.quant.formats import QuantFormat, QuantStats, quantize
from moescope.quant.targets import WeightRef, select_weights


@dataclass
class PatchReport:
    """What a `quantized` context changed: the weights and their error statistics."""

    fmt: QuantFormat
    weights: list[WeightRef] = field(default_factory=list)
    per_weight: list[QuantStats] = field(default_factory=list)

    @property
    def stats(self) -> QuantStats:
        return QuantStats.merge(self.per_weight)

    @property
    def n_params(self) -> int:
        return sum(s.n_params for s in self.per_weight)


@contextmanager
def quantized(model: nn.Module, targets, fmt: QuantFormat, *, layers=None, weights: list[WeightRef] | None = None,
              custom_router=None) -> Iterator[PatchReport]:
    """Fake-quantize the weights `targets` name (see `moescope.quant.targets`) for the duration of the block.

    Parameters
    ----------
    targets : str or sequence of str
        router, experts, shared, attention, all.
    fmt : QuantFormat
        From `make_format`.
    layers : int or set of int, optional
        Only these decoder layers (None: all).
    weights : list of WeightRef, optional
        Already selected weights (skips selection; `targets` and `layers` are then ignored).

    Yields a PatchReport; the originals are restored in `finally`.
    """
    refs = weights if weights is not None else select_weights(model, targets, layers=layers, custom_router=custom_router)
    report = PatchReport(fmt)
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for ref in refs:
                w_hat, stats = quantize(ref.param.data, fmt, transposed=ref.transposed)
                originals.append((ref.param, ref.param.data))
                ref.param.data = w_hat  # swap storage: the original tensor is kept untouched
                report.weights.append(ref)
                report.per_weight.append(stats)
        yield report
    finally:
        for param, original in reversed(originals):
            param.data = original
