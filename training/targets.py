"""The routing targets of the shipped MoEs, measured with moescope itself: capture, then `moescope analyze`.

Targets (issue 17), on the EVAL split of the training domains (models/train.py): code, math and prose,
where prose is Wikipedia and Debian documentation in the proportion the training batches hold them:
- in every MoE layer the busiest expert takes at most BUSIEST_MAX x its fair share (``load`` analysis,
  ``max_over_mean``), and no expert is dead (``n_dead``);
- routing is domain-specific: in at least one layer the total-variation distance between the code and
  prose expert distributions (``domain_specialisation`` distributions) exceeds TV_MIN.

Balance learnt on one mix of domains is measured on another when the two differ: an expert that takes half
of Wikipedia's slots and a quarter of the documentation's is overloaded on a prose side of Wikipedia alone
(1.9x fair share where the training batches had 1.4x; measured on a tiny-moe checkpoint). The text: the
eval-split documents of each domain, cut at line ends into pieces of at most PIECE_CHARS characters,
documentation pieces added to Wikipedia's up to BATCH_MIX's docs : prose ratio in characters, shuffled
by a hash of their text (so that a capture's first tokens sample every document, not
the first few files), written to ``code=``/``math=``/``prose=`` JSONL files. moescope interleaves sources
fewest-characters-first, so every prefix of the capture holds the three domains in equal measure (the
built-in spec itself would not: one standard-library file of the eval split is 23 k tokens, 70 % of a
32 k-token capture).

`measure_routing` runs the real CLI (`moescope capture --split all` on those files, `moescope analyze
--only load,domain_specialisation`) into a scratch folder and reads the tables it wrote, so the numbers
are what a user gets.

Examples
--------
    python -m training.targets moescope:tiny-moe   # prints the measurement as JSON
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import itertools
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

PIECE_CHARS = 1_000
FULL_TOKENS = 32_768  # what metrics.json and the README report
CHECK_TOKENS = 2_048  # what the default test run re-measures (it must equal the recorded value)
BUSIEST_MAX = 2.0
TV_MIN = 0.1


def pieces(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` cut at line ends into pieces of at most `limit` characters (a longer line is a piece alone).

    Examples
    --------
    >>> pieces("aa\\nbb\\ncc\\n", limit=6)
    ['aa\\nbb\\n', 'cc\\n']
    """
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > limit:
            out.append(current)
            current = ""
        current += line
    return [*out, current] if current.strip() else out


def _text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def eval_pieces() -> dict[str, list[str]]:
    """Domain -> eval-split pieces; prose = Wikipedia + documentation in the training batches' proportion."""
    from training.debian_docs import debian_docs_texts
    from training.texts import held_out_texts
    from training.train import BATCH_MIX

    cut = {d: [p for t in texts for p in pieces(t) if p.strip()] for d, texts in held_out_texts("eval").items()}
    budget = sum(map(len, cut["prose"])) * BATCH_MIX["docs"] / BATCH_MIX["prose"]  # characters of docs
    docs = sorted((p for t in debian_docs_texts("eval") for p in pieces(t) if p.strip()), key=_text_hash)
    n_docs = bisect.bisect_right(list(itertools.accumulate(map(len, docs))), budget)
    cut["prose"] += docs[:n_docs]
    return cut


def write_eval_corpus(folder: Path) -> tuple[str, dict[str, str]]:
    """Write the eval-split pieces of each domain to ``folder/<domain>.jsonl``: (the ``--data`` spec, domain ->
    SHA-256 of the file written, so a measurement says which text it was made on)."""
    entries, digests = [], {}
    for domain, texts in eval_pieces().items():
        path = folder / f"{domain}.jsonl"
        cut = sorted(texts, key=_text_hash)
        data = ("\n".join(json.dumps({"text": p}) for p in cut) + "\n").encode()
        path.write_bytes(data)
        entries.append(f"{domain}={path}:text")
        digests[domain] = hashlib.sha256(data).hexdigest()
    return ",".join(entries), digests


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


def measure_routing(model: str, max_tokens: int, name: str | None = None) -> dict:
    """Per-layer busiest/fair share, dead experts and code-vs-prose TV of `model` (``moescope:NAME`` or a folder)."""
    from training.debian_docs import installed_versions

    name = name or model.removeprefix("moescope:")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data, digests = write_eval_corpus(scratch)
        trace, tables = scratch / "trace", scratch / "tables"
        _run(["capture", *model_arguments(model, name), "--data", data, "--split", "all",
              "--max-tokens", str(max_tokens), "--out", str(trace), "--no-progress"])
        _run(["analyze", str(trace), "--out", str(tables), "--only", "load,domain_specialisation", "--no-model"])
        load = pd.read_csv(tables / "load__per_layer.csv")
        dist = pd.read_csv(tables / "domain_specialisation__distributions.csv")
        tokens = json.loads((tables / "summary.json").read_text())["analyses"]["domain_specialisation"]
    load = load[load["layer"] >= 0]  # -1 is all layers pooled
    share = dist.pivot_table(index=["layer", "expert"], columns="domain", values="share", fill_value=0.0)
    tv = (0.5 * (share["code"] - share["prose"]).abs()).groupby(level="layer").sum()  # [L]
    layers = [{"layer": int(row.layer), "busiest_over_fair": round(float(row.max_over_mean), 4),
               "dead": int(row.n_dead), "tv_code_prose": round(float(tv[row.layer]), 4)}
              for row in load.itertuples()]
    return {"corpus": f"eval split of {', '.join(sorted(tokens['tokens_per_domain']))} (Wikipedia + Debian "
                      f"documentation), pieces of <= {PIECE_CHARS} characters", "tokens_per_domain": tokens["tokens_per_domain"], "max_tokens": max_tokens,
            "layers": layers, "met": targets_met(layers), "corpus_sha256": digests,
            "debian_packages": installed_versions()}


def targets_met(layers: list[dict]) -> dict[str, bool]:
    return {
        f"busiest <= {BUSIEST_MAX:g} x fair in every layer": all(r["busiest_over_fair"] <= BUSIEST_MAX for r in layers),
        "no dead expert": all(r["dead"] == 0 for r in layers),
        f"code-vs-prose TV > {TV_MIN:g} in some layer": any(r["tv_code_prose"] > TV_MIN for r in layers),
    }


def measure_targets(model: str, name: str) -> dict:
    """The full measurement and the small one the tests repeat; `model` is a shipped name or a folder."""
    model = model if Path(model).is_dir() else "moescope:" + model.removeprefix("moescope:")
    return {"full": measure_routing(model, FULL_TOKENS, name), "check": measure_routing(model, CHECK_TOKENS, name)}


if __name__ == "__main__":
    print(json.dumps(measure_routing(sys.argv[1], FULL_TOKENS), indent=1))
