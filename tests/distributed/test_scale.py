"""DDP and FSDP2 on 2 CPU processes (gloo) train exactly like one process with the same global batch;
QLoRA trains under both; a checkpoint saved under FSDP2 resumes exactly under DDP on one process.

Five launches of tests/distributed/_worker.py (each process re-run by Lightning's launcher, as
train.py is; ddp_spawn spawns them) feed every test below; ~100 s on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("_worker.py")
STEPS = 3
BASE = {"steps": STEPS, "global_batch": 4}
JOBS = {
    "single": [{"name": "align", "stage": "align", **BASE}, {"name": "instruct", "stage": "instruct", **BASE},
               {"name": "qlora", "stage": "instruct", "quant": "nf4", **BASE}],
    "ddp": [{"name": "align", "stage": "align", **BASE}, {"name": "instruct", "stage": "instruct", **BASE},
            {"name": "qlora", "stage": "instruct", "quant": "nf4", **BASE}],
    "fsdp": [{"name": "align", "stage": "align", **BASE}, {"name": "instruct", "stage": "instruct", **BASE},
             {"name": "qlora", "stage": "instruct", "quant": "nf4", **BASE},
             {"name": "gc", "stage": "instruct", "gc": True, **BASE},
             {"name": "full", "stage": "instruct", "steps": 4, "global_batch": 4, "save_every": 2}],
}


def launch(trainer: str, devices: int, jobs: list[dict], out: Path) -> dict[str, dict]:
    cmd = [sys.executable, str(WORKER), "--trainer", trainer, "--devices", str(devices), "--out", str(out),
           "--jobs", json.dumps(jobs)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    if p.returncode != 0:
        raise AssertionError(f"{trainer} x{devices} failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
    return {j["name"]: torch.load(out / f"{j['name']}.pt", weights_only=False) for j in jobs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, dict]]:
    root = tmp_path_factory.mktemp("scale")
    res = {"single": launch("cpu", 1, JOBS["single"], root / "single"),
           "ddp": launch("ddp", 2, JOBS["ddp"], root / "ddp"),
           "fsdp": launch("fsdp", 2, JOBS["fsdp"], root / "fsdp"),
           "spawn": launch("ddp_spawn", 2, JOBS["ddp"][1:2], root / "spawn")}
    ckpt = root / "fsdp" / "full" / "step=2.ckpt"
    res["resume"] = launch("ddp", 1, [{"name": "resumed", "stage": "instruct", "steps": 4, "global_batch": 4,
                                       "resume": str(ckpt)}], root / "resume")
    res["ckpt"] = {"path": ckpt}
    return res


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_two_processes_equal_one_with_same_global_batch(runs, strategy, stage):
    one, two = runs["single"][stage], runs[strategy][stage]
    assert two["world"] == 2 and two["per_device_batch"] == 2 and one["per_device_batch"] == 4
    moved = max_diff(one["weights"], one["init"])
    assert moved > 1e-3  # the comparison below means something: training moved the weights
    assert max_diff(one["weights"], two["weights"]) < 1e-5  # gradients were averaged across ranks
    assert one["losses"] == pytest.approx(two["losses"], abs=1e-5)
    names = set(one["weights"])
    assert all(n.startswith("modalities.toy.adaptor.") or (stage == "instruct" and "lora_" in n) for n in names)


def test_ddp_spawn_trains_like_one_process_and_returns_weights_to_the_parent(runs):
    spawn = runs["spawn"]["instruct"]  # trained in spawned children; the parent holds rank 0's weights
    assert spawn["world"] == 2 and max_diff(runs["single"]["instruct"]["weights"], spawn["weights"]) < 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_qlora_trains_only_lora_and_adaptor_under_data_parallel(runs, strategy):
    one, two = runs["single"]["qlora"], runs[strategy]["qlora"]
    assert one["losses"][0] != pytest.approx(runs["single"]["instruct"]["losses"][0], abs=1e-4)  # 4-bit weights in use
    assert one["frozen_unchanged"] and two["frozen_unchanged"]  # 4-bit base weights bitwise unchanged
    assert max_diff(one["weights"], one["init"]) > 1e-3
    assert max_diff(one["weights"], two["weights"]) < 1e-3  # bf16 compute in the 4-bit layers
    assert set(two["weights"]) == set(runs["single"]["instruct"]["weights"])


def test_fsdp_shards_llm_and_adaptor_but_not_the_frozen_encoder(runs):
    r = runs["fsdp"]["instruct"]
    trainable = set(r["weights"])
    sharded = set(r["sharded"])
    assert trainable <= sharded  # every trainable weight is in an FSDP unit: its gradient is reduce-scattered
    assert any(".layers.0." in n and "base_layer" in n for n in sharded)  # frozen LLM weights sharded too
    assert not any(".encoder." in n for n in sharded)  # frozen encoder replicated
    assert set(r["optimizer_params"]) == trainable  # the optimizer sees only what trains
    assert not any(".encoder." in n for n in r["optimizer_params"])


def test_fsdp_gradient_checkpointing_gives_the_same_weights(runs):
    assert max_diff(runs["fsdp"]["gc"]["weights"], runs["single"]["instruct"]["weights"]) < 1e-5


def test_fsdp_checkpoint_holds_only_trainable_weights_in_torch_format(runs):
    ckpt = torch.load(runs["ckpt"]["path"], map_location="cpu", weights_only=True)
    trainable = set(runs["fsdp"]["full"]["weights"])
    assert set(ckpt["state_dict"]) == trainable
    assert ckpt["mmlm"]["stage"] == "instruct" and set(ckpt["mmlm"]["trainable"]) == trainable
    osd = ckpt["optimizer_states"][0]
    ids = [i for g in osd["param_groups"] for i in g["params"]]
    assert ids == list(range(len(trainable))) and set(osd["state"]) == set(ids)
    assert all(t.shape == ckpt["state_dict"][n].shape for n, t in runs["fsdp"]["full"]["weights"].items())


def test_fsdp_checkpoint_resumes_exactly_under_ddp_on_one_process(runs):
    full, resumed = runs["fsdp"]["full"], runs["resume"]["resumed"]
    assert resumed["world"] == 1 and resumed["per_device_batch"] == 4
    assert max_diff(full["weights"], resumed["weights"]) < 1e-6
    assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=1e-5)
