"""Held-out forecast metrics for the stock forecaster, side by side with naive baselines.

Everything is in log-price space: a forecast of the cumulative log return ``c_h`` over
``h = 1..H`` days is a forecast of ``log P_{t+h} = log P_t + c_h``. Baselines:

- persistence (last value): ``c_h = 0`` — the random-walk forecast, hard to beat on prices;
- drift: ``c_h = h * mean daily log return of the context``;
- seasonal naive (season ``m``, default 5 trading days = one week):
  ``log P_{t+h} = log P_{t+h-m*ceil(h/m)}``.

MASE divides each window's MAE by the in-sample one-step naive MAE of that window's
context (Hyndman & Koehler 2006), so a random walk scores ~ mean_h sqrt(h) * 1 for
persistence at multi-step horizons; ``rel_mae`` (MAE / persistence MAE on the same
windows) < 1 means "beats persistence". Volatility forecasts are compared with the
historical realised volatility of the last 20 days and of the whole context (zero-mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def baselines(history: np.ndarray, horizon: int, season: int = 5) -> dict[str, np.ndarray]:
    """history [N, L] log prices (anchor last) -> {name: cumulative log-return forecasts [N, H]}."""
    history = np.asarray(history, dtype=np.float64)
    n, length = history.shape
    steps = np.arange(1, horizon + 1)
    drift = np.diff(history, axis=1).mean(1, keepdims=True) * steps  # [N, H]
    back = steps - season * np.ceil(steps / season).astype(int)  # <= 0 offsets from the anchor
    if -back.min() >= length:
        raise ValueError(f"seasonal naive needs history longer than {-back.min()} rows, got {length}")
    seasonal = history[:, length - 1 + back] - history[:, -1:]
    return {"persistence": np.zeros((n, horizon)), "drift": drift, "seasonal_naive": seasonal}


def point_metrics(pred: np.ndarray, true: np.ndarray, history: np.ndarray) -> dict[str, float]:
    """MAE, MASE and direction accuracy of point forecasts pred/true [N, H] (log returns).

    Direction is the sign of the cumulative return at the last horizon step; a forecast of
    exactly 0 counts as half right (persistence has no direction).
    """
    err = np.abs(pred - true)  # [N, H]
    scale = np.abs(np.diff(history, axis=1)).mean(1)  # [N] in-sample naive MAE
    mase = err.mean(1) / np.maximum(scale, 1e-12)
    p, t = np.sign(pred[:, -1]), np.sign(true[:, -1])
    hits = np.where(p == 0, 0.5, (p == t).astype(np.float64))
    return {"mae": float(err.mean()), "mase": float(mase.mean()), "direction_acc": float(hits.mean())}


def quantile_coverage(q_pred: np.ndarray, true: np.ndarray, levels: Sequence[float]) -> dict[str, float]:
    """Share of outcomes below each quantile (ideal = its level) and inside the outer band."""
    q_pred = np.asarray(q_pred)
    out = {f"below_q{lvl:g}": float((true < q_pred[..., i]).mean()) for i, lvl in enumerate(levels)}
    if len(levels) >= 2:
        inside = (true >= q_pred[..., 0]) & (true <= q_pred[..., -1])
        out[f"coverage_{levels[-1] - levels[0]:.0%}"] = float(inside.mean())
    return out


def pinball(q_pred: np.ndarray, true: np.ndarray, levels: Sequence[float]) -> float:
    """Mean pinball loss of quantile forecasts [N, H, Q] in log-return units."""
    d = true[..., None] - q_pred
    lv = np.asarray(levels)
    return float(np.maximum(lv * d, (lv - 1) * d).mean())


def vol_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAE (annualised, vol points) and mean |log error| of daily vol forecasts [N]."""
    ann = math.sqrt(252.0)
    return {
        "vol_mae_ann": float(np.abs(pred - true).mean() * ann),
        "vol_log_mae": float(np.abs(np.log(pred + 1e-12) - np.log(true + 1e-12)).mean()),
    }


def historical_vol(history: np.ndarray, n: int = 20) -> np.ndarray:
    """Zero-mean realised daily vol of the last ``n`` returns of each history row [N, L] -> [N]."""
    r = np.diff(np.asarray(history, dtype=np.float64), axis=1)[:, -n:]
    return np.sqrt((r**2).mean(1))


def forecast_report(
    history: np.ndarray,
    true: np.ndarray,
    q_pred: np.ndarray,
    levels: Sequence[float],
    vol_pred: np.ndarray | None = None,
    vol_true: np.ndarray | None = None,
    season: int = 5,
) -> dict[str, dict[str, float]]:
    """Rows model / persistence / drift / seasonal_naive (and vol rows) of the metrics above.

    The model's point forecast is its median quantile (or the middle one).
    """
    history, true, q_pred = (np.asarray(a, dtype=np.float64) for a in (history, true, q_pred))
    levels = list(levels)
    mid = int(np.argmin(np.abs(np.asarray(levels) - 0.5)))
    forecasts = {"model": q_pred[..., mid], **baselines(history, true.shape[1], season)}
    rows = {name: point_metrics(f, true, history) for name, f in forecasts.items()}
    base = rows["persistence"]["mae"]
    for r in rows.values():
        r["rel_mae"] = r["mae"] / base if base > 0 else float("nan")
    rows["model"].update(quantile_coverage(q_pred, true, levels))
    rows["model"]["pinball"] = pinball(q_pred, true, levels)
    rows["model"]["n_windows"] = float(len(true))
    rows["model"]["up_rate"] = float((true[:, -1] > 0).mean())
    if vol_pred is not None and vol_true is not None:
        rows["model_vol"] = vol_metrics(np.asarray(vol_pred), np.asarray(vol_true))
        rows["historical_vol_20d"] = vol_metrics(historical_vol(history), np.asarray(vol_true))
        rows["historical_vol_context"] = vol_metrics(historical_vol(history, history.shape[1]), np.asarray(vol_true))
    return rows


def format_report(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one line per row name, metrics as key=value."""
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  " + "  ".join(f"{m}={v:.4g}" for m, v in r.items()) for k, r in rows.items())


@torch.no_grad()
def predict(forecaster: torch.nn.Module, loader) -> dict[str, np.ndarray]:
    """Run a forecaster over a loader of StockWindows batches -> stacked numpy arrays."""
    was_training = forecaster.training
    forecaster.eval()
    keys = ("history", "target", "vol_target", "series", "anchor")
    acc: dict[str, list] = {k: [] for k in keys + ("quantiles", "vol")}
    device = next(forecaster.parameters()).device  # trained on an accelerator: batches follow the model
    for batch in loader:
        out = forecaster(batch["x"].to(device))
        acc["quantiles"].append(out.quantiles.double().cpu().numpy())
        acc["vol"].append(out.vol.double().cpu().numpy())
        for k in keys:
            acc[k].append(batch[k].numpy())
    forecaster.train(was_training)
    return {k: np.concatenate(v) for k, v in acc.items()}


def evaluate(forecaster: torch.nn.Module, loader, season: int = 5) -> dict[str, dict[str, float]]:
    """:func:`forecast_report` of a forecaster on every window of ``loader``."""
    p = predict(forecaster, loader)
    levels = forecaster.cfg.quantiles
    return forecast_report(p["history"], p["target"], p["quantiles"], levels, p["vol"], p["vol_target"], season)


def evaluate_by_series(forecaster: torch.nn.Module, dataset, batch_size: int = 256, season: int = 5) -> dict[str, dict]:
    """{"ALL": report over every window, <series name>: report} for a StockWindows dataset."""
    from torch.utils.data import DataLoader

    p = predict(forecaster, DataLoader(dataset, batch_size=batch_size))
    levels = forecaster.cfg.quantiles
    out = {}
    for name, sel in [("ALL", np.ones(len(p["target"]), bool))] + [
        (n, p["series"] == i) for i, n in enumerate(dataset.names)
    ]:
        if sel.any():
            out[name] = forecast_report(
                p["history"][sel], p["target"][sel], p["quantiles"][sel], levels, p["vol"][sel], p["vol_target"][sel], season
            )
    return out


def plot_forecast(
    history: np.ndarray,
    quantiles: np.ndarray,
    path: str | Path,
    future: np.ndarray | None = None,
    levels: Sequence[float] = (0.1, 0.5, 0.9),
    title: str | None = None,
) -> Path:
    """Save a PNG of a price history [L] with quantile price forecasts [H, Q] (and the truth [H]).

    Prices, not log prices: ``quantiles`` are cumulative log returns from the last history value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = np.asarray(history, dtype=np.float64)
    q = history[-1] * np.exp(np.asarray(quantiles, dtype=np.float64))  # [H, Q]
    t_hist = np.arange(len(history))
    t_fut = np.arange(len(history), len(history) + q.shape[0])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t_hist, history, color="black", lw=1, label="history")
    ax.fill_between(t_fut, q[:, 0], q[:, -1], color="tab:blue", alpha=0.25, label=f"q{levels[0]:g}-q{levels[-1]:g}")
    ax.plot(t_fut, q[:, q.shape[1] // 2], color="tab:blue", lw=1.5, label="median")
    if future is not None:
        ax.plot(t_fut, history[-1] * np.exp(np.asarray(future)), color="tab:red", lw=1, label="actual")
    ax.set_xlabel("trading day")
    ax.set_ylabel("price")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
