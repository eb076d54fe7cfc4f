"""Text-only baselines for the stock modality: the same questions, the window written as text.

The adaptor's value is what the multimodal model scores above the SAME LLM reading the SAME
window as text: the ``<stock>`` placeholder becomes the last closes plus every computed
signal the adaptor also gets (modality/stock/data/datamodule.py ``render_window``). All rows are scored with
tasks.evaluate.score, per question type, on the same eval records as the model:

- ``text_zero_shot/*``: the frozen base LLM (the run's LoRA disabled). One generation pass;
  a floor, since it never saw the answer format the keys are written in.
- ``text_lora/*`` (``data.text_baseline.train_lora=true``; stage=instruct, or stage=evaluate given
  ``data.train_files``, ``trainer.max_steps`` and ``+stage.optim``): a fresh LoRA
  on the base LLM trained on this run's own training records rendered as text, with the same
  LoRA spec, optimiser, batch size, steps and seed. The fair comparison: same LLM, same
  supervision, same budget; only the input path differs. (The multimodal model also had its
  align stage; the text LoRA gets no steps for that.) It loads a second copy of the LLM and
  doubles the stage's time, so it is opt-in.
- ``majority/*``: always answering each type's most common reference (what guessing scores).

Rendered records land in ``<run>/text_baseline/`` and predictions in
``<run>/predictions_text_{zero_shot,lora}.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from data.collate import ConversationCollator
from data.dataset import ConversationDataset, fill_templates
from modality.stock.data.datamodule import as_text_record
from modality.stock.data.text import write_records
from tasks.evaluate import run_generation, score


@dataclass
class TextBaselineSpec:
    zero_shot: bool = True     # the frozen base LLM on text prompts
    train_lora: bool = False   # also train a text-only LoRA with the instruct run's budget
    n_closes: int = 10         # last closes written into the prompt
    signals: bool = True       # also write the computed signals (what the adaptor's summary carries)
    max_length: int = 1024     # text prompts are longer than the modality's few positions

    def __post_init__(self) -> None:
        if self.n_closes < 1 or self.max_length < 16:
            raise ValueError(f"text_baseline: n_closes must be >= 1 and max_length >= 16, got {self}")


@contextlib.contextmanager
def base_llm(llm: Any) -> Iterator[None]:
    """Run ``llm`` without its LoRA (a PEFT model's adapters disabled); a plain LLM as it is."""
    with llm.disable_adapter() if hasattr(llm, "disable_adapter") else contextlib.nullcontext():
        yield


def majority(types: list[str], refs: list[str]) -> dict[str, float]:
    """Accuracy of answering every question of a type with that type's most common reference."""
    common = {t: Counter(r for tt, r in zip(types, refs) if tt == t).most_common(1)[0][0] for t in set(types)}
    return score(types, refs, [common[t] for t in types])


def filled(rec: dict, stock: Any) -> dict:
    """``rec`` with its ``{field}`` answer templates written by the stock plugin (the forecaster's call) and
    no ``fill`` key: the text baseline learns the same answers without the plugin."""
    if not rec.get("fill"):
        return rec
    fields = stock.answer_fields(rec["stock"][0], rec.get("root"))
    conv = [{**t, "value": fill_templates(t["value"], fields)} for t in rec["conversations"]]
    return {**{k: v for k, v in rec.items() if k != "fill"}, "conversations": conv}


def forecaster_head(records: list[dict], stock: Any) -> dict[str, float]:
    """The forecaster's own call on the forecast questions (no LLM): what the LLM should not lose."""
    recs = [r for r in records if str(r.get("type", "")).startswith("forecast_")]
    if not recs:
        return {}
    preds = [stock.answer_fields(r["stock"][0], r.get("root"))[r["type"]] for r in recs]
    m = score([r["type"] for r in recs], [r["reference"] for r in recs], preds)
    return {k: v for k, v in m.items() if k.startswith("accuracy/")}


def text_loader(records: list[dict], tokenizer: Any, batch_size: int, max_length: int, generate: bool,
                shuffle: bool = False, system_prompt: str | None = None) -> DataLoader:
    """Text records prompted the way the run prompts its own (``system_prompt``: the run's data.system_prompt)."""
    collate = ConversationCollator(tokenizer, {}, {}, max_length, generate=generate)
    return DataLoader(ConversationDataset(records, {}, system_prompt=system_prompt), batch_size=batch_size,
                      shuffle=shuffle, collate_fn=collate)


def run_text_baseline(model: Any, dm: Any, out: Path, parts: Any, write: bool = True) -> dict[str, Any]:
    """Text baselines next to ``model`` on ``dm``'s eval records; {} unless ``dm.text_baseline`` is set.
    ``parts`` (tasks.runner.RunParts) builds the LLM and trainer as the run does. In a multi-process run every
    rank runs it in step (sharded weights, the text LoRA's own fit); only the ``write`` rank writes files."""
    settings = getattr(dm, "text_baseline", None)
    if not settings or not dm.files.get("eval"):
        return {}
    spec = TextBaselineSpec(**settings)
    stock = model.modalities["stock"]
    load = stock.load
    render = {"n_closes": spec.n_closes, "signals": spec.signals}
    eval_recs = [as_text_record(filled(r, stock), load, **render) for r in dm.records("eval")]
    if write:
        write_records(eval_recs, out / "text_baseline" / "eval.jsonl")
    metrics: dict[str, Any] = {}
    types, refs = [r.get("type", "chat") for r in eval_recs], [r.get("reference") or "" for r in eval_recs]
    metrics.update({f"majority/{k}": v for k, v in majority(types, refs).items() if k != "eval_samples"})
    metrics.update({f"forecaster/{k}": v for k, v in forecaster_head(dm.records("eval"), stock).items()})
    max_new = parts.max_new_tokens
    loader = text_loader(eval_recs, model.tokenizer, dm.eval_batch_size, spec.max_length, generate=True,
                         system_prompt=dm.system_prompt)
    if spec.zero_shot:
        with base_llm(model.llm):
            m = run_generation(model, loader, max_new, out / "predictions_text_zero_shot.jsonl" if write else None,
                               desc="text baseline (zero-shot)", progress=write)
        metrics.update({f"text_zero_shot/{k}": v for k, v in m.items()})
    if spec.train_lora and dm.files.get("train"):  # stage=instruct, or stage=evaluate given data.train_files
        train_recs = [as_text_record(filled(r, stock), load, **render) for r in dm.records("train")]
        metrics.update(train_text_lora(parts, train_recs, eval_recs, dm, spec, out, write))
    return metrics


def train_text_lora(parts: Any, train_recs: list[dict], eval_recs: list[dict], dm: Any,
                    spec: TextBaselineSpec, out: Path, write: bool = True) -> dict[str, Any]:
    """Fresh LoRA on a second copy of the base LLM, trained on text records with the run's budget."""
    from lightning.pytorch.callbacks import RichProgressBar

    from llm.tokens import add_placeholder_tokens
    from tasks.callbacks import RunStats
    from tasks.multimodal import MultimodalLM
    from tasks.stages import StagePolicy

    if write:
        write_records(train_recs, out / "text_baseline" / "train.jsonl")
    L.seed_everything(parts.seed, workers=True)
    lm = parts.load_llm()
    add_placeholder_tokens(lm.tokenizer, lm.model, [])  # the same chat-template fallback as the run
    text_model = MultimodalLM(lm.model, lm.tokenizer, {}, {}, StagePolicy("instruct", adaptor=False, lora=True),
                              lora=parts.lora, optim=parts.optim, llm_name=lm.name)
    train = text_loader(train_recs, lm.tokenizer, dm.batch_size, spec.max_length, generate=False, shuffle=True,
                       system_prompt=dm.system_prompt)
    stats = RunStats()
    trainer = parts.make_trainer(callbacks=[RichProgressBar(leave=True), stats], logger=False,
                                 enable_checkpointing=False, limit_val_batches=0,
                                 default_root_dir=str(out / "text_baseline"))
    trainer.fit(text_model, train_dataloaders=train)
    summary = stats.summary(trainer, text_model)
    metrics = {f"text_lora/{k}": summary[k] for k in ("steps", "first_loss_avg", "last_loss_avg", "train_seconds",
                                                       "seconds_per_step", "trainable_params")}
    loader = text_loader(eval_recs, lm.tokenizer, dm.eval_batch_size, spec.max_length, generate=True,
                         system_prompt=dm.system_prompt)
    m = run_generation(text_model, loader, parts.max_new_tokens,
                       out / "predictions_text_lora.jsonl" if write else None, desc="text baseline (LoRA)",
                       progress=write)
    metrics.update({f"text_lora/{k}": v for k, v in m.items()})
    if write:
        (out / "text_baseline" / "summary.json").write_text(json.dumps(metrics, indent=2))
    return metrics
