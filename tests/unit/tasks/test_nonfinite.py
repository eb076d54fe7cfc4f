"""A NaN/inf loss or gradient stops training naming the step, before the update and before any checkpoint of it
(tasks.callbacks.NonFiniteGuard); on_nonfinite=skip drops such updates and lists them."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tasks.callbacks import NonFiniteError, NonFiniteGuard, RunStats


class Diverging(L.LightningModule):
    """Loss NaN at the given 1-based optimizer steps; with ``inf_grad_at`` the gradient goes inf, the loss not."""

    def __init__(self, nan_at: tuple[int, ...] = (), inf_grad_at: tuple[int, ...] = ()):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Linear(2, 1)
        self.nan_at, self.inf_grad_at = nan_at, inf_grad_at
        self.seen: dict[int, torch.Tensor] = {}  # weights at the end of each step

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step + 1
        loss = self.w(batch).pow(2).mean()
        if step in self.inf_grad_at:
            self.w.weight.register_hook(lambda g: g * float("inf"))
        return loss * float("nan") if step in self.nan_at else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.seen[self.trainer.global_step] = self.w.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=2)


def fit(module, callbacks, tmp_path, max_steps=5, ckpt_path=None):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="step{step}", every_n_train_steps=1,
                           save_top_k=-1, save_last=True)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt, *callbacks], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_a_nan_loss_stops_naming_the_step_before_any_checkpoint_of_it(tmp_path):
    module = Diverging(nan_at=(3,))
    with pytest.raises(NonFiniteError, match=r"^step 3: loss is nan; training stopped before this update"):
        fit(module, [NonFiniteGuard()], tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt")) == ["stepstep=1.ckpt", "stepstep=2.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and torch.isfinite(last["state_dict"]["w.weight"]).all()
    assert torch.isfinite(module.w.weight).all() and torch.equal(module.w.weight.detach(), module.seen[2])


def test_an_inf_gradient_with_a_finite_loss_is_named_too(tmp_path):
    with pytest.raises(NonFiniteError, match=r"^step 2: gradient of w\.weight is not finite"):
        fit(Diverging(inf_grad_at=(2,)), [NonFiniteGuard()], tmp_path)


def test_skip_policy_drops_the_update_counts_it_and_trains_on(tmp_path):
    module, guard, stats = Diverging(nan_at=(2, 4)), NonFiniteGuard("skip"), RunStats()
    trainer = fit(module, [guard, stats], tmp_path, max_steps=5)
    assert trainer.global_step == 5 and guard.skipped == [2, 4]
    assert guard.metrics() == {"nonfinite_skipped": 2, "nonfinite_steps": [2, 4]}
    assert torch.equal(module.seen[2], module.seen[1]) and torch.equal(module.seen[4], module.seen[3])  # no update
    assert not torch.equal(module.seen[3], module.seen[2]) and torch.isfinite(module.w.weight).all()  # trains on
    assert len(stats.losses) == 3 and all(torch.isfinite(torch.tensor(stats.losses)))  # skipped losses left out
    # a resumed run reports the whole history
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["NonFiniteGuard"] == {
        "skipped": [2, 4]}


def test_non_finite_weights_are_never_saved_nor_resumed(tmp_path):
    module = Diverging()
    trainer = fit(module, [NonFiniteGuard()], tmp_path, max_steps=1)
    good = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    with torch.no_grad():
        module.w.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"not saving a checkpoint: weight w\.bias holds non-finite"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
    good["state_dict"]["w.weight"][0, 0] = float("nan")
    torch.save(good, tmp_path / "nan.ckpt")
    with pytest.raises(NonFiniteError, match=r"resume: .* weight w\.weight holds non-finite"):
        fit(Diverging(), [NonFiniteGuard()], tmp_path / "again", max_steps=3, ckpt_path=tmp_path / "nan.ckpt")


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite=ignore: must be error or skip"):
        NonFiniteGuard("ignore")
