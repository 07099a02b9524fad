"""summary.json: the sweep's answers, computed from the configs table alone (pure, no I/O).

The hypothesis: router-only quantization costs more quality (ΔNLL) per quantized parameter than
expert-only quantization. Per (scheme, granularity, bits), on whole-model configurations:

    per_param = ΔNLL / (quantized parameters / 1e6)
    verdict   "yes" when even the router's lower 2-SE bound per parameter exceeds the experts' upper
              bound, "no" for the reverse, "inconclusive" when the intervals overlap

The dense control lines up the MoE's and the dense model's ΔNLL and weight error for the targets both have.
"""

from __future__ import annotations

import math

HYPOTHESIS = ("router-only quantization costs more quality (ΔNLL, nats/token) per quantized parameter than "
              "expert-only quantization")


def _f(value) -> float:
    return float(value) if value is not None else math.nan


def _side(row) -> dict:
    n = int(row["n_params"])
    delta, se = _f(row["delta_nll"]), _f(row["delta_nll_se"])
    return {
        "delta_nll": delta, "delta_nll_se": se, "n_params": n, "delta_nll_per_mparam": delta / (n / 1e6),
        "rel_error": _f(row["rel_error"]), "flip_top1_local": _f(row["flip_top1_local"]),
        "flip_topk_set_local": _f(row["flip_topk_set_local"]), "flip_top1_e2e": _f(row["flip_top1_e2e"]),
        "flip_topk_set_e2e": _f(row["flip_topk_set_e2e"]), "kl_e2e": _f(row["kl_e2e"]),
    }


def _verdict(router: dict, experts: dict) -> str:
    lo_r = (router["delta_nll"] - 2 * router["delta_nll_se"]) / router["n_params"]
    hi_r = (router["delta_nll"] + 2 * router["delta_nll_se"]) / router["n_params"]
    lo_e = (experts["delta_nll"] - 2 * experts["delta_nll_se"]) / experts["n_params"]
    hi_e = (experts["delta_nll"] + 2 * experts["delta_nll_se"]) / experts["n_params"]
    if any(math.isnan(v) for v in (lo_r, hi_r, lo_e, hi_e)):
        return "inconclusive"
    return "yes" if lo_r > hi_e else "no" if hi_r < lo_e else "inconclusive"


def _statement(key: tuple, router: dict, experts: dict, verdict: str) -> str:
    scheme, gran, bits = key
    ratio = router["delta_nll_per_mparam"] / experts["delta_nll_per_mparam"] if experts["delta_nll_per_mparam"] else math.nan
    return (f"{bits}-bit {scheme} ({gran}): router-only ΔNLL {router['delta_nll']:+.5f} ± {router['delta_nll_se']:.5f} "
            f"over {router['n_params']:,} parameters = {router['delta_nll_per_mparam']:+.4g} per M; expert-only ΔNLL "
            f"{experts['delta_nll']:+.5f} ± {experts['delta_nll_se']:.5f} over {experts['n_params']:,} = "
            f"{experts['delta_nll_per_mparam']:+.4g} per M (ratio {ratio:.3g}); router costs more per parameter: {verdict}")


def summarize(configs, *, reference: dict, notes: list[str] = ()) -> dict:
    """The summary dict of a configs DataFrame (columns as in `sweep.CONFIG_COLUMNS`)."""
    whole = configs[configs["layer"] < 0]
    by_key = {}
    for _, row in whole.iterrows():
        by_key[(row["model"], row["target"], row["scheme"], row["granularity"], int(row["bits"]))] = row
    keys = sorted({k[2:] for k in by_key}, key=lambda k: (k[0], k[1], k[2]))

    answers = []
    for key in keys:
        r, e = by_key.get(("moe", "router", *key)), by_key.get(("moe", "experts", *key))
        if r is None or e is None or math.isnan(_f(r["delta_nll"])) or math.isnan(_f(e["delta_nll"])):
            continue
        router, experts = _side(r), _side(e)
        verdict = _verdict(router, experts)
        answers.append({"scheme": key[0], "granularity": key[1], "bits": key[2], "router": router, "experts": experts,
                        "ratio_per_param": router["delta_nll_per_mparam"] / experts["delta_nll_per_mparam"]
                        if experts["delta_nll_per_mparam"] else math.nan,
                        "router_costs_more_per_param": verdict, "statement": _statement(key, router, experts, verdict)})

    dense = []
    for key in keys:
        for target in ("experts", "attention", "all"):
            m, d = by_key.get(("moe", target, *key)), by_key.get(("dense", target, *key))
            if m is None or d is None:
                continue
            dense.append({"scheme": key[0], "granularity": key[1], "bits": key[2], "target": target,
                          "moe": {"delta_nll": _f(m["delta_nll"]), "delta_nll_se": _f(m["delta_nll_se"]),
                                  "rel_error": _f(m["rel_error"]), "n_params": int(m["n_params"])},
                          "dense": {"delta_nll": _f(d["delta_nll"]), "delta_nll_se": _f(d["delta_nll_se"]),
                                    "rel_error": _f(d["rel_error"]), "n_params": int(d["n_params"])}})

    local = []
    for key in keys:
        r = by_key.get(("moe", "router", *key))
        if r is not None:
            local.append({"scheme": key[0], "granularity": key[1], "bits": key[2],
                          "flip_top1_local": _f(r["flip_top1_local"]), "flip_topk_set_local": _f(r["flip_topk_set_local"]),
                          "jaccard_local": _f(r["jaccard_local"]), "kl_local": _f(r["kl_local"])})
    downstream = []
    for key in keys:
        for target in ("experts", "shared", "attention"):
            row = by_key.get(("moe", target, *key))
            if row is not None:
                downstream.append({"scheme": key[0], "granularity": key[1], "bits": key[2], "target": target,
                                   "flip_top1_e2e": _f(row["flip_top1_e2e"]),
                                   "flip_topk_set_e2e": _f(row["flip_topk_set_e2e"]), "kl_e2e": _f(row["kl_e2e"])})
    return {
        "hypothesis": HYPOTHESIS,
        "router_vs_experts": answers,
        "router_local_flips": local,
        "downstream_routing_change": downstream,
        "dense_control": dense,
        "reference": reference,
        "configs": int(len(configs)),
        "notes": list(notes) + [
            "ΔNLL ± is one standard error with sequences as clusters; verdicts compare ±2 SE intervals per parameter",
            "whole-model configurations (layer -1) only; per-layer rows are in configs/per_layer tables",
        ],
    }
