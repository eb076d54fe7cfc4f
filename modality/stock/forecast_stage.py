"""stage=forecast: pretrain a modality's encoder alone (the stock forecaster), then score it.

The modality is built without an LLM (``d_llm=None``: no adaptor) and trains with its own
Lightning hooks (modality/stock/plugin.py) on leak-free forecast windows (modality/stock/data/windows.py).
Checkpoints hold only the forecaster (``encoder.*``) plus the mmlm metadata, so
``stage=align init_from=<this run>`` loads it as ``modalities.stock.encoder.*``
(tasks.checkpoint.load_chain with ``prefix_for_stage``). After training the forecaster is
scored on the held-out test period next to persistence, drift, seasonal-naive and historical
volatility (modality/stock/metrics.py), overall and per series, and a few forecasts are
plotted into the run directory.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from llm.sharding import full_state_dict, is_sharded
from tasks.callbacks import RunStats
from tasks.checkpoint import TrainableOnlyCheckpoint, load_chain
from modality.stock.metrics import evaluate_by_series, format_report, plot_forecast

HEADLINE_ROWS = ("model", "persistence", "drift", "seasonal_naive")
HEADLINE_POINT = ("mae", "mase", "rel_mae", "direction_acc")
HEADLINE_VOL = ("model_vol", "historical_vol_20d", "historical_vol_context")


class ForecastStats(RunStats):
    """RunStats that counts forecast windows (the batches are dicts with ``x``, not token ids)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if isinstance(batch, dict) and "x" in batch and "input_ids" not in batch:
            self.samples += len(batch["x"])


def run_forecast(cfg: DictConfig, out: Path, instantiate_accepting: Callable[..., Any],
                 build_trainer: Callable[[DictConfig, Path, list[L.Callback]], L.Trainer]) -> dict[str, Any]:
    """Train the modality's encoder on ``cfg.data``; return the run's metrics (the runner writes them)."""
    from tasks.runner import UsageError  # runner imports this module lazily: no cycle

    modality = instantiate_accepting(cfg.modality, d_llm=None, target_rms=None)
    if type(modality).training_step is L.LightningModule.training_step:
        raise UsageError(f"stage=forecast pretrains a modality's own encoder; modality={modality.name} has none "
                         f"to pretrain (use stage=align)")
    if not cfg.stage.get("encoder", True):
        raise UsageError("stage=forecast with stage.encoder=false has nothing to train")
    modality.set_trainable(encoder=True, adaptor=False)
    optim = cfg.stage.get("optim")
    if optim is not None:  # stage.optim sets the lr of every stage, this one included
        modality.lr = float(optim.get("lr", modality.lr))
        modality.weight_decay = float(optim.get("weight_decay", modality.weight_decay))
    modality.strict_loading = False  # checkpoints hold only what trains
    chain: list[Path] = []
    if cfg.get("init_from"):  # continue pretraining from an earlier forecast run
        chain = load_chain(modality, cfg.init_from, None, [modality.name])
    dm = instantiate_accepting(cfg.data)
    dm.setup()
    meta = {"stage": "forecast", "llm": None, "modalities": [modality.name],
            "parent": str(chain[0]) if chain else None, "lora": None}
    stats = ForecastStats()
    trainer = build_trainer(cfg, out, [stats, TrainableOnlyCheckpoint(meta)])
    trainer.fit(modality, datamodule=dm, ckpt_path=cfg.get("resume"))

    metrics: dict[str, Any] = {"stage": "forecast", "modality": modality.name, "llm": None,
                               "init_from": [str(p) for p in chain]}
    metrics.update(stats.summary(trainer, modality))
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        metrics["checkpoint_mb"] = round(last.stat().st_size / 2**20, 3)
    if is_sharded(modality.encoder):  # trainer=fsdp: gather the weights (all ranks) into an unsharded copy
        weights = full_state_dict(modality.encoder)
        if trainer.is_global_zero:
            modality = instantiate_accepting(cfg.modality, d_llm=None, target_rms=None)
            modality.encoder.load_state_dict(weights)
    if not trainer.is_global_zero:
        return metrics
    test = dm.datasets["test"]
    metrics.update({"train_windows": len(dm.datasets["train"]), "test_windows": len(test),
                    "series": list(test.names), "skipped_series": list(dm.skipped)})
    report = evaluate_by_series(modality.encoder, test)
    overall = report.pop("ALL")
    metrics.update(headline(overall))
    metrics["forecast_test"] = overall
    metrics["forecast_test_by_series"] = report
    text = "== ALL test windows\n" + format_report(overall) + "".join(
        f"\n== {name}\n{format_report(rows)}" for name, rows in report.items())
    (out / "forecast_report.txt").write_text(text + "\n")
    print(text)
    metrics["plots"] = [str(p) for p in plot_examples(modality.encoder, test, out)]
    return metrics


def headline(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat ``test/<metric>/<row>`` numbers (printed by the runner) from a forecast_report table."""
    flat = {f"test/{m}/{r}": round(rows[r][m], 5) for r in HEADLINE_ROWS for m in HEADLINE_POINT if r in rows}
    flat.update({f"test/vol_mae_ann/{r}": round(rows[r]["vol_mae_ann"], 5) for r in HEADLINE_VOL if r in rows})
    return flat


@torch.no_grad()
def plot_examples(forecaster: torch.nn.Module, dataset, out: Path, n: int = 3) -> list[Path]:
    """Plot the middle test window of ``n`` series spread over the dataset: history, quantiles, truth."""
    if len(dataset) == 0:
        return []
    series = dataset.index[:, 0]
    names = sorted(set(series.tolist()))
    picks = [names[int(i)] for i in np.unique(np.linspace(0, len(names) - 1, min(n, len(names))).round())]
    device = next(forecaster.parameters()).device
    was_training = forecaster.training
    forecaster.eval()
    paths = []
    for s in picks:
        rows = np.flatnonzero(series == s)
        item = dataset[int(rows[len(rows) // 2])]
        q = forecaster(item["x"][None].to(device)).quantiles[0].cpu().numpy()  # [H, Q]
        name = dataset.names[int(item["series"])]
        date = dataset.frames[int(item["series"])].index[int(item["anchor"])].date()
        paths.append(plot_forecast(np.exp(item["history"].numpy()), q, out / f"forecast_{name}_{date}.png",
                                   future=item["target"].numpy(), levels=forecaster.cfg.quantiles,
                                   title=f"{name}: test-period forecast from {date}"))
    forecaster.train(was_training)
    return paths
