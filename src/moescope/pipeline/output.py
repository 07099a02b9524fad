"""Output folders of the pipeline steps: refuse what is not ours before anything is written.

Every step that writes a folder (`analyze`, `compare`, `quant`, `demo`) calls `prepare_output_folder`
first, so a path that is a file, a non-empty folder that some other program (or the user) owns, or a
folder that cannot be written is one clear error, and nothing of the user's is ever overwritten.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moescope.errors import MoescopeError


def check_output_folder(out: str | os.PathLike, *, markers: tuple[str, ...], what: str) -> Path:
    """`out` as a Path, after refusing a file and a non-empty folder holding none of `markers` (names of
    entries this kind of output writes, by which a previous run's folder is recognised). Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoescopeError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in markers):
        raise MoescopeError(f"--out {out} is not empty and holds no {what}; choose a new or empty folder")
    return out


def prepare_output_folder(out: str | os.PathLike, *, markers: tuple[str, ...], what: str) -> Path:
    """`check_output_folder`, then create the folder and prove it writable (root ignores permission bits,
    so a probe file is the only reliable test)."""
    out = check_output_folder(out, markers=markers, what=what)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise MoescopeError(f"cannot write into {out}: {err.strerror}; choose a writable --out") from None
    return out
