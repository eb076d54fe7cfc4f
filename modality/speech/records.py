"""Speech's own record format: a NeMo ASR manifest line becomes a one-turn transcription conversation."""

from __future__ import annotations

import random

from modality.speech.tone import TONE_LABELS

ASR_PROMPTS = (
    "Transcribe the audio.",
    "What does the speaker say?",
    "Write down exactly what you hear.",
    "Repeat the spoken words as text.",
    "Transcribe this recording.",
)


def asr_record(line: dict, where: str, prompt: str, key: str = "speech", placeholder: str = "<speech>") -> dict:
    """A NeMo manifest line -> an align conversation with the transcript as the answer."""
    for field in (() if line.get("from_text") else ("audio_filepath",)) + ("text",):
        if field not in line:
            raise ValueError(f"{where}: NeMo manifest line lacks '{field}'")
    rec = {k: v for k, v in line.items() if k not in ("audio_filepath", "from_text")}
    ref = {"text": line["text"]} if line.get("from_text") else line["audio_filepath"]
    rec.update({"id": line.get("id", where), key: [ref], "type": "asr",
                "reference": line["text"],
                "conversations": [{"from": "human", "value": f"{placeholder}\n{prompt}"},
                                  {"from": "gpt", "value": line["text"]}]})
    labels = {k: line[k] for k in TONE_LABELS if line.get(k) is not None}
    if labels:  # how the clip sounds, for the tone heads (modality.speech.tone)
        rec["clip_labels"] = [labels]
    return rec


def manifest_record(line: dict, where: str, rng: random.Random, key: str, placeholder: str) -> dict | None:
    """Modality.read_record for the speech plugins: NeMo lines (``audio_filepath`` without ``conversations``), or
    ``{"text": ..., "from_text": true}``: the transcript's phonemes stand in for a clip (asr.text_reading)."""
    if not ("audio_filepath" in line or line.get("from_text")) or "conversations" in line:
        return None
    return asr_record(line, where, rng.choice(ASR_PROMPTS), key, placeholder)


def read_speech_records(path: str, seed: int = 0) -> list[dict]:
    """data.records.read_records with NeMo manifest lines read as speech transcription records."""
    from data.records import read_records

    return read_records(path, ("speech",), seed, adapters=[
        lambda line, where, rng: manifest_record(line, where, rng, "speech", "<speech>")])
