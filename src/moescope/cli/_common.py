"""Helpers shared by subcommands: examples in help text, number arguments, telling a rerun that wrote nothing."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_command(sub, name: str, *, help: str, examples: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name, help=help, description=help, epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE", default=[],
                        help="for s3:// paths: endpoint_url, region, profile, access_key, secret_key, ... "
                             "(repeatable; docs/guides/object-storage.md)")
    return parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def non_negative_int(text: str) -> int:
    value = positive_int(text) if text.strip() != "0" else 0
    return value


def manifest_bytes(folder: str) -> bytes | None:
    """A trace folder's manifest as it is now (None without one): the same bytes after a run mean it wrote nothing."""
    from moescope.trace.storage import is_url, location

    if is_url(folder):
        where = location(folder)
        return where.read_bytes("manifest.json") if where.size("manifest.json") is not None else None
    path = Path(folder) / "manifest.json"
    return path.read_bytes() if path.is_file() else None
