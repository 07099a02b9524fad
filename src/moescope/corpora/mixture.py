"""Deterministic interleaving of several document streams, balanced by characters.

The next document always comes from the stream that has emitted the fewest characters so far
(ties: the one listed first). Any prefix of the mixture, such as what a ``--max-tokens`` budget
keeps, therefore holds roughly equal amounts of text from every source, whatever their document
lengths: a 20 kB stdlib module is followed by ~50 short math problems, not by one.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

from moescope.corpora.document import Document


def interleave(streams: Iterable[Iterator[Document]]) -> Iterator[Document]:
    """Merge `streams` fewest-characters-first; a stream that ends drops out.

    Examples
    --------
    >>> a = [Document(f"a{i}", "x" * 10, "a", "code") for i in range(3)]
    >>> b = [Document(f"b{i}", "y" * 4, "b", "math") for i in range(5)]
    >>> [d.doc_id for d in interleave([iter(a), iter(b)])]
    ['a0', 'b0', 'b1', 'b2', 'a1', 'b3', 'b4', 'a2']
    """
    # heap entries: (characters emitted so far, position in `streams`, stream)
    heap = [(0, i, iter(stream)) for i, stream in enumerate(streams)]
    heapq.heapify(heap)
    while heap:
        chars, i, stream = heap[0]
        doc = next(stream, None)
        if doc is None:
            heapq.heappop(heap)
            continue
        heapq.heapreplace(heap, (chars + len(doc.text), i, stream))
        yield doc
