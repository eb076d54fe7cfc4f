"""How speech answers are written at evaluation: the Decoder the speech plugin gives MultimodalLM.

* A phoneme chain the LLM does not read: transcripts by the lexicon decoder (modality.speech.asr.lexicon), other
  answers by the LLM.
* A phoneme chain the LLM reads (``modality.ctc_compress=soft``): the LLM writes every answer (greedy, or its beams
  re-scored by the phoneme CTC with ``eval.joint_weight``); ``eval.lexicon.reference=true`` adds the lexicon
  decoder's transcript beside it (``lexicon`` per row, ``lexicon_wer``): a reference, not the answer.
* Otherwise the LLM writes every answer: greedy, its ``eval.num_beams`` beams, or joint CTC/LLM decoding of
  transcripts (``eval.joint_weight`` > 0; modality.speech.asr.decode).

Each prediction row keeps the adaptor's own greedy reading (``ctc_readout`` text or ``phoneme_readout``) and
the scored ``candidates``; ``metrics`` adds ``ctc_wer`` / ``ctc_per`` over the transcript rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from modality.base import Decoder
from modality.speech.asr.decode import DecodeSpec, joint_decode
from modality.speech.asr.objective import CtcObjective


class SpeechDecoder(Decoder):
    def __init__(self, objective: CtcObjective | None, spec: DecodeSpec, words: Any = None, reference: Any = None):
        self.objective, self.spec, self.words, self.reference = objective, spec, words, reference

    @property
    def readout_field(self) -> str:
        return "phoneme_readout" if self.objective is not None and self.objective.phonemes else "ctc_readout"

    def decode(self, model: Any, batch: dict, max_new_tokens: int) -> tuple[list[str], list[dict[str, Any]]]:
        from tasks.evaluate import WER_TYPES

        if self.words is not None:
            from modality.speech.asr.lexicon import lexicon_decode

            texts, reads, cands = lexicon_decode(model, self.objective, self.words, batch, max_new_tokens, WER_TYPES)
        else:
            texts, reads, cands = joint_decode(model, self.objective, batch, max_new_tokens, self.spec, WER_TYPES)
        extras = [{**({self.readout_field: r} if r is not None else {}), **({"candidates": c} if c is not None else {})}
                  for r, c in zip(reads, cands)]
        if self.reference is not None:
            from modality.speech.asr.lexicon import lexicon_decode

            _, _, lex = lexicon_decode(model, self.objective, self.reference, batch, max_new_tokens, WER_TYPES)
            for e, c in zip(extras, lex):
                if c is not None:
                    e["lexicon"] = max(c, key=lambda x: x["decoder"] + self.reference.llm_weight * x.get("llm", 0.0))["text"]
        return texts, extras

    def metrics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """The adaptor's own reading of the transcript rows beside what the LLM (or the lexicon) wrote:
        phoneme error rate against espeak-ng's phonemes of the reference, or word error rate."""
        from tasks.evaluate import WER_TYPES, edit_distance, normalize, wer

        out = {}
        lexicon = [(r["reference"] or "", r["lexicon"]) for r in rows if r.get("type") in WER_TYPES and "lexicon" in r]
        if lexicon:
            out["lexicon_wer"] = round(wer([r for r, _ in lexicon], [h for _, h in lexicon]), 4)
        field = self.readout_field
        spelled = [(r["reference"] or "", r[field]) for r in rows if r.get("type") in WER_TYPES and field in r]
        if not spelled:
            return out
        if field == "phoneme_readout":
            ph = self.objective.phonemizer
            ref_ph = [ph([r])[0] if normalize(r) else [] for r, _ in spelled]
            errors = sum(edit_distance(t, c.split()) for t, (_, c) in zip(ref_ph, spelled))
            return {**out, "ctc_per": round(errors / max(1, sum(len(t) for t in ref_ph)), 4)}
        return {**out, "ctc_wer": round(wer([r for r, _ in spelled], [c for _, c in spelled]), 4)}


def build_speech_decoder(settings: Mapping[str, Any], objectives: Sequence[Any],
                         train_files: Sequence[str]) -> SpeechDecoder | None:
    """The decoder an evaluation of this chain needs (``settings``: the eval config); None: plain greedy."""
    objective = next((o for o in objectives if isinstance(o, CtcObjective)), None)
    spec = DecodeSpec(int(settings.get("num_beams", 1)), float(settings.get("joint_weight", 0.0)),
                      float(settings.get("length_bonus", 0.0)), int(settings.get("ctc_beams", 0)),
                      int(settings.get("score_batch", 0)))
    if objective is not None and objective.phonemes:
        from modality.speech.asr.lexicon import word_decoder

        lex = dict(settings.get("lexicon", {}) or {})
        if objective.compress:  # the LLM reads the phonemes and writes the words; the lexicon only as a reference
            reference = lex.pop("reference", False)
            ref = word_decoder(objective.phonemes, objective.phonemizer, lex, train_files) if reference else None
            return SpeechDecoder(objective, spec, reference=ref)
        lex.pop("reference", None)
        words = word_decoder(objective.phonemes, objective.phonemizer, lex, train_files)  # lexicon + word LM
        return SpeechDecoder(objective, spec, words)
    if objective is None and spec == DecodeSpec():
        return None
    return SpeechDecoder(objective, spec)
