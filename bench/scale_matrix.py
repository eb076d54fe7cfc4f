"""Which strategy x precision x quant combinations train on this machine (CPU: gloo).

``python -m bench.scale_matrix [--devices 2] [--steps 2]``: for each combination, a short instruct
run of the tiny Llama + toy modality through tests/distributed/_worker.py; prints ok/FAIL, the
wall time, and the max |weight difference| against the single-process fp32 run of the same
global batch (the 1-process row of each precision is its own reference).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "_worker.py"


def launch(trainer: str, devices: int, precision: str, job: dict, out: Path) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(WORKER), "--trainer", trainer, "--devices", str(devices),
                        "--precision", precision, "--out", str(out), "--jobs", json.dumps([job])],
                       capture_output=True, text=True, timeout=600)
    tail = (p.stderr.strip().splitlines() or [""])[-1]
    return p.returncode == 0, time.perf_counter() - t0, tail


def max_diff(a: Path, b: Path) -> float:
    wa, wb = torch.load(a)["weights"], torch.load(b)["weights"]
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precisions", default="32-true,bf16-mixed,bf16-true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision, quant in itertools.product(args.precisions.split(","), [None, "nf4"]):
            job = {"name": "run", "stage": "instruct", "steps": args.steps, "global_batch": 4, "quant": quant}
            ref = Path(tmp) / f"ref-{precision}-{quant}"
            for trainer, devices in (("cpu", 1), ("ddp", args.devices), ("fsdp", args.devices)):
                out = ref if trainer == "cpu" else Path(tmp) / f"{trainer}-{precision}-{quant}"
                ok, secs, tail = launch(trainer, devices, precision, job, out)
                diff = max_diff(ref / "run.pt", out / "run.pt") if ok and (ref / "run.pt").exists() else None
                rows.append((trainer, devices, precision, quant or "-", "ok" if ok else "FAIL", secs, diff, "" if ok else tail))
                print(f"{trainer:5s} x{devices} {precision:10s} quant={quant or '-':4s} {rows[-1][4]:4s} {secs:6.1f}s "
                      f"maxdiff={diff if diff is None else f'{diff:.2e}'} {rows[-1][7][:150]}", flush=True)
    print("\n| strategy | devices | precision | quant | result | wall s | max abs diff vs 1 process |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} | {'-' if r[6] is None else f'{r[6]:.1e}'} |")


if __name__ == "__main__":
    main()
