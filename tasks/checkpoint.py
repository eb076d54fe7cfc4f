"""Checkpoints hold only what trains, plus provenance, so stages hand off in megabytes.

Each checkpoint carries ``ckpt["mmlm"] = {stage, llm, modalities, parent}``; ``parent`` is the
checkpoint it was initialised from. Loading walks that chain, so an instruct run gets the
encoder a standalone stage pretrained, the adaptor (align) and its own LoRA, each from where it trained.
Beside what trains, a checkpoint carries a plugin's buffers named ``carried_*``: frozen state fitted from data
(e.g. a plugin's k-means codebook), so a run evaluates where the file it was fitted into is absent.

``parent`` is stored relative to the checkpoint's own folder (older checkpoints: absolute), with the absolute
path beside it (``PARENT_AT``, outside the metadata a packed folder ships): a chain moved or copied as one folder
tree still loads, and so does one run directory moved alone while its parents stay put.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

META_KEY = "mmlm"
PACKED_WEIGHTS, PACKED_META = "model.safetensors", "mmlm.json"  # a packed model folder (tasks.pack)
PARENT_AT = "mmlm_parent_at"  # top-level key: the parent's absolute path when saved (the fallback for a run moved alone)
CARRIED = "carried_"  # a buffer so named is frozen state fitted from data (a k-means codebook): checkpoints keep it too


def carried_buffers(module: nn.Module, finite: bool = True) -> dict[str, torch.Tensor]:
    """Buffers named ``carried_*`` (that hold finite values: ``finite``): state a plugin fitted from data, which a
    run on another machine (where the file it was fitted into is absent) must read from the checkpoint."""
    return {n: b for n, b in module.named_buffers() if n.rsplit(".", 1)[-1].startswith(CARRIED)
            and not (finite and not bool(torch.isfinite(b).all()))}


def restore_carried(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the carried buffers ``state`` holds into ``module`` and take them out of ``state`` (a resumed run's
    checkpoint then holds exactly its trainable set, as tasks.resume.ResumeKeys checks)."""
    own = carried_buffers(module, finite=False)
    with torch.no_grad():
        for k in [k for k in state if k in own]:
            own[k].copy_(state.pop(k))


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(key: str, path: str | Path) -> Path:
    """``path`` as a local Path; a URL (http://, s3://, gs://, hf:// ...) is refused naming ``key``. Why: a
    checkpoint's ``parent`` chain and the packed folders are local files, and Lightning would otherwise fetch a
    ``resume`` URL through fsspec while ``init_from`` reports it as a missing file."""
    if _URL.match(str(path)):
        raise ValueError(f"{key}={path}: must be a local path, not a URL (download it first)")
    return Path(path)


def resume_path(path: str | Path) -> Path:
    """``resume=``: an existing local .ckpt file (Lightning's own error for a typo came as a traceback, late)."""
    p = local_path("resume", path)
    if not p.is_file():
        hint = " (a directory: give its checkpoints/last.ckpt)" if p.is_dir() else ""
        raise ValueError(f"resume={path}: no such checkpoint file{hint}")
    return p


def check_finite(state: dict[str, Any], where: str | Path) -> None:
    """Refuse a state dict holding NaN/inf weights: a diverged run must not seed (or be resumed as) another."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}: weight {k} holds non-finite values (nan/inf); a diverged checkpoint cannot "
                             f"be loaded (start from an earlier checkpoint or retrain with a lower lr)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> checkpoints/last.ckpt), a packed model folder (tasks.pack) or a .ckpt file."""
    p = local_path("init_from", path)
    if p.is_dir() and (p / PACKED_META).is_file():
        return p.resolve()
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if cand.exists():
                return cand.resolve()
        raise ValueError(f"init_from={path}: no checkpoints/last.ckpt in that run directory")
    if not p.exists():
        raise ValueError(f"init_from={path}: no such checkpoint file or run directory")
    return p.resolve()


def read_checkpoint(path: Path) -> dict:
    if path.is_dir():  # a packed folder: fp16 safetensors + its metadata, read as one fp32 checkpoint
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path / PACKED_WEIGHTS))
            meta = json.loads((path / PACKED_META).read_text())
        except (OSError, ValueError, SafetensorError) as e:
            raise ValueError(f"{path}: not a readable packed model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return {"state_dict": {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, META_KEY: meta}
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if META_KEY not in ckpt:
        raise ValueError(f"{path}: not an mmlm checkpoint (no '{META_KEY}' metadata)")
    return ckpt


class TrainableOnlyCheckpoint(L.Callback):
    """Strips frozen weights from every saved checkpoint and stamps provenance metadata.

    ``folder``: where the checkpoints are saved; given, ``meta["parent"]`` is written relative to it (so the chain
    can move as one tree) and its absolute path under ``PARENT_AT``.
    """

    def __init__(self, meta: dict[str, Any], folder: str | Path | None = None):
        self.meta = dict(meta)
        self.folder = Path(folder) if folder is not None else None
        if (pid := pack_id_of(self.meta.get("parent"))) is not None:
            self.meta["parent_pack_id"] = pid  # read_chain refuses the folder once it holds other weights

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        keep = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        carried = set(carried_buffers(pl_module))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep | carried}
        meta = dict(self.meta, trainable=sorted(keep))
        if self.folder is not None and meta.get("parent"):
            checkpoint[PARENT_AT] = str(Path(meta["parent"]).resolve())
            meta["parent"] = relative_parent(meta["parent"], self.folder)
        checkpoint[META_KEY] = meta


def pack_id_of(path: str | Path | None) -> str | None:
    """A packed folder's ``pack_id`` (its weights' digest, written by tasks.pack), else None."""
    meta = Path(path) / PACKED_META if path else None
    if meta is None or not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("pack_id")


def relative_parent(parent: str | Path, folder: str | Path) -> str:
    """``parent`` relative to ``folder`` (both resolved: a symlinked outputs/ gives a path that still walks right);
    the absolute path where none exists (another drive)."""
    try:
        return os.path.relpath(Path(parent).resolve(), Path(folder).resolve())
    except ValueError:
        return str(Path(parent).resolve())


def parent_of(path: Path, ckpt: dict) -> Path | None:
    """The checkpoint ``path`` was initialised from, or None. Tried in turn: the recorded ``parent`` (relative to
    ``path``'s folder, or an old absolute entry), then where it was when saved (``PARENT_AT``); none existing is
    one line naming the missing parent and ``path``."""
    parent = ckpt[META_KEY].get("parent")
    if not parent:
        return None
    folder = path if path.is_dir() else path.parent  # a packed folder is its own folder
    tried = [Path(os.path.normpath(folder / parent))]  # an old absolute entry stays as it is
    if ckpt.get(PARENT_AT):
        tried.append(Path(ckpt[PARENT_AT]))
    for cand in tried:
        if cand.exists():
            return cand.resolve()
    raise ValueError(f"{path}: its parent checkpoint {parent} is missing (looked for "
                     f"{', '.join(str(c) for c in dict.fromkeys(tried))}); put it back, move a chain as one folder tree, or "
                     f"make a run self-contained before moving it: python -m tasks.pack <run> <folder>")


def read_chain(path: str | Path) -> list[tuple[Path, dict]]:
    """``path``'s checkpoint and its parents', newest first, each read once (weights_only)."""
    chain: list[tuple[Path, dict]] = []
    p: Path | None = resolve_checkpoint(path)
    while p is not None:
        if any(p == q for q, _ in chain):  # a hand-edited parent pointing back: would loop forever
            raise ValueError(f"{chain[-1][0]}: its parent chain loops back to {p}")
        ckpt = read_checkpoint(p)
        check_finite(ckpt["state_dict"], p)
        if chain and (want := chain[-1][1][META_KEY].get("parent_pack_id")) and want != ckpt[META_KEY].get("pack_id"):
            raise ValueError(f"{chain[-1][0]}: its parent {p} was packed again since this run started from it "
                             f"(pack id {want}, now {ckpt[META_KEY].get('pack_id')}): its weights are not the ones "
                             f"this run continued; pack the new model to another folder")
        chain.append((p, ckpt))
        p = parent_of(p, ckpt)
    return chain


def key_group(name: str) -> str:
    """The component a weight belongs to: ``lora`` (every LoRA weight), ``modalities.<m>.<part>``,
    ``objectives.<key>``, else the first name part (a standalone modality's ``encoder``). A chain provides a
    component whole or not at all (then it is freshly initialised here, as LoRA is when instruct follows align)."""
    if "lora_" in name:
        return "lora"
    parts = name.split(".")
    return ".".join(parts[:{"modalities": 3, "objectives": 2}.get(parts[0], 1)])


def _groups(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[key_group(n)] = counts.get(key_group(n), 0) + 1
    return ", ".join(f"{g} ({c})" for g, c in sorted(counts.items())) or "nothing"


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def load_chain(model: nn.Module, path: str | Path | list[tuple[Path, dict]], llm_name: str | None,
               modality_names: list[str], prefix_for_stage: dict[str, str] | None = None) -> list[Path]:
    """Load ``path``'s weights (and its parents', oldest first) into ``model``; returns the chain.
    ``path``: a run dir / .ckpt, or the chain read_chain already read.

    ``prefix_for_stage`` maps a stage to the key prefix its weights need here (a standalone stage
    trained a modality alone, so its keys gain ``modalities.<name>.``). Raises on an LLM or
    modality mismatch, on any key the model does not have, and on a trainable weight missing from a component
    the chain does provide (another architecture: it would train from random weights, silently). Why: the model's
    ``strict_loading=False`` (checkpoints hold only what trains) would load such a checkpoint partially.
    """
    chain = path if isinstance(path, list) else read_chain(path)
    own = dict(model.named_parameters())
    trainable = [n for n, p in own.items() if p.requires_grad]
    own.update(carried_buffers(model, finite=False))  # a codebook fitted from data, beside what trains
    provided: set[str] = set()
    for p, ckpt in reversed(chain):
        meta = ckpt[META_KEY]
        if meta.get("llm") and llm_name and meta["llm"] != llm_name:
            raise ValueError(f"{p}: trained with llm={meta['llm']}, but this run uses llm={llm_name}")
        missing_mod = [m for m in meta.get("modalities", []) if m not in modality_names]
        if missing_mod:
            raise ValueError(f"{p}: trained with modality {missing_mod}, but this run has {modality_names}")
        prefix = (prefix_for_stage or {}).get(meta.get("stage", ""), "")
        state = {prefix + k: v for k, v in ckpt["state_dict"].items()}
        unknown = [k for k in state if k not in own]
        if unknown:
            raise ValueError(f"{p}: {len(unknown)} weight(s) this model lacks: {_first(unknown)}; this model "
                             f"trains {_groups(trainable)}")
        with torch.no_grad():
            for k, v in state.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"{p}: {k} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}")
                own[k].copy_(v)
        provided.update(state)
    groups = {key_group(k) for k in provided}
    absent = [n for n in trainable if n not in provided and key_group(n) in groups]
    if absent:
        raise ValueError(f"{chain[0][0]}: its chain lacks {len(absent)} trainable weight(s) of a component it "
                         f"provides: {_first(absent)}; this model trains {_groups(trainable)}, the chain provides "
                         f"{_groups(sorted(provided))} (a checkpoint of another architecture?)")
    return [p for p, _ in chain]
