"""``run(cfg)``: the one place that instantiates objects from the Hydra config and runs a stage."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig as Config
from omegaconf import OmegaConf
from hydra.core.hydra_config import HydraConfig

from data.jsonl import dumps, write_json
from llm.lora import LoraSpec
from llm.tokens import add_placeholder_tokens
from tasks.composition import (ARCH_MODALITY_KEYS, UsageError, _inherit_modality,
                               modality_for, modality_label, plugin_baselines, plugin_decoder, plugin_nodes,
                               prerequisite, saved_modality_cfg)
from tasks.caches import PrecomputeCaches, precompute_caches
from tasks.callbacks import NonFiniteGuard, PeriodicEval, RunStats, StopFile
from tasks.checkpoint import META_KEY, TrainableOnlyCheckpoint, load_chain, local_path, read_chain, resume_path
from tasks.evaluate import check_scorable, run_generation
from tasks.multimodal import MultimodalLM, OptimSpec
from tasks.resume import AUTO, checkpoint_callbacks, cluster_plugins, resolve_resume, resume_from, with_atomic_io
from tasks.stages import StagePolicy
from tasks.tracking import RunTracking, loggers_for, tracking_callbacks

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """What a plugin's baselines need to build models and trainers exactly as this run does (plain values and
    factories: library code never reads the config)."""

    seed: int
    max_new_tokens: int
    load_llm: Callable[[], Any]
    lora: LoraSpec
    optim: OptimSpec
    make_trainer: Callable[..., L.Trainer]


def instantiate_accepting(node: Config, **runtime: Any) -> Any:
    """Instantiate ``node`` passing only the runtime kwargs its target accepts."""
    target = _locate(node["_target_"])
    params = inspect.signature(target).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        runtime = {k: v for k, v in runtime.items() if k in params}
    return instantiate(node, **runtime)


def _locate(path: str) -> Any:
    from hydra.utils import get_object

    return get_object(path)


def stage_policy(cfg: Config) -> StagePolicy:
    fields = inspect.signature(StagePolicy).parameters
    return StagePolicy(**{k: v for k, v in cfg.stage.items() if k in fields})


def build_trainer(cfg: Config, out: Path, callbacks: list[L.Callback]) -> L.Trainer:
    from lightning.pytorch.callbacks import RichProgressBar

    saving = checkpoint_callbacks(out / "checkpoints", cfg.get("checkpoint_every"), cfg.get("checkpoint_minutes"))
    loggers = loggers_for(cfg)  # logger=csv|tensorboard|wandb|all|[a,b] (tasks.tracking)
    # atomic checkpoint files; under submitit, Lightning's SLURM environment without its own requeue (tasks.resume)
    plugins = cluster_plugins(with_atomic_io(instantiate(cfg.trainer.get("plugins"))))
    return instantiate(cfg.trainer, callbacks=[*saving, RichProgressBar(leave=True), *callbacks,
                                               *tracking_callbacks(cfg, loggers)],
                       logger=loggers or False, default_root_dir=str(out), plugins=plugins)


def _check_scale(cfg: Config) -> int:
    """World size, precision and quant backend checked before any work (llm.sharding.check_scale); returns the
    per-device batch: data.batch_size, or with +global_batch_size=N, N / (world x accumulate), exactly.
    """
    from llm.sharding import check_scale

    t = cfg.trainer
    scale = check_scale(strategy=t.get("strategy"), accelerator=t.get("accelerator", "auto"), devices=t.get("devices", 1),
                        num_nodes=t.get("num_nodes", 1), precision=t.get("precision", "32-true"),
                        quant=cfg.llm.model.get("quant"), batch_size=cfg.data.get("batch_size", 1),
                        global_batch_size=cfg.get("global_batch_size"), accumulate=t.get("accumulate_grad_batches", 1))
    return scale.per_device_batch


@dataclass
class Built:
    """A stage's model and data as ``init_from`` and the config make them (what run() and chat.py share)."""

    policy: StagePolicy
    lm: Any
    modality: Any
    modalities: dict[str, Any]
    metas: list[dict]
    chain: list[Path]
    dm: Any
    model: MultimodalLM
    objectives: dict[str, Any]
    system_prompt: str | None
    modality_cfg: Config
    optim: OptimSpec


def build(cfg: Config, policy: StagePolicy, batch_size: int) -> Built:
    """The LLM, the modality (settings inherited from the checkpoint chain), the data module, the auxiliary
    objectives and the MultimodalLM with the chain's weights loaded; checks the stage may start."""
    chain_ckpts = read_chain(cfg.init_from) if cfg.get("init_from") else []  # read once: the one chain record
    chain_metas = [ckpt[META_KEY] for _, ckpt in chain_ckpts]
    taken = _inherit_modality(cfg, chain_metas, ARCH_MODALITY_KEYS if policy.name == "align" else None)
    if taken:
        log.info("%s: modality settings from the checkpoint: %s", policy.name, taken)
    modality_cfg = OmegaConf.merge(cfg.modality, taken)  # a new node: the composed config stays as composed
    lm = instantiate(cfg.llm.model)
    modalities: dict[str, Any] = {}
    for key, node in plugin_nodes(modality_cfg).items():  # one plugin, or several keyed by name (modality=mixed)
        m = instantiate_accepting(node, d_llm=lm.hidden_size, target_rms=lm.embedding_rms)
        if key and key != m.name:
            raise UsageError(f"modality.plugins.{key} builds the {m.name!r} plugin: key it modality.plugins.{m.name}")
        if m.name in modalities:
            raise UsageError(f"modality: two plugins named {m.name!r} (one per name)")
        modalities[m.name] = m
    modality = next(iter(modalities.values()))
    metas = prerequisite(cfg, policy, modalities, chain_metas, modality_label(cfg, modalities))
    lora_meta = next((m["lora"] for m in metas if m.get("lora")), None)
    lora = LoraSpec(**(lora_meta or OmegaConf.to_container(cfg.llm.lora)))
    system_prompt = cfg.data.get("system_prompt")
    if policy.name == "evaluate":  # evaluate what the chain trained, nothing more
        policy = StagePolicy("evaluate", encoder=False, adaptor=False, lora=bool(lora_meta))
        if system_prompt is None:  # prompt the way the run was trained (data.system_prompt overrides)
            system_prompt = next((m["system_prompt"] for m in metas if m.get("system_prompt") is not None), None)
    placeholder_ids = add_placeholder_tokens(lm.tokenizer, lm.model, [m.placeholder for m in modalities.values()])
    ids = {k: placeholder_ids[m.placeholder] for k, m in modalities.items()}
    for m in modalities.values():  # e.g. a plugin's own tokens added to the LLM's vocabulary
        m.bind_llm(lm.tokenizer, lm.model)
    dm = instantiate_accepting(cfg.data, tokenizer=lm.tokenizer, modalities=modalities, placeholder_ids=ids,
                               batch_size=batch_size, system_prompt=system_prompt)

    def train_records() -> list[dict]:  # read only by an objective that derives its classes from them
        dm.prepare_data()
        return dm.records("train")

    objectives = {f"{name}_{o.name}": o for name, m in modalities.items()
                  for o in m.objectives(dict(cfg.stage), metas, train_records, lm.tokenizer, ids[name], policy.adaptor)}
    optim = OptimSpec(**OmegaConf.to_container(cfg.stage.optim)) if "optim" in cfg.stage else OptimSpec()
    model = MultimodalLM(lm.model, lm.tokenizer, modalities, ids, policy, lora=lora, optim=optim, llm_name=lm.name,
                         lm_weight=cfg.stage.get("lm_weight", 1.0), objectives=objectives, chain_lora=bool(lora_meta))
    chain: list[Path] = []
    if cfg.get("init_from"):
        # a standalone stage trained one plugin alone: its keys gain that plugin's prefix here
        standalone = {m["stage"]: f"modalities.{(m.get('modalities') or [modality.name])[0]}." for m in metas
                      if not m.get("llm")}
        chain = load_chain(model, chain_ckpts, lm.name, list(modalities), prefix_for_stage=standalone)
    return Built(policy, lm, modality, modalities, metas, chain, dm, model, objectives, system_prompt, modality_cfg,
                 optim)


def build_trained(init_from: str, overrides: list[str]) -> Built:
    """A trained model as ``stage=evaluate init_from=...`` builds it, outside a train.py run (chat.py, export.py):
    the modality is read from the checkpoint unless ``modality=`` is among the train.py ``overrides``."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = list(overrides)
    if not any(o.startswith("modality=") for o in overrides):
        overrides.append(f"modality={modality_for(init_from, conf)}")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["stage=evaluate", f"init_from={init_from}", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the modality keys given here win over the checkpoint's, no others
    built = build(cfg, stage_policy(cfg), 1)
    built.model.eval()
    return built


def run(cfg: Config) -> dict[str, Any]:
    """Run one stage as configured; returns (and writes to <output_dir>/metrics.json) its metrics. Every
    configured logger also gets the config, git commit, parameter counts and final metrics (tasks.tracking)."""
    with RunTracking(cfg) as tracking:
        return tracking.finish(_run(cfg))


def _run(cfg: Config) -> dict[str, Any]:
    if cfg.get("init_from"):  # a URL, a missing resume file, a bad on_nonfinite: refused before any work
        local_path("init_from", cfg.init_from)
    if cfg.get("resume") and cfg.resume != AUTO:
        resume_path(cfg.resume)
    guard = NonFiniteGuard(cfg.get("on_nonfinite") or "error")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    policy = stage_policy(cfg)
    if cfg.get("data") is None:
        name = HydraConfig.get().runtime.choices.get("modality") if HydraConfig.initialized() else None
        raise UsageError(f"stage={policy.name} modality={name or '?'}: no data config (add conf/data/<modality>_"
                         f"<stage>.yaml, or a data: node in the modality's own config file)")
    batch_size = _check_scale(cfg)
    if policy.standalone:
        return _run_standalone(cfg, out, policy, batch_size, guard)

    b = build(cfg, policy, batch_size)
    policy, lm, modalities, metas, chain = b.policy, b.lm, b.modalities, b.metas, b.chain
    dm, model, objectives, system_prompt, modality_cfg, optim = (b.dm, b.model, b.objectives, b.system_prompt,
                                                                 b.modality_cfg, b.optim)
    resume = resolve_resume(cfg.get("resume"), out, policy.name, lm.name, list(modalities))  # tasks.resume
    dm.prepare_data()
    if policy.name == "evaluate" or (cfg.get("eval") or {}).get("before", False):
        precompute_caches(dm, modalities, splits=("eval",))  # read before fit; the rest in fit's setup (tasks.caches)
    metrics: dict[str, Any] = {"stage": policy.name, "modality": "+".join(modalities), "llm": lm.name,
                               "init_from": [str(p) for p in chain], "system_prompt": system_prompt}
    objective_meta = {k: v for o in objectives.values() for k, v in o.meta().items()}
    metrics.update({k: len(v) for k, v in objective_meta.items() if isinstance(v, list)})  # e.g. class counts
    ev = cfg.get("eval", {})
    eval_loader = dm.eval_dataloader()
    if eval_loader is not None:  # every sample scorable, checked before training and generating (tasks.evaluate)
        check_scorable(dm.records("eval"))
    train_files = next((m["train_files"] for m in metas if m.get("train_files")), None) or _train_files(cfg)
    if eval_loader is not None:
        model.decoder = plugin_decoder(modalities, dict(ev), list(objectives.values()), metas, train_files)
    beams = int(ev.get("num_beams", 1))
    parts = RunParts(seed=cfg.seed, max_new_tokens=int(ev.get("max_new_tokens", 64)),
                     load_llm=lambda: instantiate(cfg.llm.model), lora=LoraSpec(**OmegaConf.to_container(cfg.llm.lora)),
                     optim=optim, make_trainer=lambda **kw: instantiate(cfg.trainer, **kw))
    if policy.name == "evaluate":
        if eval_loader is None:
            raise UsageError("stage=evaluate needs data.eval_manifest=<records file>")
        metrics.update(run_generation(model, eval_loader, parts.max_new_tokens, out / "predictions.jsonl",
                                      num_beams=beams))
        metrics.update(plugin_baselines(modalities, model, dm, out, parts, write=True))
        return _write_metrics(out, metrics)
    if eval_loader is not None and ev.get("before", False):
        zero = rank_zero_only.rank == 0  # every launched rank runs this, before any weights are sharded
        before = run_generation(model, eval_loader, parts.max_new_tokens,
                                out / "predictions_before.jsonl" if zero else None, desc="evaluate (before)",
                                num_beams=beams, progress=zero)
        metrics.update({f"before/{k}": v for k, v in before.items()})
        log.info("before training: %s", before)
    stats = RunStats()
    extra: list[L.Callback] = []
    if eval_loader is not None and ev.get("every_n_steps"):
        curve = PeriodicEval(eval_loader, int(ev.every_n_steps), parts.max_new_tokens, out / "curve.jsonl",
                             num_beams=beams, stats=stats)
        extra.append(curve)
    meta = {"stage": policy.name, "llm": lm.name, "modalities": list(modalities),
            "parent": str(chain[0]) if chain else None, "lora": OmegaConf.to_container(cfg.llm.lora) if policy.lora else None,
            "system_prompt": system_prompt, **objective_meta, "train_files": _train_files(cfg),
            "modality": modality_label(cfg, modalities), "modality_cfg": saved_modality_cfg(modality_cfg)}
    stop = StopFile(out / "STOP")
    saver = TrainableOnlyCheckpoint(meta, out / "checkpoints")  # parent stored relative to that folder
    trainer = build_trainer(cfg, out, [PrecomputeCaches(dm, modalities), stats, saver, stop, guard, *extra])
    trainer.fit(model, datamodule=dm, ckpt_path=resume_from(trainer, resume))
    metrics.update(stats.summary(trainer, model), **({"resumed_at": resume.step} if resume else {}))
    if stop.stopped_at is not None:  # by <output_dir>/STOP (last.ckpt holds that step: tasks.resume.LastCheckpoint)
        metrics["stopped_early_at"] = stop.stopped_at
    for cb in extra:
        metrics["curve"] = cb.curve
        metrics["periodic_eval_seconds"] = round(cb.eval_seconds, 2)  # not in train_seconds / seconds_per_step
    metrics.update(guard.metrics())
    metrics["skipped_samples"] = len(model.skipped)
    if model.skipped:
        metrics["skipped"] = model.skipped[:100]
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        metrics["checkpoint_mb"] = round(last.stat().st_size / 2**20, 3)
        metrics["llm_mb"] = round(sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20, 1)
    zero = trainer.is_global_zero  # every rank evaluates, in step (weights may be sharded); rank 0 writes
    if eval_loader is not None:
        metrics.update(run_generation(model, eval_loader, parts.max_new_tokens,
                                      out / "predictions.jsonl" if zero else None, num_beams=beams, progress=zero))
        metrics.update(plugin_baselines(modalities, model, dm, out, parts, write=zero))
    return _write_metrics(out, metrics) if zero else metrics


def _run_standalone(cfg: Config, out: Path, policy: StagePolicy, batch_size: int,
                    guard: NonFiniteGuard) -> dict[str, Any]:
    """A standalone stage (conf/stage with standalone: true): the modality trains its encoder alone, with its own
    Lightning hooks, on ``cfg.data``; then the plugin's held-out report."""
    from llm.sharding import full_state_dict, is_sharded

    if not cfg.modality.get("_target_"):
        raise UsageError(f"stage={policy.name} trains one modality's encoder alone; name that modality "
                         f"(e.g. modality={next(iter(plugin_nodes(cfg.modality)))}), not several")
    modality = instantiate_accepting(cfg.modality, d_llm=None, target_rms=None)
    if type(modality).training_step is L.LightningModule.training_step:
        raise UsageError(f"stage={policy.name} pretrains a modality's own encoder; modality={modality.name} has none "
                         f"to pretrain (use stage=align)")
    if not policy.encoder:
        raise UsageError(f"stage={policy.name} with stage.encoder=false has nothing to train")
    modality.set_trainable(encoder=True, adaptor=False)
    if (optim := cfg.stage.get("optim")) is not None:  # stage.optim sets the lr of every stage, this one included
        modality.lr = float(optim.get("lr", modality.lr))
        modality.weight_decay = float(optim.get("weight_decay", modality.weight_decay))
    modality.strict_loading = False  # checkpoints hold only what trains
    chain = load_chain(modality, cfg.init_from, None, [modality.name]) if cfg.get("init_from") else []
    dm = instantiate_accepting(cfg.data, batch_size=batch_size)
    dm.setup()
    meta = {"stage": policy.name, "llm": None, "modalities": [modality.name],
            "parent": str(chain[0]) if chain else None, "lora": None}
    stats = RunStats()
    resume = resolve_resume(cfg.get("resume"), out, policy.name, None, [modality.name])
    trainer = build_trainer(cfg, out, [stats, TrainableOnlyCheckpoint(meta, out / "checkpoints"), guard])
    trainer.fit(modality, datamodule=dm, ckpt_path=resume_from(trainer, resume))
    metrics: dict[str, Any] = {"stage": policy.name, "modality": modality.name, "llm": None,
                               "init_from": [str(p) for p in chain], **stats.summary(trainer, modality),
                               **({"resumed_at": resume.step} if resume else {}), **guard.metrics()}
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        metrics["checkpoint_mb"] = round(last.stat().st_size / 2**20, 3)
    if is_sharded(modality.encoder):  # trainer=fsdp: gather the weights (all ranks) into an unsharded copy
        weights = full_state_dict(modality.encoder)
        if trainer.is_global_zero:
            modality = instantiate_accepting(cfg.modality, d_llm=None, target_rms=None)
            modality.encoder.load_state_dict(weights)
    if not trainer.is_global_zero:
        return metrics
    metrics.update(modality.pretrain_report(dm, out))
    return _write_metrics(out, metrics)


def _train_files(cfg: Config) -> list[str]:
    files = cfg.data.get("train_files")
    if files is None:
        return []
    return [str(Path(f).resolve()) for f in ([files] if isinstance(files, str) else list(files))]


def _write_metrics(out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON (NaN -> null), written atomically (data.jsonl.write_json)."""
    write_json(out / "metrics.json", metrics)
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    print("metrics:", dumps(shown))
    return metrics
