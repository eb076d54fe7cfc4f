"""The shard files of the speech encoder cache (modality.speech.cache): format, verified reads, atomic writes.

A shard is a safetensors file: one fp16 tensor per clip, named by the sha1 of the clip's audio bytes; its
metadata holds ``format``, each clip's crc32 (``clips``) and the (path, size, mtime, ctime, inode, clip key) rows
of the files it was hashed from (``paths``), so an unchanged file is found again by a stat. A shard is indexed
only if its header is whole (dtypes, offsets and the file size agree) and a clip is returned only if its crc32
matches: a damaged or partial shard is deleted and its clips become misses, never used. Shards are written to a
hidden tmp file, fsynced and renamed, so a reader sees a whole shard or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

log = logging.getLogger(__name__)

FORMAT = 1  # bump when decoding, featurizing or encoding changes what a clip encodes to
REFRESH_SECONDS = 5.0  # a miss re-lists the folder at most this often (other processes' new shards)


class ShardError(ValueError):
    """A shard that is not whole: truncated, overwritten or not written by this module."""


def file_stat(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def content_key(path: Path) -> str:
    """sha1 of the file's bytes: the same audio under any path or mtime is the same clip."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def raw_bytes(t: Tensor) -> Any:
    """A CPU tensor's bytes as a buffer (no copy when already contiguous on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


@dataclass(frozen=True)
class Entry:
    """Where one clip's tensor lies: its shard, absolute byte range, shape and crc32."""

    shard: str
    start: int
    nbytes: int
    shape: tuple[int, ...]
    crc: int


def read_shard_header(path: Path) -> tuple[dict[str, Entry], dict[tuple, str]]:
    """Index a shard: (clip key -> Entry, (path, *stat) -> clip key). Raises ShardError unless it is whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise ShardError(f"header length {n} in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
            meta = header.pop("__metadata__")
            crcs, paths = json.loads(meta["clips"]), json.loads(meta["paths"])
            memo = {tuple(row[:5]): str(row[5]) for row in paths}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise ShardError(f"unreadable header ({e})") from None
    if meta.get("format") != str(FORMAT) or set(crcs) != set(header):
        raise ShardError(f"format {meta.get('format')!r} or clip list does not match its tensors")
    base, end, entries = 8 + n, 8 + n, {}
    for key, info in header.items():
        try:
            s, e = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            ok = info["dtype"] == "F16" and e - s == 2 * math.prod(shape) and s >= 0
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ShardError(f"tensor {key}: {info}")
        entries[key] = Entry(path.name, base + s, e - s, shape, int(crcs[key]))
        end = max(end, base + e)
    if end != size:
        raise ShardError(f"{size} bytes, its header describes {end} (partial write?)")
    return entries, memo


class ShardStore:
    """The shards of one encoder-key folder: index, verified reads, atomic writes, removal of damaged shards."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._shards: dict[str, dict[str, Entry]] = {}
        self._entries: dict[str, Entry] = {}
        self._memo: dict[tuple, str] = {}  # (resolved path, *stat) -> clip key, as the shard headers remember
        self._hashed: dict[tuple, str] = {}  # the same, hashed by this process and not (yet) in a shard
        self._listed = 0.0
        self.damaged: list[str] = []  # shards this process found damaged and deleted

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def refresh(self) -> None:
        """Index shards written since the last listing (by any process); forget deleted ones."""
        names = {p.name for p in self.folder.glob("shard-*.safetensors")} if self.folder.is_dir() else set()
        for gone in set(self._shards) - names:
            self._forget(gone)
        for name in sorted(names - set(self._shards)):
            try:
                self._add(name, *read_shard_header(self.folder / name))
            except ShardError as e:
                self.discard(name, str(e))
            except OSError as e:  # gone since the listing, or unreadable: not indexed, so never used
                log.debug("speech cache: skipping %s (%s)", name, e)
        self._listed = time.monotonic()

    def sweep(self, max_age_s: float = 86400.0) -> None:
        """Delete tmp files a crashed writer left (old enough that no live writer still owns them)."""
        for tmp in self.folder.glob(".shard-*.tmp") if self.folder.is_dir() else []:
            try:
                if time.time() - tmp.stat().st_mtime > max_age_s:
                    tmp.unlink()
            except FileNotFoundError:
                pass

    def _add(self, name: str, entries: dict[str, Entry], memo: dict[tuple, str]) -> None:
        self._shards[name] = entries
        for k, e in entries.items():
            self._entries.setdefault(k, e)  # a clip two shards hold (a race of two misses): either copy
        self._memo.update(memo)

    def key_of(self, path: Path) -> str:
        """The clip key of an audio file: by its stat when a shard or this process saw it so, else by hashing."""
        memo_key = self._stat_key(path)
        key = self._memo.get(memo_key) or self._hashed.get(memo_key)
        if key is None:
            key = self._hashed[memo_key] = content_key(path)
        return key

    def known(self, path: Path) -> str | None:
        """The clip key a shard remembers for this file as it is now (no hashing); None: new or changed."""
        return self._memo.get(self._stat_key(path))

    @staticmethod
    def _stat_key(path: Path) -> tuple:
        path = path.resolve()
        return (str(path), *file_stat(path))

    def shard_of(self, key: str) -> str:
        return self._entries[key].shard

    def get(self, key: str, refresh: bool = True) -> Tensor | None:
        """The clip's tensor (float32), verified by its crc32; None when absent or damaged (then deleted)."""
        e = self._entries.get(key)
        if e is None:
            if refresh and time.monotonic() - self._listed > REFRESH_SECONDS:
                self.refresh()
                return self.get(key, refresh=False)
            return None
        t = self._read(e)
        return self.get(key, refresh) if t is None else t  # None: that shard is gone; another may hold the clip

    def _read(self, e: Entry) -> Tensor | None:
        try:
            with open(self.folder / e.shard, "rb") as f:
                f.seek(e.start)
                buf = f.read(e.nbytes)
        except FileNotFoundError:  # deleted by another process since it was indexed
            self._forget(e.shard)
            return None
        if len(buf) != e.nbytes or zlib.crc32(buf) != e.crc:
            self.discard(e.shard, f"a clip fails its crc32 at byte {e.start}")
            return None
        if not e.nbytes:
            return torch.zeros(e.shape)
        return torch.frombuffer(bytearray(buf), dtype=torch.float16).view(e.shape).float()

    def verify(self, shard: str) -> bool:
        """Read every clip of a shard against its crc32; a damaged shard is deleted (False)."""
        return all(self._read(e) is not None for e in list(self._shards.get(shard, {}).values())) \
            and shard in self._shards

    def discard(self, shard: str, why: str) -> None:
        log.warning("speech cache: deleting damaged shard %s (%s); its clips will be encoded again",
                    self.folder / shard, why)
        (self.folder / shard).unlink(missing_ok=True)
        self.damaged.append(shard)
        self._forget(shard)

    def _forget(self, shard: str) -> None:
        if self._shards.pop(shard, None) is not None:
            self._entries = {k: e for entries in reversed(self._shards.values()) for k, e in entries.items()}

    def write(self, clips: dict[str, Tensor], paths: Iterable[Path]) -> str:
        """One shard of ``clips`` (key -> tensor, stored fp16) remembering ``paths`` (their sources) by stat.
        Atomic: readers see the whole shard or none of it. Returns its name (now indexed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.detach().to("cpu", torch.float16).contiguous() for k, t in clips.items()}
        crcs = {k: zlib.crc32(raw_bytes(t)) for k, t in tensors.items()}
        rows = [[*self._stat_key(p), self.key_of(p)] for p in paths]
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp), metadata={"format": str(FORMAT), "clips": json.dumps(crcs),
                                               "paths": json.dumps(rows)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # a crash after the rename leaves a whole file or one the header check refuses
        os.replace(tmp, self.folder / name)
        self._add(name, *read_shard_header(self.folder / name))
        return name
