"""examples/seed_workflow.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel), outputs checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[2] / "examples" / "seed_workflow.ipynb"


def _outputs(cell, kind: str) -> list:
    return [o["data"][kind] for o in cell.get("outputs", []) if o.get("output_type") in ("execute_result", "display_data")
            and kind in o.get("data", {})]


def test_example_notebook_executes_and_shows_what_it_says(tmp_path):
    work = tmp_path / "nb"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    nb = nbformat.read(work / NOTEBOOK.name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    by_source = {c.source.splitlines()[0]: c for c in code}
    assert _outputs(code[0], "text/plain") == ["'Qwen3MoeForCausalLM'"]
    trace_html = _outputs(code[1], "text/html")[0]  # rec.trace's _repr_html_
    assert "moescope Trace" in trace_html and "in memory" in trace_html
    sql = _outputs(code[2], "text/html")[0]
    assert "first_experts" in sql and "True" in sql and "False" in sql  # prompt and generated tokens
    assert "moescope Results" in _outputs(by_source["results = moescope.analyze(rec.trace, model=model, tokenizer=tokenizer)"],
                                          "text/html")[0]
    assert "balance_score" in _outputs(by_source["results.load.per_layer"], "text/html")[0]
    figures = _outputs(by_source["results.load.plot()"], "text/html")[0]
    assert figures.count("data:image/png;base64,") >= 3
    sweep = _outputs(by_source["sweep = moescope.quant_sweep(model, \"wiki\", tokenizer=tokenizer, bits=\"4,8\", targets=\"router\","],
                     "text/plain")[0]
    assert "router" in sweep and "delta_nll" in sweep
    assert (work / "report.html").is_file() and "Expert load" in (work / "report.html").read_text()
