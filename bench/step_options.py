"""Which CPU step settings pay, side by side in ONE run: attention kernel, torch.compile, bf16 autocast, threads.

    python -m bench.step_options [--stages align instruct] [--steps 8] [--reps 2] [--variants ...] [overrides ...]

Each variant trains ``--steps`` steps of the stage's real default (Whisper tiny.en + SmolLM2-135M) in the plain loop
of bench/overhead.py (the same batches every time), the variants alternating ``--reps`` times; medians. A variant
that fails (e.g. no C++ compiler for torch.compile) is reported as such. Last line per stage:
``best <stage> <variant> <speedup over sdpa>``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.overhead import compose, plain_steps, stage_overrides


def _compile(model: Any) -> None:
    from llm.lora import backbone_and_head

    backbone, _ = backbone_and_head(model.llm)
    backbone.forward = torch.compile(backbone.forward, dynamic=True)


def _threads(n: int) -> Callable[[], Any]:
    class Threads:
        def __enter__(self) -> None:
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc: Any) -> None:
            torch.set_num_threads(self.before)

    return Threads


# name -> (extra overrides, prepare(model), per-step context)
VARIANTS: dict[str, tuple[list[str], Callable[[Any], None] | None, Callable[[], Any] | None]] = {
    "sdpa": ([], None, None),  # the default: llm.loader.load_llm(attn_implementation="sdpa")
    "eager": (["+llm.model.attn_implementation=eager"], None, None),
    "bf16_autocast": ([], None, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    "compile": ([], _compile, None),
    "threads_1": ([], None, _threads(1)),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=["align", "instruct"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("overrides", nargs="*", help="more train.py overrides (every variant)")
    args = ap.parse_args(argv)
    torch.set_float32_matmul_precision("high")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            got: dict[str, list[float]] = {v: [] for v in args.variants}
            failed: dict[str, str] = {}
            for _ in range(args.reps):
                for v in args.variants:
                    if v in failed:
                        continue
                    extra, prepare, context = VARIANTS[v]
                    cfg = compose(stage_overrides(stage, args.steps, Path(tmp) / v, [*extra, *args.overrides]))
                    try:
                        got[v].append(plain_steps(cfg, args.steps, prepare, context or contextlib.nullcontext)["step"])
                    except Exception as e:  # noqa: BLE001 - a variant this machine cannot run is a result too
                        failed[v] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            base = statistics.median(got["sdpa"]) if got.get("sdpa") else None
            print(f"\n{stage} ({args.steps} steps, medians of {args.reps} alternating runs):")
            for v in args.variants:
                if v in failed:
                    print(f"  {v:14s} failed: {failed[v]}")
                    continue
                m = statistics.median(got[v])
                ratio = f"  x{base / m:.2f} vs sdpa" if base else ""
                print(f"  {v:14s} {m:.3f} s/step{ratio}  (each: {', '.join(f'{x:.3f}' for x in got[v])})")
            if base:
                best = min((v for v in args.variants if got[v]), key=lambda v: statistics.median(got[v]))
                print(f"best {stage} {best} {base / statistics.median(got[best]):.2f}")


if __name__ == "__main__":
    main()
