"""The report as data: groups of sections made of blocks (text, notes, figures, tables, key-value lists).

`sections/` builds this from results folders; `html.py` renders it. Every string here is plain text
(possibly model- or user-controlled) and is escaped by the renderer, never trusted as markup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Notes:
    """Notes an analysis left, or what is missing and how to get it (kind "missing")."""

    items: tuple[str, ...]
    kind: str = "note"  # "note" | "missing"


@dataclass(frozen=True)
class FigureBlock:
    """A figure made on demand (so only one is in memory at a time) with its file stem and caption."""

    name: str  # file stem, [a-z0-9_]
    make: Callable[[], Figure]
    caption: str
    alt: str = ""


@dataclass(frozen=True)
class TableBlock:
    frame: pd.DataFrame
    caption: str
    interactive: bool = False  # sortable + searchable
    formats: dict[str, str] = field(default_factory=dict)  # column -> format spec, e.g. ".3f", ",d", ".1%"
    mono: tuple[str, ...] = ()  # columns shown as code (token text, expert combinations)
    total_rows: int | None = None  # rows in the full table, when `frame` shows only the top ones


@dataclass(frozen=True)
class KeyValues:
    rows: tuple[tuple[str, str], ...]


Block = Text | Notes | FigureBlock | TableBlock | KeyValues


@dataclass(frozen=True)
class Section:
    id: str  # [a-z0-9-], unique in the report
    title: str
    blocks: tuple[Block, ...]
    ran: bool = True  # False: shown greyed in the table of contents


@dataclass(frozen=True)
class Group:
    """One results folder: its title, header facts and sections."""

    id: str
    title: str
    subtitle: str
    header: KeyValues
    sections: tuple[Section, ...]


@dataclass(frozen=True)
class Headline:
    """Headline numbers: one column per results folder, one row per quantity."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[str, ...]], ...]  # (quantity, value per column)
    verdicts: tuple[str, ...] = ()  # quantization answers, one line each


@dataclass(frozen=True)
class Document:
    title: str
    inputs: tuple[str, ...]
    headline: Headline
    groups: tuple[Group, ...]
    version: str
