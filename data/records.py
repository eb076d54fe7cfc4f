"""Read training records: LLaVA-style conversation JSON/JSONL and NeMo ASR manifests.

Every record comes out as {"id", "<modality>": [refs], "conversations": [...], "root", ...};
a NeMo line (``audio_filepath``, ``text``) becomes a one-turn ASR conversation. Errors name
the file and line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
ASR_PROMPTS = (
    "Transcribe the audio.",
    "What does the speaker say?",
    "Write down exactly what you hear.",
    "Repeat the spoken words as text.",
    "Transcribe this recording.",
)


def _check_record(rec: Any, where: str, modalities: tuple[str, ...]) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"{where}: missing or empty 'conversations' list")
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: conversations[{i}] needs 'from' in {sorted(ROLES)} and a string 'value'")
    for m in modalities:
        if m in rec and not isinstance(rec[m], list):
            rec[m] = [rec[m]]


def asr_record(line: dict, where: str, prompt: str) -> dict:
    """A NeMo manifest line -> an align conversation with the transcript as the answer."""
    for key in ("audio_filepath", "text"):
        if key not in line:
            raise ValueError(f"{where}: NeMo manifest line lacks '{key}'")
    rec = {k: v for k, v in line.items() if k not in ("audio_filepath",)}
    rec.update({"id": line.get("id", where), "speech": [line["audio_filepath"]], "type": "asr",
                "reference": line["text"],
                "conversations": [{"from": "human", "value": f"<speech>\n{prompt}"},
                                  {"from": "gpt", "value": line["text"]}]})
    return rec


def read_records(path: str | Path, modalities: tuple[str, ...] = ("speech", "stock"),
                 seed: int = 0, prompts: tuple[str, ...] = ASR_PROMPTS) -> list[dict]:
    """Read a .json list or a .jsonl file of records (LLaVA conversations or NeMo lines)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: records file not found")
    rng = random.Random(seed)
    raw: list[tuple[str, Any]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        raw = [(f"{path}#{i}", r) for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
    out = []
    for where, rec in raw:
        if isinstance(rec, dict) and "audio_filepath" in rec and "conversations" not in rec:
            rec = asr_record(rec, where, rng.choice(prompts))
        _check_record(rec, where, modalities)
        rec.setdefault("id", where)
        rec["root"] = str(path.parent)
        rec["where"] = where
        out.append(rec)
    return out


def to_messages(rec: dict) -> list[dict[str, str]]:
    """LLaVA turns -> chat-template messages."""
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in rec["conversations"]]
