"""The speech encoder cache built by 2 gloo processes: each clip is encoded and written exactly once (each rank
its share), every rank then reads every clip; a damaged shard is found, deleted and rebuilt by one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from modality.speech.shards import read_shard_header

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_cache_worker.py")
N_CLIPS = 7


def build(tmp: Path, clips: list[Path], tag: str) -> list[dict]:
    """Both ranks at once; their JSON reports, rank order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp / f"{tag}-rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(tmp / f"rdzv-{tag}"), str(tmp / "cache"),
                               str(outs[r]), *map(str, clips)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for r in range(2)]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


def shard_keys(folder: Path) -> list[list[str]]:
    return [list(read_shard_header(s)[0]) for s in sorted(folder.glob("shard-*.safetensors"))]


def test_two_ranks_write_each_clip_once_and_read_all(tmp_path):
    clips = []
    for i in range(N_CLIPS):
        t = torch.arange(int(16000 * (0.5 + 0.15 * i))) / 16000
        sf.write(tmp_path / f"c{i}.wav", (0.3 * torch.sin(2 * torch.pi * (180 + 40 * i) * t)).numpy(), 16000)
        clips.append(tmp_path / f"c{i}.wav")
    r0, r1 = build(tmp_path, clips, "build")
    folder = Path(r0["folder"])
    keys = [k for shard in shard_keys(folder) for k in shard]
    assert len(keys) == len(set(keys)) == N_CLIPS  # every clip written once, in all
    assert r0["first"]["computed"] == r1["first"]["computed"] == N_CLIPS
    assert {r0["first"]["encoded_here"], r1["first"]["encoded_here"]} == {3, 4}  # each rank its share
    assert r0["again"]["cached"] == r1["again"]["cached"] == N_CLIPS and r0["again"]["computed"] == 0
    assert r0["sums"] == r1["sums"] and len(r0["sums"]) == N_CLIPS  # both read every clip, the same values

    victim = min(folder.glob("shard-*.safetensors"))
    lost = list(read_shard_header(victim)[0])
    raw = bytearray(victim.read_bytes())
    raw[-2] ^= 0xFF  # a flipped bit in the data: the header still reads
    victim.write_bytes(bytes(raw))
    r0, r1 = build(tmp_path, clips, "rebuild")
    assert not victim.exists() and r0["first"]["damaged"] == r1["first"]["damaged"] == 1
    assert r0["first"]["computed"] == len(lost) and r0["first"]["encoded_here"] + r1["first"]["encoded_here"] == len(lost)
    keys = [k for shard in shard_keys(folder) for k in shard]
    assert len(keys) == len(set(keys)) == N_CLIPS
    assert r0["sums"] == r1["sums"]


@pytest.mark.slow
def test_train_py_under_ddp_builds_the_cache_once_in_setup(speech_corpus, tmp_path):
    """Through the front door (trainer=ddp, 2 gloo ranks): the fit's setup hook splits the clips between the ranks;
    every clip of train + val + eval is in one shard exactly once."""
    c, root = speech_corpus, Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "train.py"), "llm=tiny", "trainer=ddp", "trainer.devices=2",
           "trainer.accelerator=cpu", "modality=speech", "modality.tiny=true", f"modality.cache_dir={tmp_path}/cache",
           "stage=align", "trainer.max_steps=1", f"data.train_files={c}/train.jsonl", f"data.val_files={c}/val.jsonl",
           f"data.eval_files={c}/eval.jsonl", "data.batch_size=2", "eval.max_new_tokens=2",
           "trainer.limit_val_batches=1", "trainer.enable_model_summary=false", f"paths.output_dir={tmp_path}/run"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MMLM_ROOT": str(root)})
    assert p.returncode == 0, p.stderr[-3000:]
    wavs = {json.loads(line)["audio_filepath"] for split in ("train", "val", "eval")
            for line in (c / f"{split}.jsonl").read_text().splitlines()}
    (folder,) = (tmp_path / "cache").glob("enc-*")
    keys = [k for shard in shard_keys(folder) for k in shard]
    assert len(keys) == len(set(keys)) == len(wavs)
    setup = [json.loads(line.split(": ", 1)[1].replace("'", '"')) for line in (p.stdout + p.stderr).splitlines()
             if "speech encoder cache (train+val+eval)" in line]
    assert len(setup) == 2 and all(s["encoded_here"] > 0 for s in setup)  # both ranks encoded their share
    assert sum(s["encoded_here"] for s in setup) == setup[0]["computed"]
