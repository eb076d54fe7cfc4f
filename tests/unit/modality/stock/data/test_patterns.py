"""Chart-pattern rules (modality/stock/data/patterns.py) on constructed price paths.

Each pattern is built as a piecewise-linear close path with 0.2 % seeded noise; a test checks
that it is found where built, that its mirror image (``close -> c0**2 / close``) shows the
opposite pattern instead, and that gentle random walks show no structural pattern.
"""

from __future__ import annotations

import numpy as np
import pytest

from modality.stock.data.patterns import (
    PATTERNS,
    WORDS,
    Pattern,
    detect_patterns,
    pattern_words,
)

STRUCTURAL = {"double_top", "double_bottom", "head_and_shoulders", "inverse_head_and_shoulders"}
OPPOSITE = {"double_top": "double_bottom", "head_and_shoulders": "inverse_head_and_shoulders",
            "breakout_up": "breakout_down", "gap_up": "gap_down"}
OPPOSITE |= {v: k for k, v in OPPOSITE.items()}

# (bar, price) knots; the expected end region is where the close first crosses the neckline.
DOUBLE_TOP = [(0, 90), (30, 110), (50, 98), (70, 110), (90, 92), (119, 92)]           # n=120, breaks ~83
HEAD_SHOULDERS = [(0, 90), (20, 104), (35, 96), (55, 115), (75, 96), (95, 104), (110, 90), (129, 88)]  # n=130
RANGE_THEN_UP = [(0, 100), (59, 100), (63, 110), (89, 112)]                           # n=90, leaves at 60
LEVEL_SHIFT = [(0, 100), (79, 100), (80, 105), (99, 105)]                              # n=100, gap at 80


def path(knots: list[tuple[int, float]], n: int, seed: int = 0, noise: float = 0.002) -> np.ndarray:
    x, v = zip(*knots)
    return np.interp(np.arange(n), x, v) * (1 + np.random.default_rng(seed).normal(0, noise, n))


def ohlc(close: np.ndarray, gaps: tuple[int, ...] = ()) -> tuple[np.ndarray, ...]:
    """open = previous close (so no gaps), except at ``gaps`` where the bar opens at its close."""
    open_ = np.r_[close[:1], close[:-1]]
    open_[list(gaps)] = close[list(gaps)]
    return open_, np.maximum(open_, close) * 1.003, np.minimum(open_, close) * 0.997, close


def mirror(close: np.ndarray) -> np.ndarray:
    return close[0] ** 2 / close


def found(close: np.ndarray, gaps: tuple[int, ...] = (), lookback: int | None = None) -> list[Pattern]:
    return detect_patterns(*ohlc(close, gaps), lookback=len(close) if lookback is None else lookback)


def named(patterns: list[Pattern], name: str) -> list[Pattern]:
    return [p for p in patterns if p.name == name]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name, knots, n, start, ends", [
    ("double_top", DOUBLE_TOP, 120, (28, 33), (80, 88)),
    ("head_and_shoulders", HEAD_SHOULDERS, 130, (17, 23), (101, 108)),
])
def test_structural_pattern_found_and_mirrored(seed, name, knots, n, start, ends):
    close = path(knots, n, seed)
    hits = named(found(close), name)
    assert len(hits) == 1, hits
    assert start[0] <= hits[0].start <= start[1] and ends[0] <= hits[0].end <= ends[1], hits
    assert not {p.name for p in found(close)} & (STRUCTURAL - {name})
    flipped = found(mirror(close))
    assert not named(flipped, name)
    # the rules run on log closes, so the mirror image is exactly the opposite pattern
    assert [(p.start, p.end) for p in named(flipped, OPPOSITE[name])] == [(hits[0].start, hits[0].end)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_breakout_found_once_and_mirrored(seed):
    close = path(RANGE_THEN_UP, 90, seed)
    ups = named(found(close), "breakout_up")
    assert len(ups) == 1 and 60 <= ups[0].end <= 62 and ups[0].start == ups[0].end - 40, ups
    flipped = found(mirror(close))
    assert not named(flipped, "breakout_up")
    assert [p.end for p in named(flipped, "breakout_down")] == [ups[0].end]


def test_gap_found_and_mirrored():
    close = path(LEVEL_SHIFT, 100)
    assert named(found(close, gaps=(80,)), "gap_up") == [Pattern("gap_up", 79, 80)]
    assert not named(found(close, gaps=(80,)), "gap_down")
    flipped = found(mirror(close), gaps=(80,))
    assert named(flipped, "gap_down") == [Pattern("gap_down", 79, 80)] and not named(flipped, "gap_up")
    # the same level shift traded continuously (open = previous close) has no gap
    assert not {p.name for p in found(close)} & {"gap_up", "gap_down"}


@pytest.mark.parametrize("seed", range(6))
def test_gentle_random_walk_has_no_structure_and_no_gaps(seed):
    rng = np.random.default_rng(seed)
    for n in (120, 250):
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.005, n)))
        names = {p.name for p in found(close)}
        assert not names & (STRUCTURAL | {"gap_up", "gap_down"}), (n, names)


def test_near_misses_are_not_patterns():
    # second peak 9 % above the first: not a double top
    assert not named(found(path([(0, 90), (30, 110), (50, 98), (70, 120), (90, 92), (119, 92)], 120)), "double_top")
    # price turns back up above the neckline and never breaks it: unconfirmed
    assert not named(found(path([(0, 90), (30, 110), (50, 98), (70, 110), (80, 100), (119, 108)], 120)), "double_top")
    # head only 2 % above the shoulders: not a head and shoulders
    flat_head = [(0, 90), (20, 104), (35, 96), (55, 106), (75, 96), (95, 104), (110, 90), (129, 88)]
    assert not named(found(path(flat_head, 130)), "head_and_shoulders")


def test_confirmation_bar_and_lookback():
    close = path(DOUBLE_TOP, 120)
    (top,) = named(found(close), "double_top")
    # found as soon as the confirming bar is in the window, not a bar earlier (no look-ahead)
    assert named(found(close[:top.end + 1]), "double_top") == [top]
    assert not named(found(close[:top.end]), "double_top")
    # a crash through the neckline 3 bars after the second peak (bar 70) is confirmed only
    # once that peak is a known swing high, 5 bars after it
    fast = path([(0, 90), (30, 110), (50, 98), (70, 110), (73, 94), (119, 93)], 120)
    assert named(found(fast), "double_top") == [Pattern("double_top", 30, 75)]
    assert not named(found(fast[:75]), "double_top")
    # the same pattern followed by 100 quiet bars is stale for a 60-bar lookback
    later = np.r_[close, path([(0, close[-1]), (99, close[-1])], 100, seed=5)]
    assert named(found(later), "double_top") == [top]
    assert named(found(later, lookback=len(later) - top.end), "double_top") == [top]
    assert not named(found(later, lookback=len(later) - top.end - 1), "double_top")
    assert not named(found(later, lookback=60), "double_top")


def test_sorted_by_end():
    patterns = found(path(HEAD_SHOULDERS, 130, seed=2))
    assert len(patterns) >= 2 and [p.end for p in patterns] == sorted(p.end for p in patterns)


def test_degenerate_inputs():
    for n in (0, 1, 3):
        assert found(np.full(n, 100.0)) == []
    assert found(np.full(200, 100.0)) == []
    x = np.full(10, 100.0)
    with pytest.raises(ValueError, match="one length"):
        detect_patterns(x, x, x, x[:-1])
    with pytest.raises(ValueError, match="finite"):
        detect_patterns(x, x, x, np.r_[x[:-1], np.nan])


def test_pattern_words():
    assert set(WORDS) == set(PATTERNS)
    phrases = list(WORDS.values())
    assert not [(a, b) for a in phrases for b in phrases if a != b and a in b]
    assert pattern_words([]) == "none"
    assert pattern_words([Pattern("double_top", 0, 10)]) == "double top"
    assert pattern_words([Pattern("gap_up", 5, 6), Pattern("double_top", 0, 10)]) == "double top and gap up"
    many = [Pattern("gap_up", 5, 6), Pattern("head_and_shoulders", 0, 10), Pattern("gap_up", 11, 12),
            Pattern("inverse_head_and_shoulders", 0, 13)]
    assert pattern_words(many) == "inverse head and shoulders, gap up and head and shoulders top"
