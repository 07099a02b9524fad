"""Each engine's file given to another engine's reader: one line naming the file, exit 2, nothing written."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from moescope.cli.main import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("foreign")
    buffer = io.BytesIO()
    np.save(buffer, np.array([[[1, 2]], [[3, 4]]], np.uint8))
    (tmp / "vllm.jsonl").write_text(json.dumps({"choices": [{"token_ids": [5], "prompt_token_ids": [1, 2],
                                                             "routed_experts": base64.b64encode(buffer.getvalue()).decode()}]}))
    ids = torch.full((2, 2, 8), -1, dtype=torch.int32)
    ids[1, :, :2] = torch.tensor([[1, 2], [3, 4]])
    torch.save({"records": [{"input_ids": [1, 2], "positions": [0, 1], "extend_seq_lens": [2], "forward_mode": 1,
                             "topk_ids_of_layer": ids}]}, tmp / "sglang.pt")
    (tmp / "trtllm").mkdir()
    (tmp / "trtllm" / "meta_info.json").write_text(json.dumps({"num_experts": 8, "num_experts_per_token": 2}))
    save_file({"0_1": np.ones(8, np.int64)}, str(tmp / "trtllm" / "rank0.safetensors"))
    (tmp / "olmoe.jsonl").write_text(json.dumps({"input_ids": [1, 2], "exp_ids": [[[1], [2]], [[3], [4]]]}))
    return {"vllm": tmp / "vllm.jsonl", "sglang": tmp / "sglang.pt", "trtllm": tmp / "trtllm", "olmoe": tmp / "olmoe.jsonl"}


@pytest.mark.parametrize("reader", ["vllm", "sglang", "trtllm", "olmoe"])
@pytest.mark.parametrize("source", ["vllm", "sglang", "trtllm", "olmoe"])
def test_a_foreign_file_is_one_line_and_writes_nothing(files, tmp_path, capsys, reader, source):
    out = tmp_path / ("t.parquet" if reader == source == "trtllm" else "t")  # its counts: a load table
    code = main(["import", str(files[source]), "--format", reader, "--out", str(out)])
    if reader == source:
        assert code == 0  # the files themselves are valid
        return
    assert code == 2 and not out.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {files[source]}"), lines
