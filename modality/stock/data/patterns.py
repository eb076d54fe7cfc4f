"""Classic chart patterns of one daily OHLC window, by fixed, documented rules.

Everything is deterministic and reads only the window (oldest first, index 0..n-1). A
pattern's ``end`` is the bar that confirms it; :func:`detect_patterns` keeps those with
``end >= n - lookback`` (a pattern confirmed long ago is stale). Structural patterns work
on log closes ``y = log(close)``, so "3 %" below means 0.03 in log units, and a series'
mirror image (``close -> c0**2 / close``) turns each top into the matching bottom exactly.

Swing highs (``K = 5``)
    Bar i with ``y[i] > max(y[i-5:i])`` and ``y[i] >= max(y[i+1:i+6])`` (strict on the left,
    so a plateau counts once and a flat series has none). It needs 5 bars on each side
    inside the window, so none lies in the last 5 bars and two are more than 5 bars apart.
Depth ``D(span) = max(5 %, 1.0 * s * sqrt(span))``
    ``s`` is the window's daily volatility (std of ``diff(y)``): a 5 % dip is a pattern in
    a calm series but noise in a volatile one, where random walks make such dips anyway.
double top
    Swing highs a < b with ``10 <= b - a <= 60``, ``|y[a] - y[b]| <= 3 %``, no close in
    (a, b) above the higher peak P, and the lowest close in (a, b) (the neckline) at least
    ``D(b - a)`` below the lower peak. Confirmed at the first t in (b, b + (b - a)] with
    ``y[t]`` below the neckline, unless a close above P comes first (invalidated).
    ``start = a``, ``end = max(t, b + 5)`` (by then b is a known swing high too).
head and shoulders top
    Swing highs l < h < r with ``r - l <= 90``, ``y[h]`` the highest close of [l, r] and at
    least 5 % above each shoulder (so a double top's 3 %-equal peaks are never a head and
    shoulder), shoulders within 5 % of each other. Neckline = the lower of the lowest
    closes in (l, h) and (h, r), at least ``D(max(h - l, r - h))`` below the lower
    shoulder. Confirmed like a double top: first t in (r, r + (r - l)] below the neckline,
    unless a close above the head comes first. ``start = l``, ``end = max(t, r + 5)``.
double bottom / inverse head and shoulders
    The same rules on ``-y`` (peaks become troughs).
breakout up / down (``RANGE_LEN = 40``)
    The 40 closes before bar t span ``(max - min) / mean < 12 %`` and ``close[t]`` is more
    than 1 % above the max high (up) / below the min low (down) of those 40 bars. A bar
    that qualifies within 40 bars of the previous qualifying bar of the same direction is
    the same breakout's follow-through, not a new one; ``start = t - 40``, ``end = t``.
gap up / down
    ``low[t] > high[t-1] * 1.02`` (up) or ``high[t] < low[t-1] * 0.98`` (down);
    ``start = t - 1``, ``end = t``.
Several patterns of one name with one end (e.g. one top paired with two earlier peaks)
are reported once, with the latest start; the list is sorted by end.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PATTERNS: tuple[str, ...] = ("double_top", "double_bottom", "head_and_shoulders", "inverse_head_and_shoulders",
                             "breakout_up", "breakout_down", "gap_up", "gap_down")
# No phrase is a substring of another ("head and shoulders top" vs "inverse head and shoulders").
WORDS: dict[str, str] = {
    "double_top": "double top",
    "double_bottom": "double bottom",
    "head_and_shoulders": "head and shoulders top",
    "inverse_head_and_shoulders": "inverse head and shoulders",
    "breakout_up": "breakout above the range",
    "breakout_down": "breakdown below the range",
    "gap_up": "gap up",
    "gap_down": "gap down",
}

K = 5                # swing half-width (bars)
MIN_SEP, MAX_SPAN = 10, 60  # double top/bottom: bars from first to second peak
TOL = 0.03           # double top/bottom: peak equality (log units)
DEPTH, SIG = 0.05, 1.0  # neckline depth: max(DEPTH, SIG * daily vol * sqrt(span))
HS_SPAN = 90         # head and shoulders: bars from shoulder to shoulder
HEAD = 0.05          # head above each shoulder (log units)
SHOULDER_TOL = 0.05  # shoulder equality (log units)
RANGE_LEN, RANGE_WIDTH, BREAK = 40, 0.12, 0.01
GAP = 0.02


@dataclasses.dataclass(frozen=True)
class Pattern:
    """One detected pattern; ``start``/``end`` index the window, ``end`` confirms it."""

    name: str
    start: int
    end: int


def swing_highs(y: np.ndarray, k: int = K) -> list[int]:
    """Indices of swing highs of ``y`` (see the module docstring); needs k bars on each side."""
    return [i for i in range(k, len(y) - k) if y[i] > y[i - k:i].max() and y[i] >= y[i + 1:i + k + 1].max()]


def _depth(vol: float, span: int) -> float:
    """Minimum neckline depth: fixed 5 %, or more where the window's noise makes deeper dips."""
    return max(DEPTH, SIG * vol * float(np.sqrt(span)))


def _confirm(y: np.ndarray, after: int, neckline: float, ceiling: float, within: int) -> int | None:
    """First t in (after, after + within] with ``y[t] < neckline``; None if ``y`` tops ``ceiling`` first."""
    for t in range(after + 1, min(len(y), after + within + 1)):
        if y[t] < neckline:
            return t
        if y[t] > ceiling:
            return None
    return None


def _doubles(y: np.ndarray, vol: float) -> list[tuple[int, int]]:
    """(start, end) of every confirmed double top of ``y``."""
    out = []
    highs = swing_highs(y)
    for j, b in enumerate(highs):
        for a in highs[:j]:
            if not MIN_SEP <= b - a <= MAX_SPAN or abs(y[a] - y[b]) > TOL or y[a + 1:b].max() > max(y[a], y[b]):
                continue
            neck = y[a + 1:b].min()
            if min(y[a], y[b]) - neck < _depth(vol, b - a):
                continue
            t = _confirm(y, b, neck, max(y[a], y[b]), b - a)
            if t is not None:
                out.append((a, max(t, b + K)))
    return out


def _head_and_shoulders(y: np.ndarray, vol: float) -> list[tuple[int, int]]:
    """(start, end) of every confirmed head-and-shoulders top of ``y``."""
    out = []
    highs = swing_highs(y)
    for i, h in enumerate(highs):
        for left in highs[:i]:
            for right in highs[i + 1:]:
                if (right - left > HS_SPAN or y[h] < y[left:right + 1].max() or y[h] - max(y[left], y[right]) < HEAD
                        or abs(y[left] - y[right]) > SHOULDER_TOL):
                    continue
                neck = min(y[left + 1:h].min(), y[h + 1:right].min())
                if min(y[left], y[right]) - neck < _depth(vol, max(h - left, right - h)):
                    continue
                t = _confirm(y, right, neck, y[h], right - left)
                if t is not None:
                    out.append((left, max(t, right + K)))
    return out


def _breakouts(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> list[Pattern]:
    """Closes leaving a tight ``RANGE_LEN``-bar range; the follow-through bars are the same breakout."""
    out: list[Pattern] = []
    last = {"breakout_up": -RANGE_LEN - 1, "breakout_down": -RANGE_LEN - 1}
    for t in range(RANGE_LEN, len(close)):
        c = close[t - RANGE_LEN:t]
        if (c.max() - c.min()) / c.mean() >= RANGE_WIDTH:
            continue
        name = ("breakout_up" if close[t] > high[t - RANGE_LEN:t].max() * (1 + BREAK)
                else "breakout_down" if close[t] < low[t - RANGE_LEN:t].min() * (1 - BREAK) else None)
        if name is not None:
            if t - last[name] > RANGE_LEN:
                out.append(Pattern(name, t - RANGE_LEN, t))
            last[name] = t
    return out


def detect_patterns(open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
                    lookback: int = 60) -> list[Pattern]:
    """Patterns confirmed within the last ``lookback`` bars, sorted by end (most recent last).

    Fewer than 2 bars give []. Raises ValueError unless the four arrays are 1-D, of one
    length, finite and positive (the structural rules work on log prices).
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (open_, high, low, close)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"open/high/low/close must be 1-D and of one length, got shapes {[a.shape for a in arrays]}")
    if not all(np.isfinite(a).all() and (a > 0).all() for a in arrays):
        raise ValueError("open/high/low/close must be finite and positive")
    _, high, low, close = arrays
    n = len(close)
    if n < 2:
        return []
    found = [Pattern("gap_up", t - 1, t) for t in range(1, n) if low[t] > high[t - 1] * (1 + GAP)]
    found += [Pattern("gap_down", t - 1, t) for t in range(1, n) if high[t] < low[t - 1] * (1 - GAP)]
    found += _breakouts(high, low, close)
    y = np.log(close)
    vol = float(np.diff(y).std())
    for sign, double, hs in ((1.0, "double_top", "head_and_shoulders"),
                             (-1.0, "double_bottom", "inverse_head_and_shoulders")):
        found += [Pattern(double, s, e) for s, e in _doubles(sign * y, vol)]
        found += [Pattern(hs, s, e) for s, e in _head_and_shoulders(sign * y, vol)]
    best: dict[tuple[str, int], Pattern] = {}
    for p in found:
        if p.end >= n - lookback and ((p.name, p.end) not in best or p.start > best[p.name, p.end].start):
            best[p.name, p.end] = p
    return sorted(best.values(), key=lambda p: (p.end, PATTERNS.index(p.name), p.start))


def pattern_words(found: list[Pattern]) -> str:
    """Distinct patterns as words, most recent first: "double top and gap up"; "none" if empty."""
    words = list(dict.fromkeys(WORDS[p.name] for p in reversed(found)))
    if not words:
        return "none"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
