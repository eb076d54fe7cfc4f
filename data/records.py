"""Read training records: LLaVA-style conversation JSON/JSONL, and lines in a plugin's own format.

Every record comes out as {"id", "<modality>": [refs], "conversations": [...], "root", ...}; a line without
``conversations`` is offered to the plugins' ``read_record`` adapters (e.g. an ASR manifest line becomes a
one-turn transcription). Errors name the file and line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from data.jsonl import check_utf8, iter_jsonl

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
# What a conversation record may hold besides its inputs (one key per modality of the run). Anything else is an
# error: a clip under another key ("audios", "image") used to be dropped and the record answered as a text chat.
RECORD_KEYS = frozenset({"id", "conversations", "type", "turn_types", "answers", "reference", "fill", "source",
                         "duration", "clip_labels", "meta"})


def _check_keys(rec: dict, where: str, modalities: tuple[str, ...]) -> None:
    unknown = sorted(set(rec) - RECORD_KEYS - set(modalities))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (inputs go under this run's modality keys "
                         f"{list(modalities)}; a record's other keys: {sorted(RECORD_KEYS)}; free-form data: 'meta')")


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
    _gold_reference(rec, where)


def _gold_reference(rec: dict, where: str) -> None:
    """A record's ``answers`` (the normalised gold of each assistant turn, e.g. "second" for "The second one.")
    become its ``reference`` (what evaluation scores the last turn against) unless it names one. Why: scoring
    against the answer turn's phrasing counted "The second clip." wrong for "The second one." and "7" wrong for
    "There are 7 words."."""
    answers = rec.get("answers")
    if answers is None:
        return
    n_answers = sum(ROLES[t["from"]] == "assistant" for t in rec["conversations"])
    if not isinstance(answers, list) or len(answers) != n_answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must list one string per assistant turn ({n_answers}), got {answers!r}")
    if rec.get("reference") is None and ROLES[rec["conversations"][-1]["from"]] == "assistant":
        rec["reference"] = answers[-1]


Adapter = Callable[[dict, str, random.Random], "dict | None"]


def read_records(path: str | Path, modalities: tuple[str, ...] = (), seed: int = 0,
                 adapters: Sequence[Adapter] = ()) -> list[dict]:
    """Read a .json list or a .jsonl file of records: LLaVA conversations, or lines in a plugin's own format that
    one of ``adapters`` (Modality.read_record) turns into a conversation. ``modalities``: the names whose
    references a record may hold (a single reference becomes a list)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: records file not found")
    rng = random.Random(seed)
    raw: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            check_utf8(path)  # raises naming the line and byte
            raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        raw = [(f"{path}#{i}", r) for i, r in enumerate(data)]
    else:
        raw = [(f"{path}:{n}", rec) for n, rec in iter_jsonl(path)]
    out = []
    for where, rec in raw:
        if isinstance(rec, dict) and "conversations" not in rec:  # a plugin's own line format (its own keys)
            rec = next((r for adapt in adapters if (r := adapt(rec, where, rng)) is not None), rec)
        elif isinstance(rec, dict):
            _check_keys(rec, where, modalities)
        _check_record(rec, where, modalities)
        rec.setdefault("id", where)
        rec["root"] = str(path.parent)
        rec["where"] = where
        out.append(rec)
    return out


def to_messages(rec: dict) -> list[dict[str, str]]:
    """LLaVA turns -> chat-template messages."""
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in rec["conversations"]]
