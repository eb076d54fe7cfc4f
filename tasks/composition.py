"""Several modality plugins in one model, as config and checkpoint describe them: the plugin configs of a
``modality`` node (one ``_target_``, or ``plugins`` of several: conf/modality/mixed.yaml), the settings a chain's
checkpoint hands on to each plugin, each plugin's stage prerequisite, and the combined decoder and baselines.
Nothing here instantiates from config: tasks.runner does, with these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig as Config
from omegaconf import OmegaConf

from tasks.checkpoint import META_KEY, read_chain
from tasks.stages import StagePolicy


class UsageError(ValueError):
    """A run that cannot start as configured; train.py prints it as one line."""


RUNTIME_MODALITY_KEYS = ("d_llm", "target_rms")  # filled from the LLM at run time, never inherited
# what shapes the trained weights: an align run continuing an align run takes these from it
ARCH_MODALITY_KEYS = ("encoder_name", "encoder_layers", "stack", "adaptor", "hidden", "layers", "heads")


def plugin_nodes(node: Config) -> dict[str, Config]:
    """The plugin configs of a ``modality`` node, by key: the node itself (one ``_target_``, key "") or, for several
    modalities in one model (conf/modality/mixed.yaml), each entry of its ``plugins``, keyed by plugin name."""
    if node.get("_target_"):
        return {"": node}
    plugins = node.get("plugins")
    if not plugins:
        raise UsageError("modality: the config names no plugin (a _target_, or plugins: {<name>: <plugin config>})")
    return {str(k): v for k, v in plugins.items()}


def saved_nodes(saved: dict) -> list[dict]:
    """A checkpoint's ``modality_cfg`` (one plugin's settings, or ``plugins`` of several) as a list of them."""
    return [saved] if saved.get("_target_") else list((saved.get("plugins") or {}).values())


def _inherit_modality(cfg: Config, metas: list[dict], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """stage=evaluate / instruct build the modality as the chain trained it (adaptor kind, widths, compression,
    ...), so ``stage=instruct|evaluate init_from=<run>`` works for any run; keys given on the command line win.
    An align run continuing an align run takes only ``keys`` (the architecture, ARCH_MODALITY_KEYS): it may
    change compression or masking on purpose. Each plugin takes the settings of the chain's plugin with its
    ``_target_`` (several in a mixed run: ``{"plugins": {name: settings}}``). Returns the settings taken from the
    checkpoint (the composed config is not changed: the builder applies them)."""
    saved = next((m["modality_cfg"] for m in metas if m.get("modality_cfg")), None)
    if not saved:
        return {}
    try:
        given = {o.split("=", 1)[0].lstrip("+~").removeprefix("modality.") for o in HydraConfig.get().overrides.task
                 if o.lstrip("+~").startswith("modality.")}
    except ValueError:  # no Hydra run (a plain compose): nothing was given on a command line
        given = set()
    taken: dict[str, Any] = {}
    for key, node in plugin_nodes(cfg.modality).items():
        old = next((s for s in saved_nodes(saved) if s.get("_target_") == node.get("_target_")), None)
        prefix = f"plugins.{key}." if key else ""
        mine = {k: v for k, v in (old or {}).items()
                if prefix + k not in given and k not in RUNTIME_MODALITY_KEYS and (keys is None or k in keys)
                and node.get(k) != v}
        if mine and key:
            taken.setdefault("plugins", {})[key] = mine
        elif mine:
            taken = mine
    return taken


def prerequisite(cfg: Config, policy: StagePolicy, modalities: dict[str, Any], metas: list[dict],
                 label: str) -> list[dict]:
    """``metas`` (the init_from chain's, newest first), after checking the stage may start. ``label``: the
    modality as the command line names it. Each plugin's own prerequisite (``align_requires``) must be in the
    part of the chain that trained that plugin."""
    needs = policy.requires
    own = [(name, m.align_requires) for name, m in modalities.items() if m.align_requires] if policy.name == "align" else []
    if own:
        needs = own[0][1]
    if not cfg.get("init_from"):
        if needs and not cfg.get("allow_no_init"):
            who = own[0][0] if own else label
            raise UsageError(f"stage={policy.name} modality={label} needs init_from=<a {needs} run dir "
                             f"or .ckpt> (run `python train.py stage={needs} modality={who}` first; "
                             f"allow_no_init=true starts from scratch anyway)")
        return []
    stages = [st for m in metas for st in m.get("stages", [m["stage"]])]  # a packed model lists its chain's
    if needs and needs not in stages and policy.name not in stages and needs != "any":
        raise UsageError(f"init_from={cfg.init_from} holds stages {stages}; stage={policy.name} needs a {needs} run")
    for name, need in own if len(modalities) > 1 else []:
        trained = [st for m in metas if name in m.get("modalities", [name]) for st in m.get("stages", [m["stage"]])]
        if need not in trained and policy.name not in trained and not cfg.get("allow_no_init"):
            raise UsageError(f"init_from={cfg.init_from}: no {need} run of modality {name} in its chain (stages "
                             f"{stages}); stage={policy.name} modality={label} needs one for {name}")
    return metas


def modality_label(cfg: Config, modalities: dict[str, Any]) -> str:
    """The modality as the command line named it (``modality=<option>``), else the plugin names joined by '+'."""
    if HydraConfig.initialized() and (choice := HydraConfig.get().runtime.choices.get("modality")):
        return str(choice)
    return "+".join(modalities)


def modality_for(init_from: str, conf_dir: Path) -> str:
    """The conf/modality option that built the checkpoint chain's modality: the one the run named (``modality``
    in its metadata) when it is still there, else the one whose ``_target_`` built it."""
    import yaml

    metas = [ckpt[META_KEY] for _, ckpt in read_chain(init_from)]
    choice = next((m["modality"] for m in metas if m.get("modality")), None)
    if choice and (conf_dir / "modality" / f"{choice}.yaml").is_file():
        return str(choice)
    saved = next((m["modality_cfg"] for m in metas if m.get("modality_cfg")), {})
    target = saved.get("_target_") or sorted(s.get("_target_") for s in saved_nodes(saved))
    for f in sorted((conf_dir / "modality").glob("*.yaml")):
        if (yaml.safe_load(f.read_text()) or {}).get("_target_") == target:
            return f.stem
    raise UsageError(f"init_from={init_from}: no conf/modality config builds {target!r}; pass modality=<name>")


def saved_modality_cfg(modality_cfg: Config) -> dict[str, Any]:
    """What the checkpoint keeps of the modality config (each plugin's settings but the run-time ones): what
    stage=instruct / evaluate init_from=<this run> rebuild the plugins from."""
    nodes = {k: {n: v for n, v in OmegaConf.to_container(node, resolve=True).items() if n not in RUNTIME_MODALITY_KEYS}
             for k, node in plugin_nodes(modality_cfg).items()}
    return nodes.get("", {"plugins": nodes})


def plugin_decoder(modalities: dict[str, Any], settings: dict, objectives: list, metas: list[dict],
                   train_files: list[str]) -> Any:
    """The one plugin decoder that writes answers its own way (None: the LLM generates); it decodes every
    evaluation sample, so two plugins that each bring one are refused."""
    decoders = {n: d for n, m in modalities.items()
                if (d := m.decoder(settings, objectives, metas, train_files)) is not None}
    if len(decoders) > 1:
        raise UsageError(f"modalities {sorted(decoders)} each decode answers their own way; evaluate one at a time")
    return next(iter(decoders.values()), None)


def plugin_baselines(modalities: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Every plugin's reference scores (each plugin names its own keys)."""
    return {k: v for m in modalities.values() for k, v in m.baselines(*args, **kwargs).items()}
