"""How a price CSV is written: its delimiter and its date format, each decided once per file.

Parsing dates cell by cell (``format="mixed"``) lets a day/month file through whenever its
days happen to be <= 12, and silently swaps day and month; so one format is chosen for the
whole file (or given as ``date_format``) and a file two formats read differently is refused.
A semicolon- or tab-separated file read with commas only shows up as "missing columns", so the
delimiter is sniffed from the header and named in that error.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import re
from pathlib import Path
from typing import IO, Callable

import numpy as np
import pandas as pd

# Formats tried when no date_format is given; a file is read with the one that parses every cell.
DATE_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M:%S",
    "%Y/%m/%d",
    "%m/%d/%Y",
    "%d/%m/%Y",
    "%d.%m.%Y",
    "%Y%m%d",
)
DELIMITERS = ",;\t|"
# a UTC offset after a time (yfinance writes "2020-01-02 00:00:00-05:00", -04:00 in summer):
# dropped so dates are the exchange's wall-clock time, as one offset per file would give too
_OFFSET = re.compile(r"(\d:\d\d)\s*(?:Z|UTC|[+-]\d\d:?\d\d)$")
_OPENERS: dict[str, Callable[..., IO[str]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _where(source: str, line: int) -> str:
    return f"{source}: line {line}: "


def header_line(path: str | Path) -> str:
    """The file's first line (decompressed by suffix); "" when it cannot be read as text here."""
    path = Path(path)
    opener = _OPENERS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as f:
            return f.readline()
    except (OSError, EOFError, lzma.LZMAError):
        return ""  # the CSV reader reports the file itself


def sniff_delimiter(header: str) -> str:
    """The delimiter of a header line among ``,;\\t|`` (``,`` when it has none of them)."""
    if not header.strip():
        return ","
    try:
        return csv.Sniffer().sniff(header, delimiters=DELIMITERS).delimiter
    except csv.Error:  # e.g. a one-column header: the most frequent candidate, else a comma
        counts = {d: header.count(d) for d in DELIMITERS}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] else ","


def _parse(text: pd.Series, fmt: str) -> pd.Series:
    return pd.to_datetime(text, format=fmt, errors="coerce")


def _cells(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(cells as written, for messages; cells to parse: stripped, UTC offset dropped)."""
    raw = values.fillna("").astype(str)
    return raw, raw.str.strip().str.replace(_OFFSET, r"\1", regex=True)


def parse_dates(values: pd.Series, lines: np.ndarray, source: str, date_format: str | None = None) -> pd.Series:
    """Date cells -> naive timestamps, with ONE format for the whole column.

    ``date_format`` (strftime) is used as given (a ``%z`` in it is ignored: offsets are
    dropped); ``None`` picks the one format of :data:`DATE_FORMATS` that parses every cell.
    Raises a one-line ``ValueError`` naming ``source``, the line (``lines[i]`` of row ``i``)
    and the cell when a cell does not parse or when several formats read the file differently.
    """
    if date_format is None:
        return _detect(values, lines, source)[1]
    raw, text = _cells(values)
    dates = _parse(text, date_format.replace("%z", "").strip())
    bad = np.flatnonzero(dates.isna().to_numpy())
    if len(bad):
        i = bad[0]
        raise ValueError(_where(source, int(lines[i])) + f"date {raw.iloc[i]!r} does not match date_format={date_format!r}")
    return dates


def detect_date_format(values: pd.Series, lines: np.ndarray, source: str) -> str:
    """The one format of :data:`DATE_FORMATS` reading every cell (errors as :func:`parse_dates`)."""
    return _detect(values, lines, source)[0]


def _detect(values: pd.Series, lines: np.ndarray, source: str) -> tuple[str, pd.Series]:
    raw, text = _cells(values)
    parsed = {fmt: _parse(text, fmt) for fmt in DATE_FORMATS}
    fits = [fmt for fmt, d in parsed.items() if d.notna().all()]
    if not fits:
        best = max(DATE_FORMATS, key=lambda f: int(parsed[f].notna().sum()))  # report the likeliest format's first miss
        i = int(np.flatnonzero(parsed[best].isna().to_numpy())[0])
        raise ValueError(
            _where(source, int(lines[i])) + f"unparsable date {raw.iloc[i]!r}: no known date format reads every date "
            f"({', '.join(DATE_FORMATS)}); set date_format=<strftime format>, e.g. date_format='%d-%b-%Y'"
        )
    distinct: list[str] = []  # formats reading the file differently (e.g. m/d/Y vs d/m/Y)
    for fmt in fits:
        if not any(parsed[fmt].equals(parsed[k]) for k in distinct):
            distinct.append(fmt)
    if len(distinct) > 1:
        a, b = parsed[distinct[0]].to_numpy(), parsed[distinct[1]].to_numpy()
        i = int(np.flatnonzero(a != b)[0])
        readings = " or ".join(f"{parsed[f].iloc[i]:%Y-%m-%d} ({f})" for f in distinct)
        choose = " or ".join(f"date_format={f!r}" for f in distinct)
        raise ValueError(
            _where(source, int(lines[i])) + f"ambiguous dates: {raw.iloc[i]!r} reads as {readings}, and every date "
            f"in the file fits each; choose with {choose}"
        )
    return distinct[0], parsed[distinct[0]]
