"""The routing targets of the shipped MoEs, measured with moescope itself: capture, then `moescope analyze`.

Targets (issue 17), on the EVAL split of the built-in corpora (code, math, prose):
- in every MoE layer the busiest expert takes at most BUSIEST_MAX x its fair share (``load`` analysis,
  ``max_over_mean``), and no expert is dead (``n_dead``);
- routing is domain-specific: in at least one layer the total-variation distance between the code and
  prose expert distributions (``domain_specialisation`` distributions) exceeds TV_MIN.

`measure_routing` runs the real CLI (`moescope capture`, `moescope analyze --only load,domain_specialisation`)
into a scratch folder and reads the tables it wrote, so the numbers are what a user would get.

Examples
--------
    python -m moescope.models.targets moescope:tiny-moe   # prints the per-layer table
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

DATA = "humaneval,python-stdlib,gsm-symbolic:4000,wiki"  # the held-out domains of models/evaluate.py
SPLIT = "eval"
FULL_TOKENS = 32_768  # what metrics.json and the README report
# What the default test run re-measures (it must equal the recorded value): short documents only, so that
# a small capture holds every domain (a standard-library file alone fills thousands of tokens).
CHECK_DATA, CHECK_TOKENS = "humaneval,gsm-symbolic:4000,wiki", 2_048
BUSIEST_MAX = 2.0
TV_MIN = 0.1


def _run(argv: list[str]) -> None:
    from moescope.cli.main import main

    with contextlib.redirect_stdout(io.StringIO()):  # the CLI's own report; the tables are read instead
        rc = main(argv)
    if rc not in (0, None):
        raise RuntimeError(f"moescope {' '.join(argv)} exited {rc}")


def model_arguments(model: str, name: str) -> list[str]:
    """`moescope capture` arguments for shipped model `name`, read from `model` (``moescope:NAME`` or a folder)."""
    from moescope.models import default_custom_router

    router = default_custom_router(name)
    if model.startswith("moescope:") or router is None:
        return [model]
    return [model, "--router-pattern", router.pattern, "--router-output", router.output.value,
            "--top-k", str(router.top_k)]


def measure_routing(model: str, max_tokens: int, name: str | None = None, data: str = DATA) -> dict:
    """Per-layer busiest/fair share, dead experts and code-vs-prose TV of `model` (``moescope:NAME`` or a folder)."""
    name = name or model.removeprefix("moescope:")
    with tempfile.TemporaryDirectory() as scratch:
        trace, tables = Path(scratch) / "trace", Path(scratch) / "tables"
        _run(["capture", *model_arguments(model, name), "--data", data, "--split", SPLIT,
              "--max-tokens", str(max_tokens), "--out", str(trace), "--no-progress"])
        _run(["analyze", str(trace), "--out", str(tables), "--only", "load,domain_specialisation", "--no-model"])
        load = pd.read_csv(tables / "load__per_layer.csv")
        dist = pd.read_csv(tables / "domain_specialisation__distributions.csv")
    load = load[load["layer"] >= 0]  # -1 is all layers pooled
    share = dist.pivot_table(index=["layer", "expert"], columns="domain", values="share", fill_value=0.0)
    tv = (0.5 * (share["code"] - share["prose"]).abs()).groupby(level="layer").sum()  # [L]
    layers = [{"layer": int(row.layer), "busiest_over_fair": round(float(row.max_over_mean), 4),
               "dead": int(row.n_dead), "tv_code_prose": round(float(tv[row.layer]), 4)}
              for row in load.itertuples()]
    return {"data": data, "split": SPLIT, "max_tokens": max_tokens, "layers": layers, "met": targets_met(layers)}


def targets_met(layers: list[dict]) -> dict[str, bool]:
    return {
        f"busiest <= {BUSIEST_MAX:g} x fair in every layer": all(r["busiest_over_fair"] <= BUSIEST_MAX for r in layers),
        "no dead expert": all(r["dead"] == 0 for r in layers),
        f"code-vs-prose TV > {TV_MIN:g} in some layer": any(r["tv_code_prose"] > TV_MIN for r in layers),
    }


def measure_targets(model: str, name: str) -> dict:
    """The full measurement and the small one the tests repeat; `model` is a shipped name or a folder."""
    model = model if Path(model).is_dir() else "moescope:" + model.removeprefix("moescope:")
    return {"full": measure_routing(model, FULL_TOKENS, name),
            "check": measure_routing(model, CHECK_TOKENS, name, CHECK_DATA)}


if __name__ == "__main__":
    print(json.dumps(measure_routing(sys.argv[1], FULL_TOKENS), indent=1))
