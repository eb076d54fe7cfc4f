"""The one JSONL reader: every record file, manifest and predictions file is read here, so a bad line is always
reported the same way, naming the file and the line. Also the writers of run outputs (metrics.json,
predictions.jsonl): strict JSON (a NaN is written as null, so any JSON parser reads them) and atomic (written to a
temporary file beside the target, then renamed over it, so a killed run never leaves half a file)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _not_utf8(path: str | Path, n: int, raw: bytes, e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line; a malformed or non-UTF-8 line raises ValueError."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, raw, e) from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg})") from None


def read_jsonl(path: str | Path) -> list[Any]:
    """Every non-blank line's value (see iter_jsonl)."""
    return [value for _, value in iter_jsonl(path)]


def check_utf8(path: str | Path) -> None:
    """Raise the ValueError iter_jsonl raises (file, line, byte) at the first line of ``path`` that is not UTF-8.
    Why: a reader that decodes a whole file (json.loads, pandas) reports only a byte offset, or no file at all."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, raw, e) from None


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf; also numpy / 0-d tensor scalars) replaced by None,
    through dicts, lists and tuples. Why: json.dumps writes NaN as a bare ``NaN`` token that strict parsers
    (jq, JavaScript, most other languages) reject."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kw: Any) -> str:
    """Strict JSON: non-finite numbers as null (see ``finite``), other non-JSON objects as their str()."""
    return json.dumps(finite(value), allow_nan=False, default=str, **kw)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[str]]:
    """A text file that appears at ``path`` only once the block completes: written to a temporary file in the
    same folder (same filesystem: the rename is atomic), flushed to disk, then os.replace'd over ``path``.
    An exception (or a kill) leaves any previous ``path`` untouched and no partial file under its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """Write ``value`` as strict JSON, atomically."""
    with atomic_open(path) as f:
        f.write(dumps(value, indent=indent) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Write one strict JSON line per row, atomically."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(dumps(row) + "\n")
