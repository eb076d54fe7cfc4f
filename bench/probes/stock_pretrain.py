"""Short standalone forecaster pretraining + held-out report (a measuring tool, not the runner).

``python -m bench.probes.stock_pretrain --steps 300 --out /tmp/stock_fc`` trains StockModality's
forecaster with its own Lightning hooks on the packaged tickers' train segments, then
reports test-segment metrics next to persistence / drift / seasonal-naive baselines
(modality.stock.metrics), writes ``report.json``, a few ``forecast_*.png`` and
``forecaster.pt`` (loadable with ``StockModality(checkpoint=...)``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from modality.stock.data.windows import StockForecastDataModule
from modality.stock.plugin import StockModality
from modality.stock.metrics import evaluate_by_series, format_report, plot_forecast


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="packaged")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--horizon", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-stride", type=int, default=1, help="test window stride (1 = every day, overlapping)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size on a shared CPU)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(a.seed, verbose=False)
    dm = StockForecastDataModule(a.source, a.context, a.horizon, a.batch_size, eval_stride=a.eval_stride)
    dm.setup()
    model = StockModality(
        d_llm=None, context=a.context, horizon=a.horizon, d_model=a.d_model, n_layers=a.layers,
        n_heads=a.heads, d_ff=2 * a.d_model, lr=a.lr, train_encoder=True,
    )
    trainer = L.Trainer(
        max_steps=a.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
    )
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    train_s = time.time() - t0
    model.save_forecaster(out / "forecaster.pt")
    t0 = time.time()
    reports = evaluate_by_series(model.encoder, dm.datasets["test"])
    eval_s = time.time() - t0
    summary = {
        "steps": a.steps, "batch_size": a.batch_size, "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "params": sum(p.numel() for p in model.encoder.parameters()),
        "train_windows": len(dm.datasets["train"]), "test_windows": len(dm.datasets["test"]),
        "series": dm.datasets["test"].names, "skipped": dm.skipped, "reports": reports,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "reports"}))
    for name, rows in reports.items():
        print(f"== {name}\n{format_report(rows)}")
    ds = dm.datasets["test"]
    rng = np.random.default_rng(a.seed)
    model.encoder.eval()
    for k in rng.choice(len(ds), size=min(3, len(ds)), replace=False):
        item = ds[int(k)]
        with torch.no_grad():
            q = model.encoder(item["x"][None]).quantiles[0].numpy()
        name = ds.names[int(item["series"])]
        date = ds.frames[int(item["series"])].index[int(item["anchor"])].date()
        plot_forecast(np.exp(item["history"].numpy()), q, out / f"forecast_{name}_{date}.png",
                      future=item["target"].numpy(), levels=model.cfg.quantiles, title=f"{name} from {date}")
    return summary


if __name__ == "__main__":
    main()
