"""`moescope sql TRACE QUERY`: query a trace's tables (routing, tokens, sequences) with DuckDB."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope sql traces/run1 "SELECT layer, count(*) FROM routing GROUP BY layer"
  moescope sql traces/run1 "SELECT topk_ids[1] AS expert, count(*) n FROM routing WHERE layer = 0 GROUP BY 1 ORDER BY n DESC"
  moescope sql traces/run1 "SELECT s.domain, count(*) FROM tokens t JOIN sequences s USING (seq_id) GROUP BY 1" --csv
"""


def add_parser(sub) -> None:
    p = add_command(sub, "sql", help="run a DuckDB SQL query over a trace", examples=EXAMPLES)
    p.add_argument("trace", help="trace folder")
    p.add_argument("query", help="SQL over the views routing, tokens, sequences")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.add_argument("--max-rows", type=int, default=100, help="rows to print in table mode (default 100)")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import sql

    frame = sql(args.trace, args.query)
    if args.csv:
        print(frame.to_csv(index=False), end="")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", args.max_rows, "display.width", 200):
            print(frame.to_string(index=False, max_rows=args.max_rows))
    return 0
