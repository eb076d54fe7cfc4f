"""Pack a trained checkpoint chain into a shippable model folder: ``python -m tasks.pack <run> <out>``.

A run's checkpoint holds only what its stage trained and names its parent (relative to itself, the absolute path
beside it), so a chain (encoder pretraining -> align -> instruct) moves only as one folder tree and needs every
link's file. A packed folder is one self-contained, relocatable file set:

- ``model.safetensors``: every weight the chain trained (encoder pretraining, adaptor, LoRA, new
  rows), merged newest-wins under the full model's names, in fp16; no optimizer state.
- ``mmlm.json``: the merged provenance (llm, modalities, the modality's settings, LoRA spec, system
  prompt, the stages it went through), what ``init_from`` needs to rebuild the model.
- ``metrics.json`` and ``README.md``: the model card (base models, stages, steps and CPU time, and the
  metrics of every evaluation run given with ``--eval name=<run dir>``).

``init_from=<folder>`` loads it like a run directory (tasks.checkpoint.read_checkpoint), for
evaluation or continued training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from data.jsonl import write_json
from tasks.checkpoint import META_KEY, PACKED_META, PACKED_WEIGHTS, read_chain

CARD_KEYS = ("steps", "train_seconds", "seconds_per_step", "first_loss_avg", "last_loss_avg", "trainable_params")


def merged_state(chain: list[tuple[Path, dict]]) -> dict[str, torch.Tensor]:
    """The chain's trained weights under the full model's names (a standalone stage's keys gain
    ``modalities.<name>.``), oldest first so a later stage's copy of a weight wins; fp16 floats."""
    state: dict[str, torch.Tensor] = {}
    for _, ckpt in reversed(chain):
        meta = ckpt[META_KEY]
        prefix = "" if meta.get("llm") else "".join(f"modalities.{m}." for m in meta.get("modalities", [])[:1])
        for k, v in ckpt["state_dict"].items():
            state[prefix + k] = v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
    return state


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256: which weights a packed folder holds."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def merged_meta(chain: list[tuple[Path, dict]]) -> dict[str, Any]:
    """Newest-first merge of the chain's metadata; no parent (the folder stands alone)."""
    meta: dict[str, Any] = {}
    for _, ckpt in chain:
        for k, v in ckpt[META_KEY].items():
            if v is not None and k not in meta:
                meta[k] = v
    stages = [s for _, c in reversed(chain) for s in (c[META_KEY].get("stages") or [c[META_KEY]["stage"]])]
    meta.update(parent=None, stages=stages, packed=True)  # a packed parent brings its own stages
    meta.pop("pack_id", None)
    meta.pop("parent_pack_id", None)
    meta.pop("trainable", None)
    if meta.get("train_files"):  # provenance only; relative to the working directory, so nothing absolute ships
        meta["train_files"] = [os.path.relpath(f) if Path(f).is_absolute() else f for f in meta["train_files"]]
    return meta


def _run_metrics(ckpt_path: Path) -> dict[str, Any]:
    if ckpt_path.is_dir():  # a packed model folder
        run = ckpt_path
    else:
        run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    f = run / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _stage_rows(path: Path, ckpt: dict) -> list[dict[str, Any]]:
    """One card row per stage; a packed parent (a model continued and packed again) gives its card's rows."""
    m = _run_metrics(path)
    if ckpt[META_KEY].get("packed") and isinstance(m.get("stages"), list):
        return [dict(s) for s in m["stages"]]
    return [{"stage": ckpt[META_KEY]["stage"], **m}]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def accuracy_table(m: dict[str, Any]) -> list[str]:
    """``accuracy/<type>`` of the model beside every baseline prefix found (``text_lora/accuracy/<type>`` ...)."""
    types = sorted(k.split("/", 1)[1] for k in m if k.startswith("accuracy/"))
    prefixes = [""] + sorted({k.split("/accuracy/")[0] for k in m if "/accuracy/" in k})
    head = ["model" if not p else p for p in prefixes]
    rows = ["| type | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for t in types + ["(all)"]:
        key = "accuracy" if t == "(all)" else f"accuracy/{t}"
        cells = [m.get(f"{p}/{key}" if p else key) for p in prefixes]
        rows.append(f"| {t} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    return rows


def card(name: str, meta: dict[str, Any], stages: list[dict[str, Any]], evals: dict[str, dict[str, Any]],
         size_mb: float, notes: str = "", weights: str | None = None) -> str:
    """The model card in markdown: base models, stages with their cost, and every evaluation's metrics."""
    mod = meta.get("modality_cfg", {})
    lines = [f"# {name}", "", notes.strip(), "",
             f"- LLM: `{meta.get('llm')}`; modalities: {meta.get('modalities')}; packed at commit `{_git_commit()}`",
             weights or (f"- weights: `{PACKED_WEIGHTS}` ({size_mb:.2f} MB, fp16: what trained, no optimizer state); "
                         f"settings: `{PACKED_META}`"),
             f"- modality settings: `{json.dumps({k: v for k, v in mod.items() if k != '_target_'})}`",
             f"- LoRA: `{json.dumps(meta.get('lora'))}`; system prompt: `{json.dumps(meta.get('system_prompt'))}`",
             "", "## Stages", "", "| stage | steps | CPU s | s/step | first loss | last loss | trainable params |",
             "|---|---|---|---|---|---|---|"]
    for s in stages:
        lines.append("| " + " | ".join(str(s.get(k, "")) for k in ("stage",) + CARD_KEYS) + " |")
    for label, m in evals.items():
        lines += ["", f"## Evaluation: {label} ({m.get('eval_samples', '?')} questions)", ""] + accuracy_table(m)
        rest = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and "accuracy" not in k}
        lines += ["", "| other metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rest.items()]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def local_paths(value: Any, root: Path | None = None) -> Any:
    """``value`` with every absolute path under ``root`` (the working directory) written relative to it: a card's
    provenance (an evaluation's ``init_from`` chain) reads the same on every machine and names no home folder."""
    root = (root or Path.cwd()).resolve()
    if isinstance(value, dict):
        return {k: local_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [local_paths(v, root) for v in value]
    if isinstance(value, str) and value.startswith("/") and Path(value).is_relative_to(root):
        return str(Path(value).relative_to(root)) or "."
    return value


def pack(run: str | Path, out: str | Path, evals: dict[str, str | Path] | None = None, name: str | None = None,
         notes: str = "", max_mb: float | None = 25.0) -> Path:
    """Write the packed folder ``out`` from the checkpoint chain of ``run`` (see the module docstring)."""
    chain = read_chain(run)
    state, meta = merged_state(chain), merged_meta(chain)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (PACKED_WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    size = tmp.stat().st_size / 2**20
    if max_mb is not None and size > max_mb:
        tmp.unlink()
        raise ValueError(f"{run}: packed weights are {size:.1f} MB, over the {max_mb} MB limit")
    meta["pack_id"] = file_digest(tmp)  # a run started from this folder records it (tasks.checkpoint.read_chain)
    tmp.replace(out / PACKED_WEIGHTS)
    (out / PACKED_META).write_text(json.dumps(meta, indent=1, default=str))
    stages = [s for p, c in reversed(chain) for s in _stage_rows(p, c)]
    ev = {label: local_paths(json.loads((Path(d) / "metrics.json").read_text())) for label, d in (evals or {}).items()}
    write_json(out / "metrics.json", {"stages": [{k: s.get(k) for k in ("stage",) + CARD_KEYS} for s in stages],
                                      "evaluations": ev, "size_mb": round(size, 3)}, indent=1)  # strict, atomic
    (out / "README.md").write_text(card(name or out.name, meta, stages, ev, size, notes))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pack a run's checkpoint chain into a relocatable model folder.")
    ap.add_argument("run", help="run directory or .ckpt (its parents are followed)")
    ap.add_argument("out", help="folder to write, e.g. models/<name>")
    ap.add_argument("--eval", action="append", default=[], metavar="LABEL=RUN_DIR",
                    help="an evaluation run whose metrics.json goes into the card (repeatable)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--notes", default="", help="a paragraph (or @file) at the top of the card")
    a = ap.parse_args(argv)
    notes = Path(a.notes[1:]).read_text() if a.notes.startswith("@") else a.notes
    evals = dict(e.split("=", 1) for e in a.eval)
    print(pack(a.run, a.out, evals, a.name, notes))


if __name__ == "__main__":
    main()
