"""How a step's cost grows with batch size and clip length, and the memory planner against what autograd keeps.

    python -m bench.cost_growth [--batches 1 2 4 8] [--lengths 1.5 3 6] [--steps 6] [--manifest ...] [overrides ...]

The default align step (Whisper tiny.en live + SmolLM2-135M, conf/stage/align.yaml) in the plain loop of
bench/overhead.py, on clips of one length bucket at a time (``--lengths``: clips within 25 % of each length, from
``--manifest``): seconds per step and LLM tokens per batch for each (batch, length) point, and for each point the
planner's activation estimate (llm.plan.estimate at that batch's padded length and labelled fraction) next to the
bytes autograd keeps for backward (llm.plan.SavedTensorMeter) on the same batch. So a user can predict a run's cost
from its batch and clip length. Last line: ``planner activations within <max abs error> %``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.overhead import compose, plain_steps, stage_overrides


def bucket(manifest: Path, seconds: float, out: Path, n: int) -> Path | None:
    """The first ``n`` clips of ``manifest`` within 25 % of ``seconds``, as a manifest beside the clips' paths."""
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    keep = [r for r in rows if abs(float(r["duration"]) - seconds) <= 0.25 * seconds][:n]
    if len(keep) < n:
        return None
    for r in keep:
        r["audio_filepath"] = str((manifest.parent / r["audio_filepath"]).resolve())
    out.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return out


def activations(cfg: Any) -> tuple[float, float, int, int]:
    """(planned, measured activation bytes, batch, padded length) for the first training batch of ``cfg``."""
    from llm.plan import SavedTensorMeter, estimate, from_config
    from tasks.runner import build, stage_policy

    b = build(cfg, stage_policy(cfg), int(cfg.data.batch_size))
    b.dm.prepare_data()
    b.model.train()
    batch = next(iter(b.dm.train_dataloader()))
    B, L = batch["input_ids"].shape
    labelled = float((batch["labels"][:, 1:] != -100).float().mean())
    with SavedTensorMeter(b.model) as meter:
        b.model(batch)["loss"].backward()
    planned = estimate(from_config(cfg, seq_len=L, label_fraction=labelled, attention="flash"))["activations"]
    return planned, float(meter.bytes), B, L


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--lengths", type=float, nargs="+", default=[1.5, 3.0, 6.0], help="clip seconds")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--manifest", type=Path, default=Path("data_cache/speech/train.jsonl"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_float32_matmul_precision("high")
    rows, errors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.lengths:
            for bs in args.batches:
                clips = bucket(args.manifest, seconds, Path(tmp) / f"clips_{seconds}.jsonl", bs * args.steps)
                if clips is None:
                    print(f"{seconds} s x {bs}: not enough clips of that length in {args.manifest}")
                    continue
                over = stage_overrides("align", args.steps, Path(tmp) / "run", [
                    f"data.train_files={clips}", f"data.batch_size={bs}", "data.group_by_length=false", *args.overrides])
                step = plain_steps(compose(over), args.steps)["step"]
                planned, measured, B, L = activations(compose(over))
                err = 100 * (planned - measured) / measured
                errors.append(abs(err))
                rows.append((seconds, bs, L, B * L, step, planned / 2**20, measured / 2**20, err))
                print(f"{seconds:4.1f} s x {bs}: {step:.3f} s/step, {B} x {L} tokens; activations planned "
                      f"{planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB ({err:+.1f} %)", flush=True)
    print("\n| clip s | batch | padded length | tokens | s/step | s per 100 tokens | activations planned MiB | "
          "measured MiB | error |\n|---|---|---|---|---|---|---|---|---|")
    for s, bs, L, tok, step, p, m, e in rows:
        print(f"| {s} | {bs} | {L} | {tok} | {step:.3f} | {100 * step / tok:.3f} | {p:.1f} | {m:.1f} | {e:+.1f} % |")
    if errors:
        print(f"planner activations within {max(errors):.1f} %")


if __name__ == "__main__":
    main()
