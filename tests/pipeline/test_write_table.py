"""Results tables: the CSV copy is the text pandas writes, whichever way it is formatted (column by column for
integer, float64 and string tables, pandas for the rest), whole or piece by piece; Parquet holds the same rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from moescope.analysis.result import ChunkedTable
from moescope.pipeline import analyze
from moescope.pipeline.analyze import write_table


def _frames(n: int):
    rng = np.random.default_rng(n)
    integers = pd.DataFrame({"token_id": rng.integers(0, 2**40, n), "layer": rng.integers(-1, 58, n).astype(np.int16),
                             "expert": rng.integers(0, 256, n).astype(np.uint8),
                             "count": rng.integers(-9, 10**6, n).astype(np.int32)})
    special = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-05, 1e16, 5e-324, 1.7976931348623157e308, 0.1 + 0.2, 1 / 3]
    numbers = integers.assign(share=rng.random(n) * 10.0 ** rng.integers(-9, 19, n),
                              special=[special[i % len(special)] for i in range(n)])
    mixed = numbers.assign(name=[f"x,{i}" if i % 3 else f'say "{i}"' for i in range(n)], hot=rng.random(n) < 0.5,
                           narrow=rng.random(n).astype(np.float32))
    mixed.loc[mixed.index[::4], "share"] = np.nan
    odd = ["(3,7)", 'say "hi"', "two\nlines", "carriage\rreturn", "", " padded ", "é∑", "a,\"b\"\n", "plain"]
    texts = [odd[i % len(odd)] for i in range(n)]
    halves = [pd.Series(texts[: n // 2], dtype="str"), pd.Series(texts[n // 2 :], dtype="str")]
    strings = numbers.assign(token=pd.concat(halves, ignore_index=True),  # Arrow-backed, in two chunks; formatted
                             # column by column, quoted as csv would
                             label=pd.Series([None if i % 4 == 1 else t for i, t in enumerate(texts)], dtype=object),
                             missing=pd.Series([np.nan if i % 2 else t for i, t in enumerate(texts)], dtype="str"))
    return integers, numbers, mixed, strings, integers.iloc[:0], numbers.iloc[:0], strings.iloc[:0]


@pytest.mark.parametrize("slice_rows", [3, 1 << 17])
@pytest.mark.parametrize("n", [1, 7, 256])
def test_the_csv_copy_is_what_pandas_writes(tmp_path, n, slice_rows, monkeypatch):
    monkeypatch.setattr(analyze, "CSV_SLICE_ROWS", slice_rows)  # formatted a few rows at a time, or all at once
    for frame in _frames(n):
        assert analyze._columnwise(frame) == ("hot" not in frame)  # only `mixed` (bool, float32) goes to pandas
        write_table(tmp_path, "whole", frame)
        assert (tmp_path / "whole.csv").read_bytes().decode() == frame.to_csv(index=False)  # bytes: a lone \r kept
        rows = len(frame)
        cuts = sorted({0, min(1, rows), rows // 2, rows})
        chunked = ChunkedTable(lambda: (frame.iloc[a:b] for a, b in zip(cuts, cuts[1:] or [rows])), rows)
        write_table(tmp_path, "chunked", chunked)
        assert (tmp_path / "chunked.csv").read_bytes().decode() == frame.to_csv(index=False)
        parquet = pq.read_table(tmp_path / "chunked.parquet").to_pandas()
        strings_back = {c: "str" for c in frame.columns if frame[c].dtype == object}  # object or str, as Arrow reads it
        pd.testing.assert_frame_equal(parquet.astype(strings_back), frame.reset_index(drop=True).astype(strings_back))


@pytest.mark.parametrize("n", [1, 7, 256])
def test_a_dataframe_is_written_a_row_group_at_a_time_as_one_conversion_would(tmp_path, n, monkeypatch):
    """A DataFrame table is converted to Arrow a row group at a time (bounded memory): the same rows, schema and
    pandas metadata as one conversion of the whole frame, even when the first row group's strings are all None."""
    import pyarrow as pa

    for frame in _frames(n)[:3]:
        frame = frame.assign(label=pd.Series([None if i < 4 else f"t{i}" for i in range(len(frame))], dtype=object))
        monkeypatch.setattr(analyze, "ROW_GROUP_ROWS", 3)
        write_table(tmp_path, "sliced", frame)
        sliced = pq.ParquetFile(tmp_path / "sliced.parquet")
        assert sliced.metadata.num_row_groups == max(1, -(-len(frame) // 3))
        assert sliced.schema_arrow.equals(pa.Table.from_pandas(frame, preserve_index=False).schema, check_metadata=True)
        monkeypatch.setattr(analyze, "ROW_GROUP_ROWS", 1 << 20)  # one slice: the whole frame converted at once
        write_table(tmp_path, "whole", frame)
        pd.testing.assert_frame_equal(sliced.read().to_pandas(), pq.read_table(tmp_path / "whole.parquet").to_pandas())
        assert (tmp_path / "sliced.csv").read_text() == frame.to_csv(index=False)
