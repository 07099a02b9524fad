"""Fake-quantization formats: pure functions `w -> (w_hat, QuantStats)`, nothing touches a model here.

Every format works on a weight seen as matrices `[M, out, in]` (a 2-D Linear weight is M = 1; a fused
3-D expert tensor is one matrix per expert) and quantizes groups of consecutive values along the input
(reduction) dimension:

    granularity   one scale per                    group of values
    tensor        matrix (per expert for 3-D)      all out*in values of the matrix
    channel       output row                       the `in` values of a row
    group:G       G consecutive inputs of a row    G values (the last group of a row may be shorter)

Schemes
-------
rtn-sym   round to nearest, q in [-(2^(b-1)-1), 2^(b-1)-1] * absmax/(2^(b-1)-1): 2^b-1 levels (ternary at 2 bits)
rtn-asym  round to nearest, min-max range, integer zero point: q in [0, 2^b-1], w = (q - z) * s
nf4       the 16 NormalFloat levels of QLoRA, scaled by the group absmax (native group 64)
fp4       MXFP4: e2m1 values with a shared power-of-two (E8M0) scale per group (native group 32)
nvfp4     NVFP4: e2m1 values, an FP8 e4m3 scale per group (native 16) and an fp32 scale per matrix

Values are computed in float32 and the result is cast back to the weight's dtype; the statistics compare
the weight with what the model will actually use (after that cast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moescope.adapters.spec import StrEnum
from moescope.errors import MoescopeError


class QuantConfigError(MoescopeError):
    """A quantization format, target or sweep option is invalid."""


class Scheme(StrEnum):
    RTN_SYM = "rtn-sym"
    RTN_ASYM = "rtn-asym"
    NF4 = "nf4"
    FP4 = "fp4"  # MX-style: power-of-two shared scale per 32
    NVFP4 = "nvfp4"  # NV-style: e4m3 scale per 16, fp32 scale per matrix


# QLoRA's NormalFloat-4 levels (bitsandbytes `create_normal_map`), ascending, exactly 0 and +-1 included.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# e2m1 magnitudes by code 0..7 (code & 1 is the mantissa bit); 6 = 1.5 * 2^2, so emax = 2.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_EMAX = 2
E4M3_MAX = 448.0

_NATIVE_GROUP = {Scheme.NF4: 64, Scheme.FP4: 32, Scheme.NVFP4: 16}
_FIXED_BITS = {Scheme.NF4: 4, Scheme.FP4: 4, Scheme.NVFP4: 4}
_SCALE_BITS = {Scheme.RTN_SYM: 16, Scheme.RTN_ASYM: 16, Scheme.NF4: 32, Scheme.FP4: 8, Scheme.NVFP4: 8}
MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class Granularity:
    """`tensor`, `channel` or `group` (with `group_size`); `parse("group:128")` reads the CLI spelling."""

    kind: str
    group_size: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Granularity":
        text = str(text).strip()
        if text in ("tensor", "channel"):
            return cls(text)
        if text.startswith("group:"):
            size = text.split(":", 1)[1]
            if not size.isdigit() or int(size) < 1:
                raise QuantConfigError(f"group size in {text!r} must be a positive integer, e.g. group:128")
            return cls("group", int(size))
        raise QuantConfigError(f"unknown granularity {text!r}; use tensor, channel or group:N (e.g. group:128)")

    def __str__(self) -> str:
        return f"group:{self.group_size}" if self.kind == "group" else self.kind


@dataclass(frozen=True)
class QuantFormat:
    """One fake-quantization format: scheme, bits and granularity. Build it with `make_format`."""

    scheme: Scheme
    bits: int
    granularity: Granularity

    @property
    def name(self) -> str:
        return f"{self.scheme}/{self.bits}b/{self.granularity}"


def make_format(scheme: str, bits: int, granularity: str = "auto") -> QuantFormat:
    """Validated QuantFormat. `granularity="auto"`: per channel for RTN, the native block size otherwise.

    >>> make_format("rtn-asym", 4, "group:128").name
    'rtn-asym/4b/group:128'
    >>> make_format("nf4", 4).name
    'nf4/4b/group:64'
    """
    try:
        scheme = Scheme(scheme)
    except ValueError:
        raise QuantConfigError(f"unknown scheme {scheme!r}; choose from {', '.join(s.value for s in Scheme)}") from None
    if scheme in _FIXED_BITS and bits != _FIXED_BITS[scheme]:
        raise QuantConfigError(f"scheme {scheme} is a {_FIXED_BITS[scheme]}-bit format, not {bits}-bit")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise QuantConfigError(f"bits must be between {MIN_BITS} and {MAX_BITS}, not {bits}")
    if granularity == "auto":
        gran = Granularity("group", _NATIVE_GROUP[scheme]) if scheme in _NATIVE_GROUP else Granularity("channel")
    else:
        gran = Granularity.parse(granularity)
    return QuantFormat(scheme, int(bits), gran)


def supports_bits(scheme: str, bits: int) -> bool:
    """Whether `scheme` exists at `bits` (NF4/FP4 exist only at 4 bits)."""
    fixed = _FIXED_BITS.get(Scheme(scheme))
    return fixed is None or fixed == bits


@dataclass(frozen=True)
class QuantStats:
    """How far w_hat is from w. `err_sq`/`ref_sq` are kept so stats of many tensors can be merged."""

    n_params: int
    err_sq: float  # sum (w - w_hat)^2
    ref_sq: float  # sum w^2
    max_abs_error: float
    bits_per_weight: float  # storage estimate: value bits + scale (and zero point) bits per weight

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error ||w - w_hat|| / ||w||."""
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq > 0 else 0.0

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio 10 log10(||w||^2 / ||w - w_hat||^2); inf when exact."""
        if self.err_sq == 0:
            return math.inf
        return 10.0 * math.log10(self.ref_sq / self.err_sq) if self.ref_sq > 0 else -math.inf

    @staticmethod
    def merge(stats: list["QuantStats"]) -> "QuantStats":
        """Stats of several tensors quantized together (bits_per_weight is the parameter-weighted mean)."""
        n = sum(s.n_params for s in stats)
        if n == 0:
            return QuantStats(0, 0.0, 0.0, 0.0, 0.0)
        return QuantStats(
            n_params=n,
            err_sq=sum(s.err_sq for s in stats),
            ref_sq=sum(s.ref_sq for s in stats),
            max_abs_error=max(s.max_abs_error for s in stats),
            bits_per_weight=sum(s.bits_per_weight * s.n_params for s in stats) / n,
        )

    def as_dict(self) -> dict:
        return {"n_params": self.n_params, "rel_error": self.rel_error, "max_abs_error": self.max_abs_error,
                "sqnr_db": self.sqnr_db, "bits_per_weight": self.bits_per_weight}


# -- grouping ----------------------------------------------------------------------------------
def _as_matrices(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[out, in] or [E, out, in] (or their transposes) -> float32 [M, out, in]."""
    if w.dim() not in (2, 3):
        raise QuantConfigError(f"can only quantize 2-D or 3-D weights, got shape {tuple(w.shape)}")
    m = w.detach().float()
    m = m.transpose(-1, -2) if transposed else m
    return m.unsqueeze(0) if m.dim() == 2 else m


def _to_groups(m: torch.Tensor, gran: Granularity) -> tuple[torch.Tensor, int]:
    """[M, R, C] -> ([n, groups, G], padded columns). Ragged last groups are padded with the row's last
    value, which changes neither min, max nor absmax of the group."""
    M, R, C = m.shape
    if gran.kind == "tensor":
        return m.reshape(M, 1, R * C), 0
    if gran.kind == "channel":
        return m.reshape(M * R, 1, C), 0
    G = gran.group_size
    pad = (-C) % G
    if pad:
        m = torch.cat([m, m[..., -1:].expand(M, R, pad)], dim=-1)
    return m.reshape(M * R, (C + pad) // G, G), pad


def _from_groups(g: torch.Tensor, shape: torch.Size, pad: int) -> torch.Tensor:
    M, R, C = shape
    return g.reshape(M, R, C + pad)[..., :C]


def _group_len(gran: Granularity, R: int, C: int) -> int:
    return R * C if gran.kind == "tensor" else C if gran.kind == "channel" else min(gran.group_size, C)


# -- the quantizers: [..., G] -> [..., G], statistics over the last dim ---------------------------
def rtn_sym(g: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = g.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group stays zero
    return torch.clamp(torch.round(g / scale), -qmax, qmax) * scale


def rtn_asym(g: torch.Tensor, bits: int) -> torch.Tensor:
    maxq = 2**bits - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(lo), (hi - lo) / maxq)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
    return torch.where(flat, g, (q - zero) * scale)  # a constant group is exactly representable


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ascending `levels` for each x (ties: the lower level)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, mids)


def nf4(g: torch.Tensor) -> torch.Tensor:
    levels = torch.tensor(NF4_LEVELS, dtype=g.dtype, device=g.device)
    absmax = g.abs().amax(-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return levels[_nearest(g / scale, levels)] * scale


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value (saturating at +-6), ties to the even code as in the OCP MX spec."""
    values = torch.tensor(E2M1_VALUES, dtype=x.dtype, device=x.device)
    mag = x.abs().clamp(max=E2M1_VALUES[-1])
    code = _nearest(mag, values)  # ties went to the lower code
    mids = (values[1:] + values[:-1]) / 2
    tie = (code < len(mids)) & (mag == mids[code.clamp(max=len(mids) - 1)]) & (code % 2 == 1)
    return torch.copysign(values[code + tie.long()], x)


def mxfp4(g: torch.Tensor) -> torch.Tensor:
    absmax = g.abs().amax(-1, keepdim=True)
    exp = torch.floor(torch.log2(torch.where(absmax > 0, absmax, torch.ones_like(absmax)))) - E2M1_EMAX
    scale = torch.exp2(exp)  # E8M0: a power of two
    return round_e2m1(g / scale) * scale


def nvfp4(g: torch.Tensor, matrix_absmax: torch.Tensor) -> torch.Tensor:
    """`matrix_absmax` [n, 1, 1]: absmax of the matrix each group belongs to (sets the fp32 global scale)."""
    fmax = E2M1_VALUES[-1]
    global_scale = torch.where(matrix_absmax > 0, matrix_absmax / (fmax * E4M3_MAX), torch.ones_like(matrix_absmax))
    block = (g.abs().amax(-1, keepdim=True) / fmax) / global_scale  # <= 448 by construction
    block = block.to(torch.float8_e4m3fn).to(g.dtype)
    scale = block * global_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, round_e2m1(g / safe) * scale, torch.zeros_like(g))


def _apply(groups: torch.Tensor, fmt: QuantFormat, m: torch.Tensor) -> torch.Tensor:
    if fmt.scheme == Scheme.RTN_SYM:
        return rtn_sym(groups, fmt.bits)
    if fmt.scheme == Scheme.RTN_ASYM:
        return rtn_asym(groups, fmt.bits)
    if fmt.scheme == Scheme.NF4:
        return nf4(groups)
    if fmt.scheme == Scheme.FP4:
        return mxfp4(groups)
    M = m.shape[0]
    per_matrix = m.abs().reshape(M, -1).amax(-1)  # [M]
    rows_per_matrix = groups.shape[0] // M
    return nvfp4(groups, per_matrix.repeat_interleave(rows_per_matrix).reshape(-1, 1, 1))


def quantize(w: torch.Tensor, fmt: QuantFormat, *, transposed: bool = False) -> tuple[torch.Tensor, QuantStats]:
    """Fake-quantize weight `w` ([out, in] or fused [E, out, in]; `transposed`: [.., in, out]).

    Returns w_hat (same shape, dtype and device as w) and its QuantStats.

    >>> w = torch.tensor([[0.0, 0.25, 0.75, -1.0]])
    >>> w_hat, stats = quantize(w, make_format("rtn-sym", 2, "channel"))
    >>> w_hat.tolist(), stats.max_abs_error
    ([[0.0, 0.0, 1.0, -1.0]], 0.25)
    """
    m = _as_matrices(w, transposed)  # shape: [M, R, C], float32
    groups, pad = _to_groups(m, fmt.granularity)
    m_hat = _from_groups(_apply(groups, fmt, m), m.shape, pad)
    w_hat = (m_hat.squeeze(0) if w.dim() == 2 else m_hat)
    w_hat = (w_hat.transpose(-1, -2) if transposed else w_hat).to(w.dtype).contiguous()
    err = (w_hat.double() - w.detach().double())
    _, R, C = m.shape
    overhead = _SCALE_BITS[fmt.scheme] + (fmt.bits if fmt.scheme == Scheme.RTN_ASYM else 0)  # scale (+ zero point)
    stats = QuantStats(
        n_params=w.numel(),
        err_sq=float((err * err).sum()),
        ref_sq=float((w.detach().double() ** 2).sum()),
        max_abs_error=float(err.abs().max()) if w.numel() else 0.0,
        bits_per_weight=fmt.bits + overhead / _group_len(fmt.granularity, R, C),
    )
    return w_hat, stats
