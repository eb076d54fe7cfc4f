"""Experiment tracking: every logger the config names (``logger=csv|tensorboard|wandb``, several at once with
``logger=[csv,tensorboard]`` or ``logger=all``) gets the resolved config, the git commit, trainable / frozen
parameter counts, what the run logs while it trains (losses, lr, periodic evaluations), its final metrics
(metrics.json's numbers, as ``final/<key>``) and a few sample predictions.

Why one module: runs compare only when each tracker holds the same facts; metrics.json stays the record of truth.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
PREDICTION_ROWS = 16  # sample predictions sent to the trackers (all of them are in predictions.jsonl)

_active: RunTracking | None = None  # the run now inside tasks.runner.run: build_trainer takes its loggers


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> Logger:
    """Lightning's WandbLogger that never waits on the network unless asked: offline (files under
    ``<save_dir>/wandb/offline-run-*``, `wandb sync` them later) when ``offline`` is null and there is no
    WANDB_API_KEY; an explicit WANDB_MODE (online, offline, disabled) wins over the key."""
    try:
        import wandb  # noqa: F401
    except ImportError as e:  # a ValueError: train.py prints it as one line
        raise ValueError("logger=wandb needs wandb: pip install -e '.[track]'") from e
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        mode = os.environ.get("WANDB_MODE")
        offline = mode in ("offline", "dryrun") if mode else not os.environ.get("WANDB_API_KEY")
    if offline:
        kwargs.setdefault("mode", "offline")  # wandb.init's own switch: nothing is sent, no login is asked for
    return WandbLogger(offline=bool(offline), **kwargs)


def make_loggers(node: Any) -> list[Logger]:
    """The loggers of a ``logger:`` node: one ``_target_`` node, or a mapping of them (null entries skipped)."""
    if not node:
        return []
    if "_target_" in node:
        return [instantiate(node)]
    return [instantiate(v) for v in node.values() if v]


def loggers_for(cfg: DictConfig) -> list[Logger]:
    """The loggers of the run being tracked (made once per run: one wandb run, one event file), else new ones."""
    if _active is not None and _active.cfg is cfg:
        return _active.loggers
    return make_loggers(cfg.get("logger"))


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the code that ran (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                               check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config (without Hydra's own node) plus the command-line overrides."""
    from hydra.core.hydra_config import HydraConfig

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - any interpolation that fails outside its Hydra job: keep it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)
    if HydraConfig.initialized():
        config["overrides"] = " ".join(HydraConfig.get().overrides.task)
    return config


def param_counts(module: Any) -> dict[str, int]:
    params = list(module.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def log_hyperparams(loggers: list[Logger], cfg: DictConfig, module: Any = None,
                    params: Mapping[str, int] | None = None) -> None:
    """Config, git state and parameter counts, to each logger's hyperparameters."""
    if not loggers or rank_zero_only.rank != 0:
        return
    hp: dict[str, Any] = {**run_config(cfg), "git": git_state()}
    counts = param_counts(module) if module is not None else dict(params or {})
    if counts:
        hp["params"] = counts
    for lg in loggers:
        lg.log_hyperparams(hp)


class TrackRun(L.Callback):
    """Logs the hyperparameters when fit starts: parameter counts are those of the module as it trains."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log_hyperparams(trainer.loggers, self.cfg, pl_module)
            if _active is not None and _active.cfg is self.cfg:
                _active.logged_hparams = True


def tracking_callbacks(cfg: DictConfig, loggers: list[Logger]) -> list[L.Callback]:
    """What a trainer with loggers adds: the hyperparameters and the learning rate of every param group."""
    if not loggers:
        return []
    from lightning.pytorch.callbacks import LearningRateMonitor

    return [TrackRun(cfg), LearningRateMonitor(logging_interval="step")]


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json's numbers as ``final/<key>`` (bools and nested values stay in metrics.json)."""
    return {f"final/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def sample_predictions(path: Path, n: int = PREDICTION_ROWS) -> tuple[list[str], list[list[Any]]]:
    """The first ``n`` rows of a predictions.jsonl as (columns, rows); columns are the first row's plain values."""
    if not path.exists():
        return [], []
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= n:
                break
    if not rows:
        return [], []
    columns = [k for k, v in rows[0].items() if isinstance(v, (str, int, float, bool)) or v is None]
    return columns, [[r.get(c) for c in columns] for r in rows]


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def log_predictions(loggers: list[Logger], path: Path, step: int) -> None:
    """A table of sample predictions: a wandb.Table, TensorBoard markdown text (CSV: predictions.jsonl is it)."""
    columns, rows = sample_predictions(path)
    if not rows:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_table(key=f"predictions/{path.stem}", columns=columns, data=[[str(v) for v in r] for r in rows],
                         step=step)
        elif isinstance(lg, TensorBoardLogger):
            md = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                            *("| " + " | ".join(_cell(v) for v in r) + " |" for r in rows)])
            lg.experiment.add_text(f"predictions/{path.stem}", md, global_step=step)


class RunTracking:
    """One run's loggers: made when first needed (by the trainer, or at the end of a run that never trains),
    given the final metrics and closed when the run ends, so the next job of a sweep starts its own wandb run."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._loggers: list[Logger] | None = None
        self.logged_hparams = False
        self._previous: RunTracking | None = None

    @property
    def loggers(self) -> list[Logger]:
        if self._loggers is None:
            self._loggers = make_loggers(self.cfg.get("logger"))
        return self._loggers

    def __enter__(self) -> Self:
        global _active
        self._previous, _active = _active, self
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _active
        _active = self._previous
        self.close(failed=exc_type is not None)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Send the run's final metrics (and sample predictions) to every logger; returns ``metrics``."""
        if rank_zero_only.rank != 0 or not self.cfg.get("logger"):
            return metrics
        loggers = self.loggers
        if not self.logged_hparams:  # a run that never trained (stage=evaluate)
            counts = {}
            if metrics.get("total_params") is not None:
                counts = {"trainable": metrics["trainable_params"], "total": metrics["total_params"],
                          "frozen": metrics["total_params"] - metrics["trainable_params"]}
            log_hyperparams(loggers, self.cfg, params=counts)
        step = int(metrics.get("steps") or 0)
        for lg in loggers:
            lg.log_metrics(final_metrics(metrics), step=step)
        out = Path(self.cfg.paths.output_dir)
        try:
            log_predictions(loggers, out / "predictions.jsonl", step)
        except Exception as e:  # noqa: BLE001 - a table is a convenience: never fail a finished run over it
            log.warning("sample predictions not logged: %s", e)
        return metrics

    def close(self, failed: bool = False) -> None:
        """Write every logger to disk; end the wandb run (in-process sweep jobs must not share one)."""
        for lg in self._loggers or []:
            try:
                lg.finalize("failed" if failed else "success")
                lg.save()
                if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
                    lg.experiment.finish(exit_code=1 if failed else 0)
                elif hasattr(getattr(lg, "_experiment", None), "close"):
                    lg.experiment.close()  # TensorBoard's event file
            except Exception as e:  # noqa: BLE001 - one logger failing to close must not lose the others
                log.warning("closing logger %s: %s", type(lg).__name__, e)
        self._loggers = None if self._loggers is None else []
