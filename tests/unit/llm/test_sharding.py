"""Scale-out in one process: early one-line errors, the trainer configs, the FSDP2 layout on a
1-rank gloo group, activation checkpointing, and the bad-input refusals the issue lists."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from llm.lora import LoraSpec, apply_lora
from llm.plan import SavedTensorMeter
from llm.sharding import (FSDP2Strategy, SpawnDDPStrategy, _SyncExitLauncher, check_scale, decoder_layers,
                          leave_process_group, shard_multimodal, world_size)
from tasks.checkpoint import META_KEY, load_chain
from tests.unit.helpers import batch_for, build, toy_records

CONF = Path(__file__).resolve().parents[3] / "conf"
CPU = dict(strategy=None, accelerator="cpu", devices=1, num_nodes=1, precision="32-true", quant=None, batch_size=4)


def trainer_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides)).trainer


def one_line_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------ early validation
def test_batch_size_is_per_device_and_global_batch_must_divide():
    s = check_scale(**{**CPU, "devices": 2, "num_nodes": 2})
    assert (s.world_size, s.per_device_batch, s.global_batch) == (4, 4, 16)
    s = check_scale(**{**CPU, "devices": 2, "num_nodes": 2, "accumulate": 2}, global_batch_size=32)
    assert (s.per_device_batch, s.global_batch) == (4, 32)
    one_line_error(lambda: check_scale(**{**CPU, "devices": 3}, global_batch_size=8),
                   r"global_batch_size=8 is not divisible by world size 3")
    one_line_error(lambda: check_scale(**{**CPU, "devices": 4}, global_batch_size=2), "not divisible")


def test_impossible_strategy_precision_devices_are_refused():
    one_line_error(lambda: check_scale(**{**CPU, "strategy": "fsdp"}), "Lightning's FSDP1 .* use trainer=fsdp")
    one_line_error(lambda: check_scale(**{**CPU, "strategy": {"_target_": "lightning.pytorch.strategies.FSDPStrategy"}}),
                   "FSDP1")
    one_line_error(lambda: check_scale(**{**CPU, "precision": "16-mixed"}), "fp16 needs a CUDA GPU")
    one_line_error(lambda: check_scale(**{**CPU, "precision": "bf17"}), "trainer.precision=bf17")
    one_line_error(lambda: check_scale(**{**CPU, "devices": 0}), "trainer.devices=0")
    one_line_error(lambda: check_scale(**{**CPU, "num_nodes": 0}), "trainer.num_nodes=0")
    one_line_error(lambda: check_scale(**{**CPU, "quant": "int3"}), "llm.model.quant='int3'")
    assert world_size([0, 1, 2], 2) == 6 and world_size("auto", 1, "cpu") == 1


# ------------------------------------------------------------------ configs
def test_trainer_configs_compose_and_build_their_strategies():
    from lightning.pytorch.strategies import DDPStrategy

    fsdp = trainer_cfg("trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed")
    trainer = instantiate(fsdp, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, FSDP2Strategy) and trainer.world_size == 2
    assert trainer.strategy.shard_kwargs == {"param_dtype": None, "reduce_dtype": None, "reshard_after_forward": True}
    ddp = instantiate(trainer_cfg("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu").strategy)
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is False
    spawn = instantiate(trainer_cfg("trainer=ddp_spawn", "trainer.devices=2", "trainer.accelerator=cpu"),
                        logger=False, enable_progress_bar=False)
    assert isinstance(spawn.strategy, SpawnDDPStrategy) and spawn.strategy._start_method == "spawn"
    assert isinstance(spawn.strategy.launcher, _SyncExitLauncher)  # ranks leave the group together
    assert trainer_cfg("trainer=gpu").precision == "bf16-mixed"
    with pytest.raises(ValueError, match="save_distributed_checkpoint"):
        FSDP2Strategy(save_distributed_checkpoint=True)
    with pytest.raises(ValueError, match="param_dtype='fp8'"):
        FSDP2Strategy(param_dtype="fp8")


# ------------------------------------------------------------------ FSDP2 layout (1 rank, gloo)
@pytest.fixture()
def gloo_world():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_spawned_rank_leaves_the_process_group_at_its_end(gloo_world):
    import torch.distributed as dist

    leave_process_group()
    assert not dist.is_initialized()  # nothing left for the exit-time teardown to race over
    leave_process_group()  # and a second call (no group) is a no-op


def test_fsdp2_layout_shards_llm_and_adaptor_not_frozen_encoder(tiny_lm, toy_modality, gloo_world):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model = build(tiny_lm, toy_modality, "instruct")
    batch = batch_for(model, toy_records(3))
    ref = model(batch)["loss"].detach()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    shard_multimodal(model, gloo_world)
    shard_multimodal(model, gloo_world)  # idempotent
    assert isinstance(model, FSDPModule) and all(isinstance(m, FSDPModule) for m in decoder_layers(model.llm))
    kinds = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
    assert not any(v for n, v in kinds.items() if ".encoder." in n)  # frozen encoder: replicated, plain tensors
    assert all(kinds[n] for n in trainable)  # adaptor + LoRA: in FSDP units, gradients reduced
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    loss = model(batch)["loss"]
    loss.backward()
    assert torch.allclose(loss.detach(), ref, atol=1e-6)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


# ------------------------------------------------------------------ activation checkpointing
def _loss_grads_memory(lm, modality, stage: str):
    model = build(lm, modality, stage)
    model.train()
    batch = batch_for(model, toy_records(4))
    with SavedTensorMeter(model) as meter:
        loss = model(batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, meter.bytes


@pytest.mark.parametrize("stage", ["instruct", "align"])
def test_gradient_checkpointing_same_loss_and_grads_less_memory(stage):
    from llm.loader import load_llm
    from tests.conftest import ToyModality

    out = []
    for gc in (False, True):
        lm = load_llm(tiny=dict(hidden_size=64, layers=2, heads=4, intermediate_size=128), gradient_checkpointing=gc)
        torch.manual_seed(0)
        toy = ToyModality()
        torch.manual_seed(1)
        out.append(_loss_grads_memory(lm, toy, stage))
    (l0, g0, m0), (l1, g1, m1) = out
    assert torch.allclose(l0, l1, atol=1e-6)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
    backbone_share = m0 - m1  # what checkpointing saves; the fp32 log-softmax over 49k vocab remains
    assert backbone_share > 0.5 * 2 * 46 * 4 * 3000  # most of ~3 KB/token/layer (fp32, h=64) freed


def test_frozen_llm_with_checkpointing_trains_mode_but_no_dropout():
    """align + checkpointing: HF needs training mode to checkpoint, a frozen LLM must still not drop out."""
    from llm.loader import load_llm
    from tests.conftest import ToyModality

    lm = load_llm(tiny=dict(hidden_size=64, layers=2, heads=4, intermediate_size=128), gradient_checkpointing=True)
    lm.model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.5))  # a dropout the LLM might have
    model = build(lm, ToyModality(), "align")
    model.train()
    assert model.llm.training and model.llm.model.layers[0].training  # checkpointing stays on
    assert not model.llm.model.layers[0].mlp.drop.training            # ... and no dropout on frozen weights
    model.eval()
    assert not model.llm.training


# ------------------------------------------------------------------ bad input named in the issue
def test_lora_targets_matching_nothing_is_an_error(tiny_lm):
    msg = one_line_error(lambda: apply_lora(tiny_lm.model, LoraSpec(targets=["q_proj", "qkv_fused"])),
                         "'qkv_fused' matches no linear layer")
    assert "q_proj" in msg  # shows real names to pick from


@pytest.mark.parametrize("meta, match", [
    ({"llm": "meta-llama/Llama-3.1-8B-Instruct", "modalities": ["toy"]}, "trained with llm=meta-llama"),
    ({"llm": None, "modalities": ["speech"]}, r"trained with modality \['speech'\]"),
])
def test_checkpoint_from_another_llm_or_modality_is_refused(tiny_lm, toy_modality, tmp_path, meta, match):
    model = build(tiny_lm, toy_modality, "align")
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, META_KEY: {"stage": "align", "parent": None, **meta}}, path)
    msg = one_line_error(lambda: load_chain(model, path, tiny_lm.name, ["toy"]), match)
    assert str(path) in msg
