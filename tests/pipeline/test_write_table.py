"""Results tables: the CSV copy is the text pandas writes, whichever writer formats it (Arrow's for plain integer
tables, pandas' for the rest), whole or piece by piece; Parquet holds the same rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from moescope.analysis.result import ChunkedTable
from moescope.pipeline.analyze import write_table


def _frames(n: int):
    rng = np.random.default_rng(n)
    integers = pd.DataFrame({"token_id": rng.integers(0, 2**40, n), "layer": rng.integers(-1, 58, n).astype(np.int16),
                             "expert": rng.integers(0, 256, n).astype(np.uint8), "count": rng.integers(-9, 10**6, n).astype(np.int32)})
    mixed = integers.assign(share=rng.random(n), name=[f"x,{i}" if i % 3 else f'say "{i}"' for i in range(n)],
                            hot=rng.random(n) < 0.5)
    mixed.loc[mixed.index[::4], "share"] = np.nan
    return integers, mixed


@pytest.mark.parametrize("n", [1, 7, 256])
def test_the_csv_copy_is_what_pandas_writes(tmp_path, n):
    for frame in _frames(n):
        write_table(tmp_path, "whole", frame)
        assert (tmp_path / "whole.csv").read_text() == frame.to_csv(index=False)
        cuts = [0, 1, n // 2, n] if n > 1 else [0, 1]
        chunked = ChunkedTable(lambda: (frame.iloc[a:b] for a, b in zip(cuts, cuts[1:])), n)
        write_table(tmp_path, "chunked", chunked)
        assert (tmp_path / "chunked.csv").read_text() == frame.to_csv(index=False)
        pd.testing.assert_frame_equal(pq.read_table(tmp_path / "chunked.parquet").to_pandas(), frame.reset_index(drop=True))
