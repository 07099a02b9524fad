"""moescope saturation: checkpoints of a tiny model trained here, against an independent computation of routing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from moescope.cli.main import main

_spec = importlib.util.spec_from_file_location("moescope_tests_conftest", Path(__file__).parents[1] / "conftest.py")
_root_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root_conftest)

TEXT = ("def add(a, b):\n    return a + b\n\nThe river ran slowly past the old mill, and the miller watched it.\n\n"
        "What is 12 plus 30? It is 42. What is 7 times 6? Also 42.\n") * 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen3-MoE trained 6 steps on TEXT, saved with save_pretrained after steps 0, 3 and 6."""
    root = tmp_path_factory.mktemp("ckpts")
    model = _root_conftest.make_tiny_qwen3_moe(seed=2).train()
    tokenizer = _root_conftest.make_byte_tokenizer()
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:128]).reshape(4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    saved = []
    for step in range(7):
        if step in (0, 3, 6):
            folder = root / f"checkpoint-{step}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            saved.append(folder)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    (root / "data").mkdir()
    (root / "data" / "text.txt").write_text(TEXT)  # a folder: one document per file, the whole file
    return root, saved


def _reference_choices(folder: Path, token_rows: list[list[int]]) -> list[np.ndarray]:
    """Per MoE layer, [tokens, 2] expert ids by descending router probability: plain hooks + NumPy softmax."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    per_layer = [[] for _ in routers]
    for row in token_rows:
        inputs = []
        handles = [r.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
                   for r in routers]
        with torch.inference_mode():
            model(input_ids=torch.tensor([row]), use_cache=False)
        for h in handles:
            h.remove()
        for layer, (x, router) in enumerate(zip(inputs, routers)):
            logits = x.double().numpy() @ router.weight.detach().double().numpy().T
            per_layer[layer].append(np.argsort(-logits, axis=-1, kind="stable")[:, :2])
    return [np.concatenate(chunks) for chunks in per_layer]


def test_saturation_against_independent_routing_report_and_rerun(checkpoints, tmp_path, capsys):
    root, (first, middle, final) = checkpoints
    out = tmp_path / "sat"
    argv = ["saturation", str(first), str(middle), str(final), "--final", str(final), "--data", str(root / "data"),
            "--out", str(out), "--seq-len", "48"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "checkpoint-0: top-1 agreement" in printed
    table = pd.read_parquet(out / "saturation__per_layer.parquet")
    assert list(table.columns) == ["checkpoint", "order", "step", "layer", "tokens", "top1_agreement", "topk_overlap"]
    assert table["step"].unique().tolist() == [0, 3, 6]
    # the tokens every checkpoint ran on: the final tokenizer's ids of the file, in sequences of 48
    tokenizer = _root_conftest.make_byte_tokenizer()
    stream = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rows = [stream[i:i + 48] for i in range(0, len(stream), 48)]
    reference = {c.name: _reference_choices(c, rows) for c in (first, middle, final)}
    for name, choices in reference.items():
        for layer, ids in enumerate(choices):
            fin = reference[final.name][layer]
            top1 = (ids[:, 0] == fin[:, 0]).mean()
            overlap = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(ids.tolist(), fin.tolist())])  # a plain loop
            row = table[(table["checkpoint"] == name) & (table["layer"] == layer)].iloc[0]
            assert row["tokens"] == len(stream)
            assert row["top1_agreement"] == pytest.approx(top1, abs=1e-12), (name, layer)
            assert row["topk_overlap"] == pytest.approx(overlap, abs=1e-12), (name, layer)
    last = table[table["checkpoint"] == final.name]
    assert (last["top1_agreement"] == 1).all() and (last["topk_overlap"] == 1).all()
    assert table[table["checkpoint"] == first.name]["top1_agreement"].min() < 1  # training moved the routers
    summary = json.loads((out / "summary.json").read_text())
    # the report: the section and its figure
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Router saturation" in page and "data:image/svg+xml" in page
    # a rerun reuses the traces and gives the same results
    stamps = {p: p.stat().st_mtime_ns for p in (out / "traces").rglob("manifest.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "traces").rglob("manifest.json")} == stamps
    assert json.loads((out / "summary.json").read_text()) == summary


def test_bad_input_is_one_line(checkpoints, tmp_path, capsys):
    root, (first, _, final) = checkpoints
    from transformers import Qwen3MoeConfig

    other = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts=4, num_experts_per_tok=2))
    other.save_pretrained(tmp_path / "other")
    _root_conftest.make_byte_tokenizer().save_pretrained(tmp_path / "other")
    data = str(root / "data")
    cases = [
        (["saturation", str(tmp_path / "other"), "--final", str(final), "--data", data, "--out", str(tmp_path / "a")],
         "other MoE layers"),
        (["saturation", str(tmp_path / "nope"), "--final", str(final), "--data", data, "--out", str(tmp_path / "b")], "nope"),
        (["saturation", str(first), "--final", str(final), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c")],
         "missing.txt"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err
        assert not Path(argv[argv.index("--out") + 1]).exists()  # refused before anything was written
    with pytest.raises(SystemExit) as exit_:
        main(["saturation", str(first), "--data", data, "--out", str(tmp_path / "d")])  # no --final
    assert exit_.value.code == 2
