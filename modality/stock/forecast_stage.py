"""stage=forecast scores the forecaster it pretrained (the runner trains it: tasks.runner, a standalone stage).

The modality is built without an LLM (``d_llm=None``: no adaptor) and trains with its own Lightning hooks
(modality/stock/plugin.py) on leak-free forecast windows (modality/stock/data/windows.py). After training the
forecaster is scored on the held-out test period next to persistence, drift, seasonal-naive and historical
volatility (modality/stock/metrics.py), overall and per series, and a few forecasts are plotted into the run
directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modality.stock.metrics import evaluate_by_series, format_report, plot_forecast

HEADLINE_ROWS = ("model", "persistence", "drift", "seasonal_naive")
HEADLINE_POINT = ("mae", "mase", "rel_mae", "direction_acc")
HEADLINE_VOL = ("model_vol", "historical_vol_20d", "historical_vol_context")


def pretrain_report(modality: Any, dm: Any, out: Path) -> dict[str, Any]:
    """The held-out forecast table next to persistence, drift, seasonal-naive and historical volatility, overall
    and per series, and a few plotted forecasts (StockModality.pretrain_report)."""
    metrics: dict[str, Any] = {}
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
