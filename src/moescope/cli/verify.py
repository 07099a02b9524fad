"""`moescope verify TRACE`: check every shard against the manifest (size, rows, SHA-256)."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope verify traces/run1
"""


def add_parser(sub) -> None:
    p = add_command(sub, "verify", help="check a trace's shards against the checksums in its manifest", examples=EXAMPLES)
    p.add_argument("trace")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import verify

    report = verify(args.trace)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1
