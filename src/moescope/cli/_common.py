"""Helpers shared by subcommands: examples in help text, reading a trace argument."""

from __future__ import annotations

import argparse


def add_command(sub, name: str, *, help: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=help, epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


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
