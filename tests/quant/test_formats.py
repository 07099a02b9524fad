"""Fake-quantization formats against hand-computed cases and a NumPy reference at awkward sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moescope.quant.formats import (
    E2M1_VALUES,
    NF4_LEVELS,
    QuantConfigError,
    QuantStats,
    make_format,
    quantize,
    round_e2m1,
)


def _q(w, scheme, bits, gran, **kw):
    return quantize(torch.tensor(w, dtype=torch.float32), make_format(scheme, bits, gran), **kw)


# -- hand-computed -------------------------------------------------------------------------------
def test_rtn_sym_hand_computed():
    # 4 bits: qmax 7, scale 1.4/7 = 0.2; w/s = [7, -2.25, 1.65, 0] -> [7, -2, 2, 0]
    w_hat, stats = _q([[1.4, -0.45, 0.33, 0.0]], "rtn-sym", 4, "channel")
    assert torch.allclose(w_hat, torch.tensor([[1.4, -0.4, 0.4, 0.0]]), atol=1e-6)
    assert stats.max_abs_error == pytest.approx(0.07, abs=1e-6)
    err = math.sqrt(0.05**2 + 0.07**2)
    assert stats.rel_error == pytest.approx(err / math.sqrt(1.4**2 + 0.45**2 + 0.33**2), rel=1e-5)
    assert stats.sqnr_db == pytest.approx(-20 * math.log10(stats.rel_error), rel=1e-9)
    assert stats.n_params == 4 and stats.bits_per_weight == pytest.approx(4 + 16 / 4)


def test_rtn_asym_hand_computed():
    # 2 bits: range [-1, 2], scale 1, zero point 1: q = round(w) + 1 in [0, 3]
    w_hat, _ = _q([[-1.0, 0.0, 0.6, 2.0]], "rtn-asym", 2, "channel")
    assert w_hat.tolist() == [[-1.0, 0.0, 1.0, 2.0]]
    # a constant row is exactly representable
    w_hat, stats = _q([[0.3, 0.3, 0.3]], "rtn-asym", 2, "channel")
    assert w_hat.tolist() == [[pytest.approx(0.3)] * 3] and stats.err_sq == 0


def test_nf4_hand_computed():
    w_hat, _ = _q([[1.0, -0.5, 0.1, 0.0]], "nf4", 4, "channel")
    assert w_hat.tolist()[0] == pytest.approx([1.0, NF4_LEVELS[1 + 1], NF4_LEVELS[8], 0.0])  # -0.525, 0.0796
    w_hat, _ = _q([[2.0, -1.0]], "nf4", 4, "channel")  # scaled by absmax 2: -0.5 -> -0.525 * 2
    assert w_hat.tolist()[0] == pytest.approx([2.0, 2 * NF4_LEVELS[2]])


def test_e2m1_rounding_ties_to_even_code():
    x = torch.tensor([5.0, -0.3, 1.2, 0.0, 0.25, 2.5, 0.75, 7.0, -100.0])
    # 5 ties 4|6 -> 4 (code 6); 0.25 ties 0|0.5 -> 0; 2.5 ties 2|3 -> 2; 0.75 ties 0.5|1 -> 1; saturates at 6
    assert round_e2m1(x).tolist() == [4.0, -0.5, 1.0, 0.0, 0.0, 2.0, 1.0, 6.0, -6.0]


def test_mxfp4_power_of_two_scale():
    # absmax 5 -> scale 2^(floor(log2 5) - 2) = 1; absmax 12 -> scale 2 (12/2 = 6 exactly)
    w_hat, _ = _q([[5.0, -0.3, 1.2, 0.0], [12.0, 3.0, -5.0, 0.9]], "fp4", 4, "group:4")
    assert w_hat.tolist() == [[4.0, -0.5, 1.0, 0.0], [12.0, 3.0, -4.0, 1.0]]


def test_nvfp4_block_and_global_scale():
    # one block with absmax 6: global scale 6/(6*448), block scale 448 (exact in e4m3): values on the e2m1 grid
    w = [[6.0, 1.2, -2.6, 0.2] + [0.0] * 12]
    w_hat, _ = _q(w, "nvfp4", 4, "auto")
    assert w_hat.tolist()[0][:4] == pytest.approx([6.0, 1.0, -3.0, 0.0])
    # a second block with absmax 3: scale (3/6)/(1/448) = 224 is exact in e4m3 -> grid step halves
    w_hat, _ = _q([[6.0] + [0.0] * 15 + [3.0, 0.7, -1.3] + [0.0] * 13], "nvfp4", 4, "auto")
    assert w_hat.tolist()[0][16:19] == pytest.approx([3.0, 0.75, -1.5])


# -- NumPy reference at awkward sizes ------------------------------------------------------------
def _np_groups(m, gran):  # m [R, C] float32 -> list of (row, col-slice)
    R, C = m.shape
    if gran == "tensor":
        return [(slice(None), slice(None))]
    size = C if gran == "channel" else int(gran.split(":")[1])
    return [(r, slice(c, c + size)) for r in range(R) for c in range(0, C, size)]


def _np_nearest(x, levels):
    return levels[np.argmin(np.abs(x[..., None] - levels), axis=-1)]


def _np_reference(m, scheme, bits, gran):
    out = np.empty_like(m)
    for rows, cols in _np_groups(m, gran):
        g = m[rows, cols]
        if scheme == "rtn-sym":
            qmax = 2 ** (bits - 1) - 1
            s = np.float32(np.abs(g).max() / np.float32(qmax))
            out[rows, cols] = np.clip(np.round(g / s), -qmax, qmax) * s
        elif scheme == "rtn-asym":
            lo, hi = g.min(), g.max()
            if hi == lo:  # a constant group is kept exactly
                out[rows, cols] = g
                continue
            s = np.float32((hi - lo) / np.float32(2**bits - 1))
            z = np.round(-lo / s)
            out[rows, cols] = (np.clip(np.round(g / s) + z, 0, 2**bits - 1) - z) * s
        elif scheme == "nf4":
            a = np.abs(g).max()
            out[rows, cols] = _np_nearest(g / a, np.array(NF4_LEVELS, np.float32)) * a
        elif scheme == "fp4":
            s = np.float32(2.0 ** (np.floor(np.log2(np.abs(g).max())) - 2))
            x = np.clip(g / s, -6, 6)
            out[rows, cols] = np.sign(x) * _np_nearest(np.abs(x), np.array(E2M1_VALUES, np.float32)) * s
    return out


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 13), (3, 256)])
@pytest.mark.parametrize("scheme,bits,gran", [
    ("rtn-sym", 3, "channel"), ("rtn-sym", 8, "tensor"), ("rtn-asym", 2, "group:4"), ("rtn-asym", 5, "channel"),
    ("nf4", 4, "group:5"), ("fp4", 4, "group:32"), ("fp4", 4, "channel"),
])
def test_matches_numpy_reference(shape, scheme, bits, gran):
    rng = np.random.default_rng(sum(shape) + bits)
    m = rng.standard_normal(shape).astype(np.float32) + np.float32(0.1)  # no exact ties at this precision
    w_hat, _ = quantize(torch.from_numpy(m), make_format(scheme, bits, gran))
    np.testing.assert_allclose(w_hat.numpy(), _np_reference(m, scheme, bits, gran), rtol=1e-6, atol=1e-7)


# -- properties ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,bits,max_levels", [
    ("rtn-sym", 2, 3), ("rtn-sym", 3, 7), ("rtn-sym", 4, 15), ("rtn-asym", 2, 4), ("rtn-asym", 4, 16),
    ("nf4", 4, 16), ("fp4", 4, 15), ("nvfp4", 4, 15),
])
def test_levels_per_group(scheme, bits, max_levels):
    torch.manual_seed(0)
    w = torch.randn(8, 512)
    w_hat, _ = quantize(w, make_format(scheme, bits, "group:128"))
    counts = [len(torch.unique(w_hat[r, c : c + 128])) for r in range(8) for c in range(0, 512, 128)]
    assert max(counts) <= max_levels
    assert max(counts) >= max_levels - 1  # a Gaussian group of 128 uses (nearly) every level


@pytest.mark.parametrize("scheme,gran", [("rtn-sym", "channel"), ("rtn-sym", "group:16"), ("nf4", "auto"),
                                         ("fp4", "auto"), ("fp4", "tensor")])
def test_idempotent(scheme, gran):
    torch.manual_seed(1)
    fmt = make_format(scheme, 4, gran)
    once, _ = quantize(torch.randn(16, 96), fmt)
    twice, stats = quantize(once, fmt)
    assert torch.allclose(once, twice, rtol=1e-6, atol=1e-7)
    assert stats.rel_error < 1e-6


@pytest.mark.parametrize("scheme", ["rtn-sym", "rtn-asym"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group:32"])
def test_error_decreases_with_bits(scheme, gran):
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    errors = [quantize(w, make_format(scheme, b, gran))[1].rel_error for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02 and errors[0] > 0.3


def test_finer_granularity_is_more_accurate_on_uneven_rows():
    torch.manual_seed(3)
    w = torch.randn(16, 256) * torch.logspace(-2, 1, 16)[:, None]  # rows of very different scale
    errs = [quantize(w, make_format("rtn-sym", 4, g))[1].rel_error for g in ("tensor", "channel", "group:32")]
    assert errs[0] > errs[1] > errs[2]


def test_fused_experts_are_quantized_per_expert():
    torch.manual_seed(4)
    w = torch.randn(4, 6, 10)  # [E, out, in]
    w[2] *= 1000  # a loud expert must not change the others' scale
    for gran in ("tensor", "channel", "group:4"):
        fmt = make_format("rtn-asym", 3, gran)
        fused, _ = quantize(w, fmt)
        for e in range(4):
            assert torch.equal(fused[e], quantize(w[e], fmt)[0])


def test_transposed_layout_uses_output_channels():
    torch.manual_seed(5)
    w = torch.randn(3, 8, 20)  # [E, out, in]
    fmt = make_format("rtn-sym", 4, "group:8")
    expected, _ = quantize(w, fmt)
    got, _ = quantize(w.transpose(1, 2).contiguous(), fmt, transposed=True)  # stored [E, in, out] (gpt-oss)
    assert torch.equal(got, expected.transpose(1, 2))


def test_ragged_last_group():
    torch.manual_seed(6)
    w = torch.randn(5, 10)
    fmt = make_format("rtn-asym", 3, "group:4")  # groups of 4, 4, 2
    got, _ = quantize(w, fmt)
    for c in (slice(0, 4), slice(4, 8), slice(8, 10)):
        assert torch.equal(got[:, c], quantize(w[:, c], make_format("rtn-asym", 3, "channel"))[0])


def test_dtype_preserved_and_stats_measure_the_cast_result():
    torch.manual_seed(7)
    w = torch.randn(8, 64).to(torch.bfloat16)
    w_hat, stats = quantize(w, make_format("rtn-sym", 8, "channel"))
    assert w_hat.dtype == torch.bfloat16 and w_hat.shape == w.shape
    direct = float(((w_hat.double() - w.double()) ** 2).sum())
    assert stats.err_sq == pytest.approx(direct)


def test_zero_weight_and_merge():
    w_hat, stats = _q([[0.0, 0.0]], "rtn-asym", 4, "channel")
    assert w_hat.tolist() == [[0.0, 0.0]] and stats.sqnr_db == math.inf and stats.rel_error == 0
    a = QuantStats(10, 1.0, 100.0, 0.5, 4.0)
    b = QuantStats(30, 3.0, 100.0, 0.2, 8.0)
    m = QuantStats.merge([a, b])
    assert (m.n_params, m.err_sq, m.max_abs_error) == (40, 4.0, 0.5)
    assert m.rel_error == pytest.approx(math.sqrt(4 / 200)) and m.bits_per_weight == pytest.approx(7.0)


def test_invalid_formats():
    with pytest.raises(QuantConfigError, match="4-bit format"):
        make_format("nf4", 3)
    with pytest.raises(QuantConfigError, match="unknown scheme"):
        make_format("int4", 4)
    with pytest.raises(QuantConfigError, match="between 2 and 16"):
        make_format("rtn-sym", 1)
    with pytest.raises(QuantConfigError, match="group size"):
        make_format("rtn-sym", 4, "group:0")
    with pytest.raises(QuantConfigError, match="granularity"):
        make_format("rtn-sym", 4, "row")
    assert make_format("fp4", 4).granularity.group_size == 32
    assert make_format("nvfp4", 4).granularity.group_size == 16
    assert str(make_format("rtn-asym", 4).granularity) == "channel"
