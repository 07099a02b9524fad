"""The training math stream: every GSM text kept in order, diluted to GSM_SHARE of the characters by puzzles."""

from __future__ import annotations

import pytest

from training import math_mix


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_gsm_is_the_asked_share_of_characters_and_keeps_its_order(share):
    gsm = [f"Problem {i}: " + "x" * (50 + 37 * (i % 5)) for i in range(40)]
    mixed = math_mix.diluted_math(gsm, share)
    assert [t for t in mixed if t.startswith("Problem ")] == gsm
    gsm_chars = sum(map(len, gsm))
    total = sum(map(len, mixed))
    longest_puzzle = max(len(t) for t in mixed if not t.startswith("Problem "))
    # puzzles are added until the share is reached, so they overshoot it by at most one puzzle
    assert gsm_chars / total <= share
    assert gsm_chars / (total - longest_puzzle) > share


def test_puzzles_are_reproducible_distinct_and_answered():
    first = [p for _, p in zip(range(2 * len(math_mix.PUZZLE_GENERATORS)), math_mix.puzzles())]
    again = [p for _, p in zip(range(2 * len(math_mix.PUZZLE_GENERATORS)), math_mix.puzzles())]
    assert first == again
    assert len(set(first)) == len(first)
    assert all("\n" in p and p.split("\n")[-1] for p in first)  # question, then a non-empty answer


def test_every_shipped_model_records_the_math_mix_it_was_trained_on():
    import json

    from moescope.models import SHIPPED_MODELS, WEIGHTS_DIR

    for name in SHIPPED_MODELS:
        corpus = json.loads((WEIGHTS_DIR / name / "metrics.json").read_text())["corpus"]
        assert corpus["math_mix"] == math_mix.recipe(), name
