"""Speech: everything about the modality lives here (plugin, front end, encoder import, units, its ASR
objectives and decoders under asr/, its corpus builders under corpus/)."""

from modality.speech.plugin import SpeechModality

__all__ = ["SpeechModality"]
