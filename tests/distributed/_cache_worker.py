"""One rank of the 2-process encoder-cache test (not collected by pytest).

``python tests/distributed/_cache_worker.py RANK WORLD RDZV_FILE CACHE_DIR OUT_JSON CLIP...``

Joins a gloo group, builds the speech cache for CLIP... with the same tiny encoder as every other rank (fixed
seed), then reads every clip with encoding forbidden (all read all) and writes its counts and checksums to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch
import torch.distributed as dist


def main() -> None:
    rank, world, rdzv, cache, out, *clips = sys.argv[1:]
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=int(rank), world_size=int(world))
    from modality.speech.plugin import SpeechModality

    torch.manual_seed(0)
    m = SpeechModality(d_llm=8, tiny=True, stack=2, hidden=8, cache_dir=cache).eval()
    paths = [Path(c) for c in clips]
    first = m.precompute_cache(paths, batch_size=2, progress=False, shard_bytes=1)

    def refuse(batch):
        raise AssertionError(f"rank {rank} encoded {batch} after the build")

    m._encode_paths = refuse
    sums = {p.name: float(m.load_features(p)[0].double().sum()) for p in paths}  # every clip, from any rank's shard
    again = m.precompute_cache(paths, progress=False)
    Path(out).write_text(json.dumps({"first": first, "again": again, "sums": sums, "folder": str(m.cache_folder())}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
