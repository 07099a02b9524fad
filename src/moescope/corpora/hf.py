"""Hugging Face datasets already on this machine: ``hf:NAME[:CONFIG]:SPLIT:FIELD``.

Only used when the optional `datasets` package is importable. Loading always runs in offline mode
(``HF_DATASETS_OFFLINE=1`` for the duration of the call), so it succeeds only for a dataset in the
local cache or a local directory of data files, and never waits on a network that is not there.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from moescope.corpora.document import Document, Item
from moescope.errors import CorpusError

_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_FORM = "hf:NAME[:CONFIG]:SPLIT:FIELD, e.g. hf:openai/gsm8k:main:test:question"


@dataclass(frozen=True)
class HFSpec:
    name: str
    config: str | None
    split: str
    field: str


def parse_hf(spec: str) -> HFSpec:
    """Parse ``hf:NAME[:CONFIG]:SPLIT:FIELD`` (the ``hf:`` prefix included)."""
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise CorpusError(f"{spec!r} is not a Hugging Face spec; write {_FORM}")
    if len(parts) == 3:
        return HFSpec(parts[0], None, parts[1], parts[2])
    return HFSpec(*parts)


def check_datasets_installed(spec: str) -> None:
    """Raise CorpusError now if the `datasets` package is not importable."""
    if importlib.util.find_spec("datasets") is None:
        raise CorpusError(
            f"{spec} needs the 'datasets' package, which is not installed, and a copy of the dataset on this "
            "machine (no hub is reached); pip install datasets and cache it, or export it to JSONL "
            "and pass file.jsonl:FIELD"
        )


@contextmanager
def _offline() -> Iterator[None]:
    """Offline mode for `datasets` and `huggingface_hub` inside the block; previous settings restored after."""
    import datasets

    saved_env = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    saved_config = {key: getattr(datasets.config, key) for key in _OFFLINE_ENV if hasattr(datasets.config, key)}
    try:
        os.environ.update({key: "1" for key in _OFFLINE_ENV})
        for key in saved_config:
            setattr(datasets.config, key, True)  # read at import time, so set directly too
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for key, value in saved_config.items():
            setattr(datasets.config, key, value)


def read_hf(spec: str, *, domain: str) -> Iterator[Item]:
    """One document per row of a locally available Hugging Face dataset split, text from one field.

    doc_id is ``SPLIT/ROW``; rows whose text is empty are skipped. Call `check_datasets_installed` and
    `parse_hf` first for errors at spec time; loading itself happens on first iteration.
    """
    hf = parse_hf(spec)
    import datasets

    try:
        with _offline():
            table = datasets.load_dataset(hf.name, hf.config, split=hf.split)
    except OSError as err:  # ConnectionError and DatasetNotFoundError are OSErrors
        raise CorpusError(
            f"{spec}: the dataset is not available offline ({_first_line(err)}); load it once where the hub "
            "is reachable so it is cached, or export it to JSONL and pass file.jsonl:FIELD"
        ) from None
    except ValueError as err:  # e.g. unknown split or config of a dataset that is there
        raise CorpusError(f"{spec}: {_first_line(err)}; check CONFIG and SPLIT in {_FORM}") from None
    if hf.field not in table.column_names:
        raise CorpusError(f"{spec}: no field {hf.field!r}; its fields are: {', '.join(table.column_names)}")
    for row, text in enumerate(_column(table, hf.field)):
        if not isinstance(text, str):
            raise CorpusError(f"{spec}: row {row} field {hf.field!r} is a {type(text).__name__}, not a string")
        if text.strip():
            doc_id = f"{hf.split}/{row}"
            yield doc_id, Document(doc_id, text, spec, domain)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(".")


def _column(table: Any, field: str) -> Iterator[object]:  # table: a datasets.Dataset
    # Row by row from the memory-mapped Arrow table: bounded memory for large splits.
    for record in table.select_columns([field]):
        yield record[field]
