"""One multi-process training run for the distributed tests (not collected by pytest).

``python tests/distributed/_worker.py --trainer fsdp --devices 2 --out DIR --jobs JSON``

Lightning's DDP / FSDP2 launcher re-runs this very script once per extra rank (as it re-runs
train.py), so every rank runs the same jobs in the same order. Each job builds a tiny Llama +
the toy modality from a fixed seed (identical on every rank; FSDP2 does not broadcast), trains
``steps`` optimizer steps of ``global_batch`` samples (``global_batch / world`` per rank), and
rank 0 saves ``DIR/<name>.pt`` = {"weights": trainable weights (full), "losses": global mean
loss per step, "seconds": fit time}. The Trainer comes from the real Hydra configs in conf/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MMLM_ROOT", str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

TINY = {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128}


class LossRecorder(L.Callback):
    """Global mean training loss per step (all ranks take part in the reduction)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(trainer.strategy.reduce(loss.detach(), reduce_op="mean")))


def trainer_config(trainer: str, devices: int, precision: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer={trainer}", f"trainer.devices={devices}",
                                          "trainer.accelerator=cpu", f"trainer.precision={precision}"])
    return cfg.trainer


from tests.conftest import ToyModality  # noqa: E402


class PaddingSafeToy(ToyModality):
    """The conftest ToyModality with padded frames zeroed after its encoder, so a sample's embeddings
    do not depend on what it is batched with (a rank's half batch must match the full batch).
    Module level, so ddp_spawn can pickle it."""

    def encode_frozen(self, features, mask):
        return self.encoder(features) * mask[..., None].to(features), mask.sum(1)


def build_model(job: dict):
    from llm.loader import load_llm
    from llm.quant import quantize_linear_layers
    from tests.unit.helpers import build

    L.seed_everything(0, verbose=False)
    lm = load_llm(tiny=TINY, gradient_checkpointing=bool(job.get("gc")))
    if job.get("quant"):
        quantize_linear_layers(lm.model, job["quant"])
    torch.manual_seed(0)
    modality = PaddingSafeToy()
    torch.manual_seed(1)  # LoRA init
    return build(lm, modality, job["stage"], lr=job.get("lr", 1e-2))


def run_job(job: dict, tcfg, out: Path) -> None:
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from data.collate import ConversationCollator
    from data.dataset import ConversationDataset
    from llm.sharding import check_scale, trainable_state_dict
    from tasks.checkpoint import TrainableOnlyCheckpoint
    from tests.unit.helpers import toy_records

    scale = check_scale(strategy=tcfg.get("strategy"), accelerator="cpu", devices=tcfg.devices,
                        num_nodes=tcfg.num_nodes, precision=tcfg.precision, quant=job.get("quant"),
                        batch_size=1, global_batch_size=job["global_batch"])
    model = build_model(job)
    mods = dict(model.modalities)
    ds = ConversationDataset(toy_records(job.get("n_records", 8)), mods)
    # Distributed training always shuffles with DistributedSampler(seed=PL_GLOBAL_SEED); one process
    # uses the same sampler so that step k sees the same global batch at every world size.
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0) if scale.world_size == 1 else None
    loader = DataLoader(ds, batch_size=scale.per_device_batch, sampler=sampler,
                        collate_fn=ConversationCollator(model.tokenizer, mods, model.placeholder_ids))
    rec = LossRecorder()
    callbacks = [rec, TrainableOnlyCheckpoint({"stage": job["stage"], "llm": model.llm_name, "modalities": list(mods)})]
    if job.get("save_every"):
        callbacks.append(ModelCheckpoint(dirpath=out / job["name"], filename="{step}", save_top_k=-1,
                                         every_n_train_steps=job["save_every"], save_last=True))
    trainer = instantiate(tcfg, max_steps=job["steps"], callbacks=callbacks, logger=False,
                          enable_checkpointing=bool(job.get("save_every")), enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(out), limit_val_batches=0,
                          log_every_n_steps=1, gradient_clip_val=job.get("clip", tcfg.gradient_clip_val))
    init = trainable_state_dict(model)
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader, ckpt_path=job.get("resume"))
    seconds = time.perf_counter() - t0
    weights = trainable_state_dict(model)  # collective under FSDP2
    names = {id(p): n for n, p in model.named_parameters()}
    unchanged = frozen_unchanged(model, job)  # collective under FSDP2
    if trainer.is_global_zero:
        torch.save({"weights": weights, "init": init, "losses": rec.losses, "seconds": seconds,
                    "world": trainer.world_size, "per_device_batch": scale.per_device_batch,
                    "sharded": [n for n, p in model.named_parameters() if type(p.data).__name__ == "DTensor"],
                    "optimizer_params": [names[id(p)] for o in trainer.optimizers[:1] for g in o.param_groups for p in g["params"]],
                    "frozen_unchanged": unchanged},
                   out / f"{job['name']}.pt")


def frozen_unchanged(model, job: dict) -> bool:
    """Frozen weights (4-bit included) equal a freshly built model's: training touched only what trains."""
    fresh = dict(build_model(job).named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        ref = fresh[n].detach()
        if t.dtype != ref.dtype and job.get("quant") is None:
            ref = ref.to(t.dtype)
        # bitwise: 4-bit codes packed into bf16 can spell NaN, and NaN != NaN
        if t.shape != ref.shape or not torch.equal(t.cpu().contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8)):
            if os.environ.get("MMLM_DEBUG"):
                print("DIFF", n, t.shape, ref.shape, t.dtype, ref.dtype, flush=True)
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", default="cpu")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", required=True, help="JSON list of job dicts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = trainer_config(args.trainer, args.devices, args.precision)
    for job in json.loads(args.jobs):
        run_job(job, tcfg, out)


if __name__ == "__main__":
    main()
