"""The load table (window, layer, expert, tokens): written, read back, refused when malformed, analysed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moescope.cli.main import main
from moescope.errors import TraceError
from moescope.trace.load_table import read_load_table, write_load_table


@pytest.mark.parametrize("W, L, E", [(1, 1, 1), (7, 3, 5), (2, 4, 256)])
def test_dense_counts_round_trip(tmp_path, W, L, E):
    rng = np.random.default_rng(W * L * E)
    tokens = rng.integers(0, 1000, (W, L, E))
    windows = np.arange(W) * 3 + 1  # gaps: idle windows are not written
    write_load_table(tmp_path / "t.parquet", windows, tokens)
    table = read_load_table(tmp_path / "t.parquet")
    np.testing.assert_array_equal(table.windows, windows)
    np.testing.assert_array_equal(table.tokens, tokens)
    np.testing.assert_array_equal(table.matrix, tokens.sum(0))
    frame = pd.read_parquet(tmp_path / "t.parquet")  # any Parquet reader sees the documented columns
    assert list(frame.columns) == ["window", "layer", "expert", "tokens"] and len(frame) == W * L * E


def test_a_folder_of_window_files_and_sparse_rows(tmp_path):
    write_load_table(tmp_path / "load-000000.parquet", [0], np.array([[[1, 2], [3, 4]]]))
    pq.write_table(pa.table({"window": pa.array([2], pa.int32()), "layer": pa.array([1], pa.int16()),
                             "expert": pa.array([1], pa.int32()), "tokens": pa.array([10], pa.int64())}),
                   tmp_path / "load-000002.parquet")
    table = read_load_table(tmp_path)
    assert table.windows.tolist() == [0, 2]
    np.testing.assert_array_equal(table.tokens, [[[1, 2], [3, 4]], [[0, 0], [0, 10]]])


@pytest.mark.parametrize("frame, message", [
    ({"window": [0, 0], "layer": [0, 0], "expert": [1, 1], "tokens": [3, 4]}, "appears more than once"),
    ({"window": [0], "layer": [0], "expert": [1], "tokens": [-3]}, "negative tokens"),
    ({"window": [0], "layer": [0], "expert": [1]}, "integer columns window, layer, expert, tokens"),
    ({"window": [0], "layer": [0], "expert": [1], "tokens": [1.5]}, "integer columns"),
    ({"window": [], "layer": [], "expert": [], "tokens": []}, "has no rows"),
])
def test_malformed_tables_are_one_trace_error_naming_the_file(tmp_path, frame, message):
    pq.write_table(pa.table({k: pa.array(v, pa.float64() if any(isinstance(x, float) for x in v) else pa.int64())
                             for k, v in frame.items()}), tmp_path / "bad.parquet")
    with pytest.raises(TraceError, match=message) as err:
        read_load_table(tmp_path / "bad.parquet")
    assert str(tmp_path / "bad.parquet") in str(err.value)


def test_not_parquet_or_nothing_there(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(TraceError, match="not a Parquet load table"):
        read_load_table(tmp_path / "x.parquet")
    with pytest.raises(TraceError, match="no load table here"):
        read_load_table(tmp_path / "empty")


def test_analyze_runs_the_load_analysis_on_a_load_table(tmp_path, capsys):
    tokens = np.array([[[10, 10, 10, 10], [40, 0, 0, 0]], [[2, 2, 2, 2], [0, 0, 0, 0]]])  # [W=2, L=2, E=4]
    write_load_table(tmp_path / "load.parquet", [0, 1], tokens)
    assert main(["analyze", str(tmp_path / "load.parquet"), "--out", str(tmp_path / "r")]) == 0
    per_layer = pd.read_parquet(tmp_path / "r" / "load__per_layer.parquet")  # layers 0, 1, then overall
    assert per_layer["max_over_mean"].iloc[0] == 1.0 and per_layer["load_entropy_norm"].iloc[0] == 1.0
    assert per_layer["max_over_mean"].iloc[1] == 4.0 and per_layer["n_dead"].iloc[1] == 3
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["analyses"]["load"]["n_tokens"] is None and summary["trace"]["windows"] == 2
    assert main(["analyze", str(tmp_path / "load.parquet"), "--out", str(tmp_path / "r2"), "--only", "cross_layer"]) == 2
    assert "only the load analysis" in capsys.readouterr().err and not (tmp_path / "r2").exists()
