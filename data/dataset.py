"""A dataset of conversation records whose modality references load through their plugins."""

from __future__ import annotations

import logging
import re
from typing import Any

from torch.utils.data import Dataset

from data.records import to_messages

log = logging.getLogger(__name__)


def fill_templates(text: str, fields: dict[str, str]) -> str:
    """``{field}`` answer templates in ``text`` written with ``fields`` (Modality.answer_fields)."""
    for k, v in fields.items():
        text = text.replace("{" + k + "}", v)
    return text


class ConversationDataset(Dataset):
    """Loads each record's modality inputs with ``modality.load_features``.

    With ``skip_bad=True`` a sample whose input fails to load comes back as
    ``{"skipped": id, "error": msg}``; the collator drops it and the batch reports it, so every
    skip is counted (also across DataLoader workers). Otherwise the error propagates.
    ``system_prompt`` (when not None) becomes the system turn of records that have none, which
    replaces a chat template's default one ("" keeps just the empty turn: SmolLM2's default is
    16 tokens, ~20% of an align sample).
    """

    def __init__(self, records: list[dict], modalities: dict[str, Any], skip_bad: bool = False,
                 system_prompt: str | None = None):
        self.records = records
        self.modalities = modalities
        self.skip_bad = skip_bad
        self.system_prompt = system_prompt

    def __len__(self) -> int:
        return len(self.records)

    def _fill(self, rec: dict, messages: list[dict]) -> list[dict]:
        """Write a ``"fill": <modality>`` record's ``{field}`` answer templates with that plugin's answer_fields."""
        where, name = rec.get("where", rec.get("id")), rec["fill"]
        if name not in self.modalities or not rec.get(name):
            raise ValueError(f"{where}: 'fill': {name!r} names no {name} input of this run")
        fields = self.modalities[name].answer_fields(rec[name][0], rec.get("root"))
        out = []
        for msg in messages:
            text = fill_templates(msg["content"], fields)
            left = re.findall(r"\{[a-z_]+\}", text)
            if left:
                raise ValueError(f"{where}: {name} cannot fill {left[0]} (it fills {sorted(fields)})")
            out.append({**msg, "content": text})
        return out

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        try:
            inputs: dict[str, list] = {}
            kinds: dict[str, str] = {}
            readings: dict[str, list] = {}
            for name, m in self.modalities.items():
                refs = rec.get(name) or []
                for ref in refs:
                    tensor, kind = m.load_features(ref, rec.get("root"))
                    if kinds.setdefault(name, kind) != kind:
                        raise ValueError(f"{rec['where']}: mixed input kinds for {name}")
                    inputs.setdefault(name, []).append(tensor)
                    readings.setdefault(name, []).append(m.reading(ref, rec.get("root")))
            messages = to_messages(rec)
            if rec.get("fill"):
                messages = self._fill(rec, messages)
            if self.system_prompt is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system_prompt}] + messages
            return {"id": rec["id"], "where": rec.get("where", rec["id"]), "messages": messages,
                    "inputs": inputs, "kinds": kinds, "readings": readings, "type": rec.get("type", "chat"),
                    "reference": rec.get("reference"), "clip_labels": rec.get("clip_labels")}
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            if not self.skip_bad:
                raise
            log.warning("skipping sample %s: %s", rec.get("where", rec.get("id")), e)
            return {"skipped": rec.get("where", rec.get("id")), "error": str(e).splitlines()[0]}
