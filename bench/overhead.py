"""The framework's cost over a hand-written loop, at real size, and where a step's time goes: measured in ONE run.

    python -m bench.overhead [--stages align instruct] [--steps 12] [--reps 2] [overrides ...]

For each stage, the real default config (Whisper tiny.en + SmolLM2-135M, conf/stage/<stage>.yaml, its data) runs:
  mmlm   ``tasks.runner.run(cfg)``: the front door, Lightning, every callback and logger a run has; its step time is
         RunStats' median gap between step starts (data, forward, backward, optimizer, callbacks, logging);
  plain  the same model, built by the same ``tasks.runner.build``, the same data loader (so the same batches), AdamW
         over the same trainable weights with the same gradient clipping, in a bare torch loop, timed piece by
         piece: data (fetch + collate), encoder, adaptor, LLM forward (merge + LM loss), backward, optimizer.
The two alternate ``--reps`` times, in ABBA order (medians: least disturbed by other processes). Last line per stage:
``overhead <stage> <mmlm / plain>``; then ``overhead <worst ratio>``. Goal (issue 23): <= 1.05.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("data", "encoder", "adaptor", "llm_forward", "backward", "optimizer")


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def stage_overrides(stage: str, steps: int, out: Path, extra: list[str]) -> list[str]:
    """The stage's defaults, made to train ``steps`` steps and nothing else (no evaluation, validation, checkpoints
    during the run), so both paths time the same steps."""
    init = ["allow_no_init=true"] if stage == "instruct" else []
    return [f"stage={stage}", "modality=speech", f"trainer.max_steps={steps}", "eval.before=false",
            "data.eval_files=null", "data.val_files=null", "checkpoint_minutes=null", f"paths.output_dir={out}",
            "trainer.enable_model_summary=false", *init, *extra]


def mmlm_step(cfg: Any) -> float:
    from tasks.runner import run

    return float(run(cfg)["step_seconds_median"])


def plain_steps(cfg: Any, steps: int, prepare: Callable[[Any], None] | None = None,
                context: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Median seconds per part over ``steps`` steps (the first two left out, as RunStats does). ``prepare``
    changes the built model first (e.g. compiles its LLM); each step runs inside ``context()`` (e.g. autocast)."""
    from tasks.runner import build, stage_policy

    torch.manual_seed(cfg.seed)
    b = build(cfg, stage_policy(cfg), int(cfg.data.batch_size))
    model, dm = b.model, b.dm
    dm.prepare_data()
    model.train()
    if prepare is not None:
        prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98))
    clip = cfg.trainer.get("gradient_clip_val")
    times: dict[str, list[float]] = {k: [] for k in (*PARTS, "step")}
    batches = iter(dm.train_dataloader())
    for i in range(steps):
        with context():
            t = _step(model, batches, params, opt, float(clip) if clip else None)
        if i >= 2:
            for k, a, c in zip(PARTS, t, t[1:]):
                times[k].append(c - a)
            times["step"].append(t[-1] - t[0])
    return {k: statistics.median(v) for k, v in times.items()}


def _step(model: Any, batches: Any, params: list[torch.Tensor], opt: torch.optim.Optimizer,
          clip: float | None) -> list[float]:
    """One hand-written training step; the clock read between its parts (PARTS)."""
    t = [time.perf_counter()]
    batch = next(batches)
    t.append(time.perf_counter())
    outs = {}
    for name, entry in batch["modal"].items():
        m = model.modalities[name]
        if entry["kind"] == "hidden":  # a cached encoder output
            hidden, lengths = entry["values"], entry["mask"].sum(1)
        else:
            with torch.no_grad():
                hidden, lengths = m.encode_frozen(entry["values"], entry["mask"])
        t.append(time.perf_counter())
        outs[name] = m.adapt(hidden, lengths)
    t.append(time.perf_counter())
    model.adapt_all = lambda _batch: outs  # embed() merges these (an instance attribute: this model only)
    embeds, _, mask = model.embed(batch)
    loss = model.lm_loss(embeds, mask, batch["labels"])
    t.append(time.perf_counter())
    loss.backward()
    t.append(time.perf_counter())
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t.append(time.perf_counter())
    return t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=["align", "instruct"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="more train.py overrides (both paths)")
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error("--steps must be >= 4 (the first two are warm-up)")
    torch.set_float32_matmul_precision("high")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            mm, plain = [], []
            for r in range(args.reps):  # ABBA: which path runs first alternates too (a warm process, a fresh heap)
                over = stage_overrides(stage, args.steps, Path(tmp) / f"{stage}{r}", args.overrides)
                for path in (("mmlm", "plain") if r % 2 == 0 else ("plain", "mmlm")):
                    if path == "mmlm":
                        mm.append(mmlm_step(compose(over)))
                    else:
                        plain.append(plain_steps(compose(over), args.steps))
            p = {k: statistics.median(x[k] for x in plain) for k in plain[0]}
            m = statistics.median(mm)
            each = ", ".join(f"{x:.3f}" for x in mm) + " vs " + ", ".join(f"{x['step']:.3f}" for x in plain)
            print(f"\n{stage}: mmlm {m:.3f} s/step, plain {p['step']:.3f} s/step (medians of {args.reps} alternating runs "
                  f"of {args.steps} steps; each: {each})")
            print("  plain loop, where a step goes: " + ", ".join(f"{k} {p[k]:.3f} s ({100 * p[k] / p['step']:.0f} %)"
                                                                for k in PARTS))
            print(f"  framework (mmlm - plain): {m - p['step']:+.3f} s/step")
            ratios[stage] = m / p["step"]
            print(f"overhead {stage} {ratios[stage]:.3f}")
    print(f"overhead {max(ratios.values()):.3f}")


if __name__ == "__main__":
    main()
