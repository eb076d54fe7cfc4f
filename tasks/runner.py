"""``run(cfg)``: the one place that instantiates objects from the Hydra config and runs a stage."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from llm.lora import LoraSpec
from llm.tokens import add_placeholder_tokens
from tasks.callbacks import PeriodicEval, RunStats, StopFile
from tasks.checkpoint import META_KEY, TrainableOnlyCheckpoint, load_chain, read_checkpoint, resolve_checkpoint
from tasks.evaluate import run_generation
from modality.speech.asr.lexicon import word_decoder
from modality.speech.asr.decode import DecodeSpec
from tasks.multimodal import MultimodalLM, OptimSpec
from tasks.stages import StagePolicy
from modality.stock.baselines import run_text_baseline

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """A run that cannot start as configured; train.py prints it as one line."""


def instantiate_accepting(node: DictConfig, **runtime: Any) -> Any:
    """Instantiate ``node`` passing only the runtime kwargs its target accepts."""
    target = _locate(node["_target_"])
    params = inspect.signature(target).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        runtime = {k: v for k, v in runtime.items() if k in params}
    return instantiate(node, **runtime)


def _locate(path: str) -> Any:
    from hydra.utils import get_object

    return get_object(path)


def stage_policy(cfg: DictConfig) -> StagePolicy:
    fields = inspect.signature(StagePolicy).parameters
    return StagePolicy(**{k: v for k, v in cfg.stage.items() if k in fields})


def build_trainer(cfg: DictConfig, out: Path, callbacks: list[L.Callback]) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step}", save_last=True,
                           save_top_k=0, every_n_train_steps=cfg.get("checkpoint_every") or None,
                           enable_version_counter=False)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    return instantiate(cfg.trainer, callbacks=[ckpt, RichProgressBar(leave=True), *callbacks],
                       logger=logger, default_root_dir=str(out))


def _chain_metas(init_from: str) -> list[dict]:
    """Metadata of ``init_from`` and its parents, newest first."""
    metas, p = [], resolve_checkpoint(init_from)
    while p is not None:
        meta = read_checkpoint(p)[META_KEY]
        metas.append(meta)
        p = Path(meta["parent"]) if meta.get("parent") else None
    return metas


RUNTIME_MODALITY_KEYS = ("d_llm", "target_rms")  # filled from the LLM at run time, never inherited
# what shapes the trained weights: an align run continuing an align run takes these from it
ARCH_MODALITY_KEYS = ("encoder_name", "encoder_layers", "stack", "adaptor", "hidden", "layers", "heads")


def _inherit_modality(cfg: DictConfig, metas: list[dict], keys: tuple[str, ...] | None = None) -> list[str]:
    """stage=evaluate / instruct build the modality as the chain trained it (adaptor kind, widths, compression,
    ...), so ``stage=instruct|evaluate init_from=<run>`` works for any run; keys given on the command line win.
    An align run continuing an align run takes only ``keys`` (the architecture, ARCH_MODALITY_KEYS): it may
    change compression or masking on purpose. Returns the keys taken from the checkpoint."""
    saved = next((m["modality_cfg"] for m in metas if m.get("modality_cfg")), None)
    if not saved or saved.get("_target_") != cfg.modality.get("_target_"):
        return []
    try:
        from hydra.core.hydra_config import HydraConfig

        given = {o.split("=", 1)[0].lstrip("+~").removeprefix("modality.") for o in HydraConfig.get().overrides.task
                 if o.lstrip("+~").startswith("modality.")}
    except ValueError:  # no Hydra run (a plain compose): nothing was given on a command line
        given = set()
    taken = []
    with open_dict(cfg):
        for k, v in saved.items():
            if k not in given and k not in RUNTIME_MODALITY_KEYS and (keys is None or k in keys) and cfg.modality.get(k) != v:
                cfg.modality[k] = v
                taken.append(k)
    return taken


def _prerequisite(cfg: DictConfig, policy: StagePolicy, modality: Any, metas: list[dict]) -> list[dict]:
    """``metas`` (the init_from chain's, newest first), after checking the stage may start."""
    needs = policy.requires
    if policy.name == "align" and getattr(modality, "requires_pretrained_encoder", False):
        needs = "forecast"
    if not cfg.get("init_from"):
        if needs and not cfg.get("allow_no_init"):
            raise UsageError(f"stage={policy.name} modality={modality.name} needs init_from=<a {needs} run dir "
                             f"or .ckpt> (run `python train.py stage={needs} modality={modality.name}` first; "
                             f"allow_no_init=true starts from scratch anyway)")
        return []
    stages = [m["stage"] for m in metas]
    if needs and needs not in stages and policy.name not in stages and needs != "any":
        raise UsageError(f"init_from={cfg.init_from} holds stages {stages}; stage={policy.name} needs a {needs} run")
    return metas


def _check_scale(cfg: DictConfig) -> None:
    """World size, precision and quant backend checked before any work (llm.sharding.check_scale).

    data.batch_size is per device; +global_batch_size=N sets it to N / (world x accumulate), exactly.
    """
    from llm.sharding import check_scale

    t = cfg.trainer
    scale = check_scale(strategy=t.get("strategy"), accelerator=t.get("accelerator", "auto"), devices=t.get("devices", 1),
                        num_nodes=t.get("num_nodes", 1), precision=t.get("precision", "32-true"),
                        quant=cfg.llm.model.get("quant"), batch_size=cfg.data.get("batch_size", 1),
                        global_batch_size=cfg.get("global_batch_size"), accumulate=t.get("accumulate_grad_batches", 1))
    if cfg.get("global_batch_size"):
        cfg.data.batch_size = scale.per_device_batch


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one stage as configured; returns (and writes to <output_dir>/metrics.json) its metrics."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    policy = stage_policy(cfg)
    _check_scale(cfg)
    if policy.name == "forecast":
        from modality.stock.forecast_stage import run_forecast

        return _write_metrics(out, run_forecast(cfg, out, instantiate_accepting, build_trainer))

    chain_metas = _chain_metas(cfg.init_from) if cfg.get("init_from") else []  # read once: checkpoints are large
    if chain_metas:
        keys = ARCH_MODALITY_KEYS if policy.name == "align" else None
        if taken := _inherit_modality(cfg, chain_metas, keys):
            log.info("%s: modality settings from the checkpoint: %s", policy.name, {k: cfg.modality[k] for k in taken})
    lm = instantiate(cfg.llm.model)
    modality = instantiate_accepting(cfg.modality, d_llm=lm.hidden_size, target_rms=lm.embedding_rms)
    modalities = {modality.name: modality}
    metas = _prerequisite(cfg, policy, modality, chain_metas)
    lora_meta = next((m["lora"] for m in metas if m.get("lora")), None)
    lora = LoraSpec(**(lora_meta or OmegaConf.to_container(cfg.llm.lora)))
    if policy.name == "evaluate":  # evaluate what the chain trained, nothing more
        policy = StagePolicy("evaluate", encoder=False, adaptor=False, lora=bool(lora_meta))
        inherited = next((m["system_prompt"] for m in metas if m.get("system_prompt") is not None), None)
        if cfg.data.get("system_prompt") is None and inherited is not None:
            with open_dict(cfg):  # prompt the way the run was trained (data.system_prompt overrides)
                cfg.data.system_prompt = inherited
    placeholder_ids = add_placeholder_tokens(lm.tokenizer, lm.model, [m.placeholder for m in modalities.values()])
    optim = OptimSpec(**OmegaConf.to_container(cfg.stage.optim)) if "optim" in cfg.stage else OptimSpec()
    model = MultimodalLM(lm.model, lm.tokenizer, modalities, {k: placeholder_ids[m.placeholder] for k, m in modalities.items()},
                         policy, lora=lora, optim=optim, aux_weight=cfg.stage.get("aux_weight", 0.0), llm_name=lm.name,
                         ctc_weight=cfg.stage.get("ctc_weight", 0.0), lm_weight=cfg.stage.get("lm_weight", 1.0))
    # the CTC classes the chain's adaptor was trained against (and its classifier, which the chain holds)
    inherited = next((m for m in metas if m.get("ctc_vocab") or m.get("ctc_phonemes")), None)
    if inherited is not None and inherited.get("ctc_phonemes"):
        model.set_ctc_phonemes(inherited["ctc_phonemes"], inherited.get("ctc_language") or "en-us")
    elif inherited is not None:
        model.set_ctc_vocab(torch.tensor(inherited["ctc_vocab"], dtype=torch.long), inherited.get("ctc_classifier", "cosine"))
    chain: list[Path] = []
    if cfg.get("init_from"):
        chain = load_chain(model, cfg.init_from, lm.name, list(modalities),
                           prefix_for_stage={"forecast": f"modalities.{modality.name}."})
    dm = instantiate(cfg.data, tokenizer=lm.tokenizer, modalities=modalities, placeholder_ids=model.placeholder_ids)
    dm.prepare_data()
    _precompute_caches(dm, modalities)
    if inherited is None and model.ctc_weight > 0 and cfg.stage.get("ctc_vocab", "full") == "corpus":
        model.set_ctc_vocab(_corpus_ctc_vocab(dm, lm.tokenizer, list(model.placeholder_ids.values()),
                                              cfg.stage.get("ctc_min_count", 1)), cfg.stage.get("ctc_classifier", "cosine"))
    if inherited is None and model.ctc_weight > 0 and cfg.stage.get("ctc_vocab", "full") == "phonemes":
        from modality.speech.asr.phonemes import Phonemizer

        language = cfg.stage.get("ctc_language", "en-us")
        ph = Phonemizer(language)  # its cache then holds every train transcript's targets
        model.set_ctc_phonemes(_phoneme_classes(dm, ph), language, phonemizer=ph)
    metrics: dict[str, Any] = {"stage": policy.name, "modality": modality.name, "llm": lm.name,
                               "init_from": [str(p) for p in chain], "system_prompt": cfg.data.get("system_prompt")}
    if model.ctc_vocab is not None:
        metrics["ctc_vocab"] = len(model.ctc_vocab)
    if model.ctc_phonemes:
        metrics["ctc_phonemes"] = len(model.ctc_phonemes)
    ev = cfg.get("eval", {})
    decode = DecodeSpec(int(ev.get("num_beams", 1)), float(ev.get("ctc_weight", 0.0)), float(ev.get("length_bonus", 0.0)),
                        int(ev.get("ctc_beams", 0)), int(ev.get("score_batch", 0)))
    eval_loader = dm.eval_dataloader()
    if model.ctc_phonemes and eval_loader is not None:  # words from phonemes: lexicon + word LM (modality.speech.asr.lexicon)
        model.word_decoder = word_decoder(model.ctc_phonemes, model.phonemizer, ev.get("lexicon", {}),
                                          next((m["train_files"] for m in metas if m.get("train_files")), None)
                                          or _train_files(cfg))
    if policy.name == "evaluate":
        if eval_loader is None:
            raise UsageError("stage=evaluate needs data.eval_manifest=<records file>")
        metrics.update(run_generation(model, eval_loader, ev.get("max_new_tokens", 64), out / "predictions.jsonl",
                                           decode=decode))
        metrics.update(run_text_baseline(cfg, model, dm, out))  # {} unless data.text_baseline is set
        return _write_metrics(out, metrics)
    if eval_loader is not None and ev.get("before", False):
        zero = rank_zero_only.rank == 0  # every launched rank runs this, before any weights are sharded
        before = run_generation(model, eval_loader, ev.get("max_new_tokens", 64),
                                out / "predictions_before.jsonl" if zero else None, desc="evaluate (before)",
                                decode=decode, progress=zero)
        metrics.update({f"before/{k}": v for k, v in before.items()})
        log.info("before training: %s", before)
    stats = RunStats()
    extra: list[L.Callback] = []
    if eval_loader is not None and ev.get("every_n_steps"):
        curve = PeriodicEval(eval_loader, int(ev.every_n_steps), ev.get("max_new_tokens", 64), out / "curve.jsonl",
                             decode=decode)
        extra.append(curve)
    meta = {"stage": policy.name, "llm": lm.name, "modalities": list(modalities),
            "parent": str(chain[0]) if chain else None, "lora": OmegaConf.to_container(cfg.llm.lora) if policy.lora else None,
            "system_prompt": cfg.data.get("system_prompt"),
            "ctc_vocab": model.ctc_vocab.tolist() if model.ctc_vocab is not None else None,
            "ctc_classifier": model.ctc_classifier,
            "ctc_phonemes": model.ctc_phonemes, "ctc_language": model.ctc_language,
            "train_files": _train_files(cfg),
            "modality_cfg": {k: v for k, v in OmegaConf.to_container(cfg.modality, resolve=True).items()
                             if k not in RUNTIME_MODALITY_KEYS}}
    stop = StopFile(out / "STOP")
    trainer = build_trainer(cfg, out, [stats, TrainableOnlyCheckpoint(meta), stop, *extra])
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("resume"))
    metrics.update(stats.summary(trainer, model))
    if stop.stopped_at is not None:  # by <output_dir>/STOP: last.ckpt must hold the step it stopped at
        metrics["stopped_early_at"] = stop.stopped_at
        trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")
    for cb in extra:
        metrics["curve"] = cb.curve
    metrics["skipped_samples"] = len(model.skipped)
    if model.skipped:
        metrics["skipped"] = model.skipped[:100]
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        metrics["checkpoint_mb"] = round(last.stat().st_size / 2**20, 3)
        metrics["llm_mb"] = round(sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20, 1)
    zero = trainer.is_global_zero  # every rank evaluates, in step (weights may be sharded); rank 0 writes
    if eval_loader is not None:
        metrics.update(run_generation(model, eval_loader, ev.get("max_new_tokens", 64),
                                      out / "predictions.jsonl" if zero else None, decode=decode, progress=zero))
        metrics.update(run_text_baseline(cfg, model, dm, out, write=zero))  # {} unless data.text_baseline is set
    return _write_metrics(out, metrics) if zero else metrics


def _precompute_caches(dm: Any, modalities: dict[str, Any]) -> None:
    """Encode every clip the run will read once, batched, before training (frozen encoders only)."""
    for name, m in modalities.items():
        if dm.skip_bad or not (getattr(m, "cache_dir", None) and hasattr(m, "precompute_cache") and m.encoder_frozen):
            continue
        refs = {}
        for split in ("train", "val", "eval"):
            for rec in dm.records(split) if dm.files[split] else []:
                for ref in rec.get(name) or []:
                    refs[str(m.resolve(ref, rec.get("root")))] = None
        counts = m.precompute_cache(list(refs))
        log.info("%s encoder cache: %s", name, counts)


def _corpus_ctc_vocab(dm: Any, tokenizer: Any, blank_ids: list[int], min_count: int = 1) -> torch.Tensor:
    """The tokens of the TRAIN transcripts seen >= min_count times, single characters, blanks: stage.ctc_vocab=corpus.

    Train only: a class no training sample spells cannot be learned, and val may be held-out data."""
    from data.collate import ctc_target
    from modality.speech.asr.ctc import corpus_vocab, single_char_tokens

    targets = [t for r in dm.records("train") if (t := ctc_target(tokenizer, r))]
    vocab = corpus_vocab(targets, blank_ids, min_count, always=single_char_tokens(tokenizer))
    log.info("CTC over the corpus vocabulary: %d of %d tokens (seen >= %d times, + single characters)",
             len(vocab), len(tokenizer), min_count)
    return vocab


def _phoneme_classes(dm: Any, ph: Any) -> list[str]:
    """stage.ctc_vocab=phonemes: every phoneme espeak-ng says in the TRAIN transcripts (blank first)."""
    from modality.speech.asr.phonemes import phoneme_inventory

    texts = sorted({r["reference"] for r in dm.records("train") if r.get("type") == "asr" and r.get("reference")})
    seqs = [s for t in tqdm(texts, desc="phonemes", unit="text", leave=False) for s in _safe_phonemes(ph, t)]
    classes = phoneme_inventory(seqs)
    log.info("CTC over %d espeak-ng phonemes (%s) of %d train transcripts", len(classes) - 1, ph.language, len(texts))
    return classes


def _safe_phonemes(ph: Any, text: str) -> list[list[str]]:
    try:
        return ph([text])
    except ValueError:
        return []


def _train_files(cfg: DictConfig) -> list[str]:
    files = cfg.data.get("train_files")
    if files is None:
        return []
    return [str(Path(f).resolve()) for f in ([files] if isinstance(files, str) else list(files))]


def _write_metrics(out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    print("metrics:", json.dumps(shown, default=str))
    return metrics
