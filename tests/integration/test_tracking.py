"""Experiment tracking and sweep summaries through the real config: a tiny stock forecaster (the cheapest stage,
~2 s of training) logged to csv + TensorBoard + offline wandb at once, and a 2-job ``train.py -m`` sweep."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

ROOT = Path(__file__).resolve().parents[2]
FORECAST = ["stage=forecast", "modality=stock", "modality.context=64", "modality.d_model=32", "modality.n_heads=2",
            "modality.n_layers=1", "modality.d_ff=64", "trainer.enable_model_summary=false", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "data.batch_size=8", "data.tickers=[IBM_2000]"]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: a wandb that tried the network would fail or hang


def cfg_for(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _offline_env(tmp: Path) -> dict[str, str]:
    """No API key, no WANDB_MODE, a base URL nothing answers at; wandb's own dirs inside the test's tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_BASE_URL=UNREACHABLE, WANDB_CONFIG_DIR=str(tmp / "wandb_config"),
               WANDB_CACHE_DIR=str(tmp / "wandb_cache"), WANDB_DATA_DIR=str(tmp / "wandb_data"))
    return env


def _commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()


def _wandb_offline(tmp_path, monkeypatch) -> None:
    """No WANDB_* from the caller's environment; the offline settings of ``_offline_env`` instead."""
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    for k, v in _offline_env(tmp_path).items():
        if k.startswith("WANDB_"):
            monkeypatch.setenv(k, v)


def test_every_logger_at_once_gets_config_commit_params_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks.runner import run

    _wandb_offline(tmp_path, monkeypatch)
    out = tmp_path / "run"
    metrics = run(cfg_for(FORECAST + ["logger=all", "stage.optim.lr=3e-4", f"paths.data_dir={tmp_path}/data",
                                      f"paths.output_dir={out}"]))
    commit = _commit()

    # csv: training metrics, the learning rate and the final metrics; hparams.yaml: config, commit, params
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss", "lr-AdamW", "final/steps", "final/test/mae/model"} <= set(rows[0])
    assert float(next(r for r in rows if r["final/steps"])["final/steps"]) == metrics["steps"] == 2
    hp = yaml.safe_load((out / "hparams.yaml").read_text())
    assert hp["stage"]["optim"]["lr"] == 3e-4 and hp["paths"]["output_dir"] == str(out)
    assert hp["git"]["commit"] == (commit or None)
    assert hp["params"] == {"trainable": metrics["trainable_params"], "total": metrics["total_params"],
                            "frozen": metrics["total_params"] - metrics["trainable_params"]}

    # TensorBoard: one event stream holding the same
    events = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    tags: set[str] = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "lr-AdamW", "final/steps", "final/test/mae/model"} <= tags
    assert yaml.safe_load((out / "tensorboard" / "hparams.yaml").read_text())["git"]["commit"] == (commit or None)

    # wandb: an offline run under the run dir (nothing sent), holding the commit and the final metrics
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"final/test/mae/model" in data and b"lr-AdamW" in data and b"trainable" in data
    if commit:
        assert commit.encode() in data


def test_multirun_writes_a_run_dir_per_job_and_a_ranked_summary(tmp_path):
    """Two jobs in one process, each with its own offline wandb run (the first is finished before the second)."""
    pytest.importorskip("wandb")
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "train.py", "-m", *FORECAST, "logger=[csv,wandb]", "stage.optim.lr=3e-4,1e-3",
                        f"paths.data_dir={tmp_path}/data", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").exists() and (sweep / job / "metrics.csv").exists()
        assert len(list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["stage.optim.lr"] for r in rows) == ["0.0003", "0.001"]
    assert [r["rank"] for r in rows] == ["1", "2"] and all(r["status"] == "ok" for r in rows)
    maes = [float(r["test/mae/model"]) for r in rows]
    assert maes == sorted(maes)  # a forecast sweep ranks by the held-out MAE, lowest first
    md = (sweep / "summary.md").read_text()
    assert "ranked by `test/mae/model` (lower is better)" in md
    assert "| stage.optim.lr |" in md and "| 0.0003 |" in md and "| 0.001 |" in md
    assert "sweep summary:" in p.stdout

    # the CLI rebuilds it, here with another ranking
    q = subprocess.run([sys.executable, "-m", "tasks.sweep", str(sweep), "--rank-by", "max:samples_per_second"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert q.returncode == 0, q.stderr
    assert "ranked by `samples_per_second` (higher is better)" in (sweep / "summary.md").read_text()


def test_a_run_that_never_trains_logs_its_metrics_and_sample_predictions(tmp_path, monkeypatch):
    """stage=evaluate builds no trainer: the loggers are made at the end, with a table of predictions."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks.tracking import RunTracking

    _wandb_offline(tmp_path, monkeypatch)
    cfg = cfg_for(["logger=all", f"paths.output_dir={tmp_path}"])
    rows = [{"id": i, "reference": f"ref {i}", "prediction": f"pred | {i}", "scores": [1, 2]} for i in range(20)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with RunTracking(cfg) as tracking:
        tracking.finish({"stage": "evaluate", "wer": 0.5, "eval_samples": 20, "ok": True})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"final/wer", "final/eval_samples"} <= set(acc.Tags()["scalars"]) and "final/ok" not in acc.Tags()["scalars"]
    text = acc.Tensors("predictions/predictions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| id | reference | prediction |") and "pred \\| 15" in text and "pred \\| 16" not in text
    assert "final/wer" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    data = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"predictions/predictions" in data and b"final/wer" in data
