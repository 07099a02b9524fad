"""`moescope` console command: one file per subcommand; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("inspect", "capture", "sql", "export", "import_", "verify", "analyze", "compare", "placement", "offload",
               "quant", "importance", "report", "demo", "top", "replay_check", "saturation")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like moescope's own (exit status 2, as argparse's)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moescope", description="See how Mixture-of-Experts models route their tokens.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"moescope.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from moescope.errors import MoescopeError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        storage_options(getattr(args, "storage_option", None))
        return int(args.run(args) or 0)
    except MoescopeError as err:
        if args.debug:
            raise
        message = str(err).replace("\r", "\\r").replace("\n", "\\n")  # one line, even with a newline in a path
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130


def storage_options(pairs: list[str] | None) -> None:
    """--storage-option for every s3:// path of this run. Without any, the storage layer is not imported: pyarrow's
    filesystems register an S3 finalizer that runs at exit, and `top` or `inspect` never touch storage."""
    if pairs:
        from moescope.trace.storage import parse_options, set_default_options

        set_default_options(parse_options(pairs))
    elif "moescope.trace.storage" in sys.modules:  # an earlier main() of this process may have set some
        sys.modules["moescope.trace.storage"].set_default_options({})


if __name__ == "__main__":
    sys.exit(main())
