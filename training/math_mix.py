"""The training side of the math domain: GSM word problems diluted with other reasoning-gym puzzles.

Held-out math is GSM problems from templates never trained on (the corpus split groups by template).
With math windows of GSM alone, every model memorises the training templates, and its held-out math perplexity
rises as training goes on (tiny-dsv3: 93 -> 139 over 2448 steps of 2 GSM windows each). So the math
windows come from a stream in which GSM is only GSM_SHARE of the characters; the rest are short word and
arithmetic puzzles from other reasoning-gym generators (pip-installed, seeded, so reproducible).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

GSM_SHARE = 0.125
PUZZLE_GENERATORS = (
    "aiw", "leg_counting", "time_intervals", "family_relationships", "simple_geometry",
    "calendar_arithmetic", "basic_arithmetic", "fraction_simplification", "chain_sum",
)
PUZZLE_SEED = 0  # of the first round; round r is seeded PUZZLE_SEED + r
_ROUND = 50_000  # items made per generator and round (the shipped mix draws about 23 k of each)


def recipe() -> dict:
    """What the training math stream is made of (recorded in each shipped model's metrics.json)."""
    from importlib.metadata import version

    return {"gsm_share_of_chars": GSM_SHARE, "puzzle_generators": list(PUZZLE_GENERATORS),
            "puzzle_seed": PUZZLE_SEED, "reasoning_gym": version("reasoning-gym")}


def puzzles() -> Iterator[str]:
    """'question\nanswer' texts, one from each generator in turn, in a fixed order, without end."""
    import reasoning_gym

    for round_ in itertools.count():
        datasets = [reasoning_gym.create_dataset(name, size=_ROUND, seed=PUZZLE_SEED + round_)
                    for name in PUZZLE_GENERATORS]
        for i in range(_ROUND):
            for dataset in datasets:
                item = dataset[i]
                yield f"{item['question'].strip()}\n{item['answer']}"


def diluted_math(gsm: list[str], gsm_share: float = GSM_SHARE) -> list[str]:
    """gsm's texts in order, each followed by puzzles until GSM is gsm_share of the characters so far."""
    source = puzzles()
    out, gsm_chars, puzzle_chars = [], 0, 0
    for text in gsm:
        out.append(text)
        gsm_chars += len(text)
        while puzzle_chars < gsm_chars * (1 - gsm_share) / gsm_share:
            puzzle = next(source)
            out.append(puzzle)
            puzzle_chars += len(puzzle)
    return out
