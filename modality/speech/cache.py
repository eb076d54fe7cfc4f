"""Sharded, content-keyed cache of a frozen encoder's outputs, built once by many ranks and read by all.

Why: a cluster reads the same clips every epoch; encoding them once up front (batched, on the accelerator)
leaves each step adaptor + LLM only. One file per clip does not scale (millions of inodes, slow listings), and
a key made of the path and a few weights misses renamed files and can mix encoders. So:

- a folder ``enc-<key>`` per encoder: sha1 over every parameter and buffer of the encoder, its architecture,
  the featurizer (mel filter bank, sample rate, max_seconds, overlong), the states read and ``FORMAT``;
- in it, shards of many clips each, keyed by the sha1 of the audio file's bytes, verified on every read and
  deleted when damaged (modality.speech.shards);
- ``precompute``: rank 0 plans, the ranks hash, verify and encode their shares and exchange results through
  torch.distributed collectives, then each re-indexes the folder: every clip is written once, read by all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modality.speech.shards import FORMAT, ShardStore, raw_bytes

SHARD_BYTES = 256 * 2**20  # a shard is written once this much is encoded (and at the end)


def tensor_sha1(t: Tensor) -> str:
    return hashlib.sha1(raw_bytes(t)).hexdigest()


def weights_key(module: nn.Module, settings: dict) -> str:
    """sha1 over ``settings`` and every parameter and buffer (name, dtype, shape, bytes) of ``module``."""
    h = hashlib.sha1(json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(raw_bytes(t))
    return h.hexdigest()[:20]


class WeightsKey:
    """``weights_key`` computed once and again only when a parameter changed in place (``load_state_dict``
    bumps its version), never inside a DataLoader worker (which may not touch a CUDA encoder)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._key: str | None = None
        self._seen: tuple = ()

    def __call__(self, settings: Callable[[], dict]) -> str:
        seen = tuple((id(p), p._version) for p in self.module.parameters())
        if self._key is None or (seen != self._seen and torch.utils.data.get_worker_info() is None):
            self._key, self._seen = weights_key(self.module, settings()), seen
        return self._key


@dataclass
class Group:
    """This process's place among the ranks (torch.distributed when initialized, else alone)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Group:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def run(self, fn: Callable[[], Any]) -> list[Any]:
        """Every rank runs ``fn``; all get every rank's result, or all raise the first rank's error (no rank
        is left waiting in a collective for one that failed)."""
        if self.world == 1:
            return [fn()]
        import torch.distributed as dist

        try:
            out: Any = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - sent to every rank, raised there
            out = ("error", f"rank {self.rank}: {e}")
        results: list[Any] = [None] * self.world
        dist.all_gather_object(results, out)
        for status, value in results:
            if status == "error":
                raise ValueError(value)
        return [value for _, value in results]


class EncoderCache:
    """The cache under one ``cache_dir``: a ShardStore per encoder key, lookups, and the distributed build."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._stores: dict[str, ShardStore] = {}

    def store(self, key: str) -> ShardStore:
        if key not in self._stores:
            self._stores[key] = ShardStore(self.root / f"enc-{key}")
            self._stores[key].refresh()
        return self._stores[key]

    def get(self, key: str, path: Path) -> Tensor | None:
        store = self.store(key)
        return store.get(store.key_of(path))

    def put(self, key: str, path: Path, hidden: Tensor) -> None:
        """One clip encoded outside ``precompute`` (a miss): its own small shard."""
        store = self.store(key)
        store.write({store.key_of(path): hidden}, [path])

    def precompute(self, key: str, paths: list[Path], encode: Callable[[list[Path]], list[Tensor]],
                   seconds: Callable[[Path], float], batch_size: int = 16, progress: bool = True,
                   group: Group | None = None, shard_bytes: int = SHARD_BYTES, verify: bool = True) -> dict[str, int]:
        """Make every clip of ``paths`` (the same list on every rank) readable from the cache.

        Rank 0 plans (what is cached, which shards hold it, what is new); each rank then hashes its share of
        the new files and verifies (crc32) its share of the shards in use; each unique clip still missing is
        encoded by exactly one rank, in batches of ``batch_size`` sorted by duration (``seconds``), written in
        shards of ~``shard_bytes``; finally every rank indexes every shard. Returns counts: computed (clips
        encoded, all ranks), cached (paths already there), damaged (shards deleted), encoded_here (this rank).
        """
        group = group or Group.current()
        store = self.store(key)
        seen_damaged = len(store.damaged)
        plan = group.run(lambda: self._plan(store, paths, verify) if group.rank == 0 else None)[0]
        store.refresh()
        r, w = group.rank, group.world

        def check() -> dict:
            hashed = [(p, store.key_of(Path(p)), s) for p, s in plan["unknown"][r::w]]
            lost: list[str] = []
            for shard, keys in plan["verify"][r::w]:
                if not store.verify(shard):
                    lost += [k for k in keys if k not in store]  # unless another shard holds it too
            known = [(p, k) for p, k, _ in hashed if k in store and k not in lost]
            if known:  # new paths (or touched files) of clips already encoded: remember them by stat
                store.write({}, [Path(p) for p, _ in known])
            return {"hashed": hashed, "stored": [k in store for _, k, _ in hashed], "lost": lost,
                    "damaged": store.damaged[seen_damaged:]}

        checks = group.run(check)
        lost = {k for c in checks for k in c["lost"]}
        todo: dict[str, tuple[str, int]] = {k: (p, s) for k, (p, s) in plan["missing"].items()}
        todo.update({k: tuple(plan["cached"][k]) for k in lost if k in plan["cached"]})
        for c in checks:
            for (p, k, s), stored in zip(c["hashed"], c["stored"]):
                if not stored or k in lost:
                    todo.setdefault(k, (p, s))
        order = sorted(todo, key=lambda k: (-todo[k][1], k))  # largest first, dealt round-robin: balanced
        mine = [Path(todo[k][0]) for k in order[r::w]]
        sources: dict[str, list[Path]] = {}
        for p, k in plan["paths"]:
            if k is not None:
                sources.setdefault(k, []).append(Path(p))
        for c in checks:
            for p, k, _ in c["hashed"]:
                sources.setdefault(k, []).append(Path(p))

        def build() -> int:
            return self._encode(store, mine, sources, encode, seconds, batch_size, shard_bytes,
                                progress and r == 0)

        done = group.run(build)
        store.refresh()
        new_paths = sum(len(sources.get(k, [])) for k in todo)
        return {"computed": len(todo), "cached": len(paths) - new_paths,
                "damaged": len({d for c in checks for d in c["damaged"]}), "encoded_here": done[r]}

    @staticmethod
    def _plan(store: ShardStore, paths: list[Path], verify: bool) -> dict:
        """Rank 0's view of the folder: cached (key -> [path, size]), missing (a known key whose clip is gone),
        unknown (new or changed files, to hash), verify (shards holding the cached clips)."""
        store.refresh()
        store.sweep()
        cached: dict[str, list] = {}
        missing: dict[str, list] = {}
        unknown, rows = [], []
        for p in paths:
            if not p.is_file():
                raise ValueError(f"{p}: audio file not found")
            k = store.known(p)
            size = p.stat().st_size
            rows.append([str(p), k])
            if k is None:
                unknown.append([str(p), size])
            else:
                (cached if k in store else missing).setdefault(k, [str(p), size])
        shards: dict[str, list[str]] = {}
        for k in cached if verify else []:
            shards.setdefault(store.shard_of(k), []).append(k)
        return {"cached": cached, "missing": missing, "unknown": unknown, "verify": sorted(shards.items()), "paths": rows}

    @staticmethod
    def _encode(store: ShardStore, mine: list[Path], sources: dict[str, list[Path]],
                encode: Callable[[list[Path]], list[Tensor]], seconds: Callable[[Path], float], batch_size: int,
                shard_bytes: int, progress: bool) -> int:
        """Encode this rank's share in duration-sorted batches; write a shard each ~``shard_bytes``."""
        from tqdm.auto import tqdm

        mine = sorted(mine, key=seconds)  # reads headers only; a missing or bad file raises here, naming it
        bar = tqdm(total=len(mine), desc="speech cache", unit="clip", disable=not (progress and mine))
        buf: dict[str, Tensor] = {}
        size = 0
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            for p, hidden in zip(chunk, encode(chunk)):
                key = store.key_of(p)
                buf[key] = hidden.to(torch.float16)
                size += buf[key].numel() * 2
            if size >= shard_bytes:
                store.write(buf, [s for k in buf for s in sources.get(k, [])])
                buf, size = {}, 0
            bar.update(len(chunk))
        if buf:
            store.write(buf, [s for k in buf for s in sources.get(k, [])])
        bar.close()
        return len(mine)
