"""Sweep summaries: ``python train.py -m ...`` ends with ``<sweep dir>/summary.csv`` and ``summary.md``, one row per
job (its overrides and final metrics from its metrics.json), best first.

Why: a sweep's answer is a ranking; reading N metrics.json files by hand is how sweeps get misread.
The Hydra callback (conf/train.yaml ``hydra.callbacks.sweep_summary``) writes it when the sweep ends; rebuild it
(e.g. for a sweep that was killed, or with another ranking) with::

    python -m tasks.sweep multirun/<date> [--rank-by min:wer] [--columns wer accuracy]

Imports stay light: Hydra imports this module at the start of every train.py run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# the first of these that any job reports ranks the jobs ("max:" higher is better, "min:" lower is better)
DEFAULT_RANK_BY = ("max:accuracy", "min:wer", "min:test/mae/model", "min:last_loss_avg")
# metrics shown in summary.md besides the ranking key (summary.csv has every number of metrics.json)
DEFAULT_COLUMNS = ("accuracy", "wer", "before/wer", "test/mae/model", "last_loss_avg", "steps", "train_seconds")


@dataclass
class Job:
    """One job of a sweep, as its run dir records it."""

    num: int
    dir: Path
    overrides: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.metrics else "no metrics.json"

    @property
    def params(self) -> dict[str, str]:
        return dict(o.split("=", 1) if "=" in o else (o, "") for o in self.overrides)


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def read_jobs(sweep_dir: Path) -> list[Job]:
    """Every job under ``sweep_dir`` (each has ``.hydra/overrides.yaml``; subdirs may nest when an override
    holds a path), with its metrics.json: in the job dir, or at its ``paths.output_dir`` when that was given."""
    jobs = []
    for ov in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        hydra_dir = ov.parent
        job_dir = hydra_dir.parent
        if ".submitit" in job_dir.parts:
            continue
        hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml") or {}
        num = (hydra_cfg.get("hydra") or {}).get("job", {}).get("num")
        out = job_dir
        given = ((_load_yaml(hydra_dir / "config.yaml") or {}).get("paths") or {}).get("output_dir")
        if isinstance(given, str) and "${" not in given:
            out = Path(given)
        metrics = {}
        if (out / "metrics.json").exists():
            try:
                metrics = json.loads((out / "metrics.json").read_text())
            except (OSError, json.JSONDecodeError):
                metrics = {}
        jobs.append(Job(int(num) if num is not None else len(jobs), out, list(_load_yaml(ov) or []), metrics))
    return sorted(jobs, key=lambda j: j.num)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def rank(jobs: list[Job], rank_by: Sequence[str] = DEFAULT_RANK_BY) -> tuple[list[Job], str | None, str]:
    """Jobs best first by the first ``max:key`` / ``min:key`` any job reports (those without it, then jobs that
    wrote no metrics, last in job order); returns (jobs, key, "max" or "min")."""
    for spec in rank_by:
        mode, _, key = spec.partition(":") if spec.split(":", 1)[0] in ("max", "min") else ("min", "", spec)
        if any(_number(j.metrics.get(key)) is not None for j in jobs):
            sign = -1.0 if mode == "max" else 1.0

            def order(j: Job, key: str = key, sign: float = sign) -> tuple[int, float, int]:
                v = _number(j.metrics.get(key))
                return (0, sign * v, j.num) if v is not None else (1 if j.metrics else 2, 0.0, j.num)

            return sorted(jobs, key=order), key, mode
    return sorted(jobs, key=lambda j: (0 if j.metrics else 1, j.num)), None, ""


def swept(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """(the override keys whose value differs between jobs, the overrides every job shares)."""
    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j.params if k not in keys]
    varying = [k for k in keys if len({j.params.get(k) for j in jobs}) > 1]
    common = {k: jobs[0].params[k] for k in keys if k not in varying and k in jobs[0].params}
    return varying, common


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(sweep_dir: str | Path, rank_by: Sequence[str] = DEFAULT_RANK_BY,
                  columns: Sequence[str] = DEFAULT_COLUMNS) -> list[Job]:
    """Write ``summary.csv`` (every number of every job's metrics.json) and ``summary.md`` (the swept overrides
    and ``columns``) in ``sweep_dir``; returns the jobs best first."""
    sweep_dir = Path(sweep_dir)
    jobs, key, mode = rank(read_jobs(sweep_dir), rank_by)
    varying, common = swept(jobs)
    numbers: list[str] = []
    for j in jobs:
        numbers += [k for k, v in j.metrics.items() if _number(v) is not None and k not in numbers]
    if key in numbers:
        numbers.remove(key)
        numbers.insert(0, key)
    with (sweep_dir / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rank", "job", "status", *varying, *numbers, "overrides", "dir"])
        for i, j in enumerate(jobs, 1):
            w.writerow([i, j.num, j.status, *(j.params.get(k, "") for k in varying),
                        *(j.metrics.get(k, "") for k in numbers), " ".join(j.overrides), str(j.dir)])
    shown = [key] if key else []
    shown += [c for c in columns if c != key and any(c in j.metrics for j in jobs)]
    lines = [f"# Sweep {sweep_dir}", "",
             f"{len(jobs)} jobs, {sum(bool(j.metrics) for j in jobs)} with metrics.json; "
             + (f"ranked by `{key}` ({'higher' if mode == 'max' else 'lower'} is better)." if key
                else "no ranking key (rank_by) found in any job's metrics."), ""]
    if common:
        lines += ["Every job: `" + " ".join(f"{k}={v}" for k, v in common.items()) + "`", ""]
    header = ["rank", "job", *varying, *shown, "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, j in enumerate(jobs, 1):
        cells = [str(i), str(j.num), *(j.params.get(k, "") for k in varying), *(_fmt(j.metrics.get(c)) for c in shown),
                 j.status]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jobs


def _settings(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's own sweep_summary settings (Hydra's multirun.yaml), so a rebuild ranks as the sweep did."""
    cfg = _load_yaml(sweep_dir / "multirun.yaml") or {}
    node = ((cfg.get("hydra") or {}).get("callbacks") or {}).get("sweep_summary") or {}
    return {k: node[k] for k in ("rank_by", "columns") if node.get(k)}


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # hydra-core without callbacks: the CLI still works
    _HydraCallback = object  # type: ignore[assignment,misc]


class SweepSummary(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback (``hydra.callbacks.sweep_summary``): writes the summary when a multirun ends."""

    def __init__(self, rank_by: Sequence[str] = DEFAULT_RANK_BY, columns: Sequence[str] = DEFAULT_COLUMNS) -> None:
        self.rank_by = list(rank_by)
        self.columns = list(columns)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():  # a launcher that ran nothing here (or elsewhere): nothing to summarise
            return
        jobs = write_summary(sweep_dir, self.rank_by, self.columns)
        print(f"sweep summary: {sweep_dir / 'summary.md'} ({len(jobs)} jobs)")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.sweep", description="(Re)build a sweep's summary.csv/.md.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--rank-by", nargs="+", help="max:<key> / min:<key>, first found wins (default: the sweep's)")
    p.add_argument("--columns", nargs="+", help="metrics shown in summary.md (default: the sweep's)")
    a = p.parse_args(argv)
    if not a.sweep_dir.is_dir():
        p.error(f"{a.sweep_dir}: not a directory")
    settings = _settings(a.sweep_dir)
    jobs = write_summary(a.sweep_dir, a.rank_by or settings.get("rank_by", DEFAULT_RANK_BY),
                         a.columns or settings.get("columns", DEFAULT_COLUMNS))
    print((a.sweep_dir / "summary.md").read_text(), end="")
    if not jobs:
        print(f"(no jobs found under {a.sweep_dir}: each job dir holds .hydra/overrides.yaml)")


if __name__ == "__main__":
    main()
