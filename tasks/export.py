"""Take a trained model elsewhere: ``python export.py init_from=<run | models/...> format=peft|merged|adaptor out=<dir>``.

- ``peft``: a standard PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``PeftModel.from_pretrained(base_llm, dir)`` loads onto the base LLM.
- ``merged``: a Hugging Face model folder with the LoRA merged into the LLM (``AutoModelForCausalLM`` and
  ``AutoTokenizer.from_pretrained(dir)`` load it; the tokenizer carries the placeholder tokens), and the
  modality beside it in ``modality/`` (as ``adaptor`` writes it).
- ``adaptor``: the modality's trained weights as safetensors (``adaptor.safetensors``; ``encoder.safetensors``
  too when the chain trained the encoder, e.g. a pretrained time-series encoder) plus ``config.json`` (the modality's
  settings, its placeholder, the LLM it feeds and the frozen encoder it expects); a model of several modalities
  (modality=mixed) gets one such folder per modality, ``<out>/<name>/``.

Each folder gets a ``README.md`` model card (tasks.pack.card: base models, stages, steps, CPU time, metrics, the
git commit). Every other ``key=value`` is a train.py override (e.g. ``llm=...``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tasks.checkpoint import META_KEY, read_chain
from tasks.composition import plugin_nodes
from llm.vocab import materialize
from tasks.pack import _run_metrics, card, merged_meta

FORMATS = ("peft", "merged", "adaptor")


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    mine, rest = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ValueError(f"export.py: arguments are key=value, got {arg!r}")
        (mine.__setitem__(key, value) if key in ("init_from", "format", "out") else rest.append(arg))
    missing = [k for k in ("init_from", "format", "out") if k not in mine]
    if missing:
        raise ValueError(f"export.py: {', '.join(k + '=' for k in missing)} required (format: {'|'.join(FORMATS)})")
    if mine["format"] not in FORMATS:
        raise ValueError(f"export.py: format={mine['format']!r}; use one of {'|'.join(FORMATS)}")
    return mine, rest


def write_modality(built: Any, out: Path) -> list[str]:
    """Each plugin's trained weights (adaptor; the encoder if the chain trained it) + config.json, into ``out`` (one
    plugin) or ``out/<name>/`` each (several, modality=mixed); the files written, relative to ``out``."""
    chain = read_chain(built.chain[0])
    nodes = plugin_nodes(built.modality_cfg)
    written = []
    for name, modality in built.modalities.items():
        dest = out if len(built.modalities) == 1 else out / name
        dest.mkdir(parents=True, exist_ok=True)
        trained = {k.removeprefix(f"modalities.{name}.") if c[META_KEY].get("llm") else k
                   for _, c in chain for k in c["state_dict"]
                   if k.startswith(f"modalities.{name}.") or (not c[META_KEY].get("llm")
                                                              and (c[META_KEY].get("modalities") or [name])[0] == name)}
        files = []
        for part in ("adaptor", "encoder"):
            state = {k: v.detach().contiguous() for k, v in getattr(modality, part).state_dict().items()}
            chain_trained = part == "adaptor" or any(k.startswith(f"{part}.") for k in trained)
            if state and chain_trained:
                save_file(state, str(dest / f"{part}.safetensors"), metadata={"format": "pt"})
                files.append(f"{part}.safetensors")
        node = nodes.get(name, nodes.get(""))
        settings = json.loads(json.dumps(OmegaConf.to_container(node, resolve=True), default=str))
        config = {"modality": name, "placeholder": modality.placeholder, "llm": built.lm.name,
                  "d_llm": built.lm.hidden_size, "settings": settings, "files": files}
        (dest / "config.json").write_text(json.dumps(config, indent=1))
        written += [str((dest / f).relative_to(out)) for f in files]
    return written


def export(built: Any, fmt: str, out: str | Path) -> Path:
    """Write ``built`` (tasks.runner.build_trained) as ``fmt`` into ``out`` (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llm = built.model.llm
    has_lora = hasattr(llm, "peft_config")
    if fmt in ("peft", "merged") and not has_lora:
        raise ValueError(f"init_from={built.chain[0]}: no LoRA in this chain (an align run?); export format=adaptor")
    if fmt == "peft":
        llm.save_pretrained(str(out), safe_serialization=True)
    elif fmt == "merged":
        merged = materialize(llm.merge_and_unload())  # a plugin's own vocabulary rows become plain table rows
        merged.config.use_cache = True
        merged.save_pretrained(str(out), safe_serialization=True)
        built.model.tokenizer.save_pretrained(str(out))
        write_modality(built, out / "modality")
    else:
        write_modality(built, out)
    chain = read_chain(built.chain[0])
    meta = merged_meta(chain)
    stages = [{"stage": c[META_KEY]["stage"], **_run_metrics(p)} for p, c in reversed(chain)]
    last = stages[-1] if stages else {}
    evals = {"training run": {k: v for k, v in last.items() if "accuracy" in k or k in ("wer", "eval_samples")}}
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    note = f"Exported as `{fmt}` from `{built.chain[0]}` by `python export.py`."
    files = ", ".join(f"`{f.relative_to(out)}`" for f in sorted(out.rglob("*")) if f.is_file() and f.name != "README.md")
    (out / "README.md").write_text(card(out.name, meta, stages, evals, size, note, weights=f"- files ({size:.2f} MB): {files}"))
    return out


def main(argv: list[str]) -> None:
    from tasks.runner import build_trained

    settings, overrides = parse_args(argv)
    with torch.no_grad():
        built = build_trained(settings["init_from"], overrides)
        print(export(built, settings["format"], settings["out"]))
