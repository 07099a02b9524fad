"""mkdocs hooks: pages that are generated from the code when the site is built, so they cannot go stale.

    <!-- generated: cli -->       every subcommand's --help, from moescope's own argument parsers
    <!-- generated: families -->  every declared MoE family, from adapters/families.py
"""

from __future__ import annotations

import argparse


def _cli_reference() -> str:
    import os

    from moescope.cli.main import build_parser

    os.environ["COLUMNS"] = "110"  # argparse wraps help to the terminal: the same width on every machine

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = []
    for name, sub in sorted(subparsers.choices.items()):
        parts.append(f"## moescope {name}\n\n```text\n{sub.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def _families() -> str:
    from moescope.adapters.families import FAMILIES, UNSUPPORTED

    rows = ["| model_type | scoring | renormalise | grouped | correction bias | notes |", "|---|---|---|---|---|---|"]
    for name, spec in sorted(FAMILIES.items()):
        notes = " ".join(str(spec.notes).split()).replace("|", "/")
        rows.append(f"| `{name}` | {spec.scoring} | {spec.renormalize} | {'yes' if spec.grouped else ''} | "
                    f"{spec.bias_attr or ''} | {notes} |")
    rows += ["", "Not supported:", ""]
    rows += [f"- `{name}`: {u.reason}" for name, u in sorted(UNSUPPORTED.items())]
    return "\n".join(rows)


GENERATED = {"<!-- generated: cli -->": _cli_reference, "<!-- generated: families -->": _families}


def on_page_markdown(markdown: str, **_) -> str:
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
