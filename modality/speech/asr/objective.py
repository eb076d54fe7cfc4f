"""CTC of the speech adaptor's outputs against each transcript: the objective speech adds to MultimodalLM.

Two kinds of classes (``stage.ctc_vocab``):

* ``corpus`` / ``full``: LLM tokens (the corpus's frequent tokens + single characters, or every row), the
  placeholder token as the blank; the classifier is a trained linear head or the cosine against the frozen
  embedding rows (``stage.ctc_classifier``). Its greedy readout is text (``ctc_readout``, ``val/ctc_wer``), and
  ``modality.ctc_compress`` can feed the LLM the collapsed spelling.
* ``phonemes``: espeak-ng's canonical phonemes of the transcript (modality.speech.asr.phonemes), blank first,
  with a trained linear head; its readout is phonemes (``phoneme_readout``, ``val/ctc_per``). Words come from the
  lexicon decoder at evaluation, or, with ``modality.ctc_compress=soft``, the LLM reads the collapsed phonemes
  (each kept position = its phoneme distribution @ a table of the LLM's own rows for each phoneme's IPA text)
  and writes the words itself.

The classes, the classifier kind and the language travel in the checkpoint (``meta``); a later stage rebuilds
the objective from them, so its heads load from the chain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from modality.base import Objective, text_rows
from modality.speech.asr.ctc import (SpellingSegmenter, class_index, corpus_vocab, cosine_logits, ctc_compress, ctc_loss,
                                     greedy_ctc_decode, linear_head, single_char_tokens, to_classes)
from modality.speech.asr.phonemes import BLANK, WORD, Phonemizer, phoneme_inventory

TRANSCRIPT = "asr"  # record type whose answer is the clip's transcript (the CTC target)


def token_target(tokenizer: Any, reference: str | None, kind: str | None) -> list[int] | None:
    """The transcript's token ids (as the LLM would write it after a space), for transcript samples only."""
    if kind != TRANSCRIPT or not reference:
        return None
    return tokenizer.encode(" " + reference.strip(), add_special_tokens=False)


class CtcObjective(Objective):
    """CTC over token or phoneme classes for one modality (see the module docstring)."""

    name = "ctc"

    def __init__(self, modality: str, tokenizer: Any, placeholder_id: int, d_llm: int, weight: float = 0.0,
                 trainable: bool = True, vocab: Tensor | None = None, classifier: str = "cosine",
                 phonemes: Sequence[str] | None = None, language: str = "en-us", phonemizer: Any = None,
                 compress: str | bool = False):
        super().__init__(weight)
        if classifier not in ("cosine", "linear"):
            raise ValueError(f"ctc classifier must be 'cosine' or 'linear', got {classifier!r}")
        self.modality, self.tokenizer, self.placeholder_id = modality, tokenizer, placeholder_id
        self.phonemes = list(phonemes) if phonemes else None
        self.language = language
        self.compress = compress if compress in ("soft", "mean") else ("mean" if compress is True else False)
        if self.phonemes is not None:
            if self.phonemes[0] != BLANK or WORD not in self.phonemes:
                raise ValueError(f"phoneme classes must start with {BLANK!r} and hold {WORD!r}")
            if self.compress == "mean":
                raise ValueError("phoneme classes feed the LLM with modality.ctc_compress=soft (or false), not mean")
            classifier, vocab = "linear", None
            self.phonemizer = phonemizer if phonemizer is not None else Phonemizer(language)
            self._phoneme_index = {p: i for i, p in enumerate(self.phonemes)}
        elif classifier == "linear" and vocab is None:
            raise ValueError("a linear CTC classifier needs a class vocabulary (stage.ctc_vocab=corpus)")
        self.vocab = vocab
        self.segmenter = SpellingSegmenter(tokenizer, vocab) if vocab is not None else None
        self.classifier = classifier
        self.head = None
        if classifier == "linear":
            self.head = linear_head(d_llm, len(self.phonemes) if self.phonemes else len(vocab))
            self.head.requires_grad_(trainable and weight > 0)  # no CTC loss: it would get no gradient
        self._counts = [0, 0]  # validation: edits, reference units of the greedy readout
        self._table: tuple[int, Tensor] | None = None  # (id of the embedding matrix, phoneme rows) for soft reading

    def phoneme_table(self, embeddings: Tensor) -> Tensor:
        """[n_phonemes, D]: each phoneme's row = the mean of the LLM's rows for its IPA text (the word boundary:
        the rows of ' |'); the blank's row is zeros (ctc_compress drops it). Fixed, not trained: the LLM's LoRA
        learns to read it, and a checkpoint carries nothing new."""
        key = (embeddings.data_ptr(), embeddings.device)
        if self._table is None or self._table[0] != key:
            rows = text_rows(self.tokenizer, embeddings, [" |" if p == WORD else p for p in self.phonemes[1:]])
            self._table = (key, torch.cat([rows.new_zeros(1, rows.shape[1]), rows]))
        return self._table[1]

    # ------------------------------------------------------------------ classes
    def logits(self, out: Tensor, embeddings: Tensor) -> Tensor:
        """Adaptor output [n, N, D] -> class logits [n, N, V]."""
        if self.head is not None:
            return self.head(out).float()
        return cosine_logits(out, embeddings if self.vocab is None else embeddings[self.vocab.to(embeddings.device)])

    @property
    def blank(self) -> int:
        return 0 if self.phonemes else class_index(self.vocab, self.placeholder_id)

    def targets(self, batch: dict) -> list[list[int] | None]:
        """Class indices of each transcript sample's target (None: not a transcript, or not spellable)."""
        refs, kinds = batch["references"], batch["types"]
        if self.phonemes is None:
            ids = [token_target(self.tokenizer, r, k) for r, k in zip(refs, kinds)]
            if self.segmenter is not None:
                ids = [self.segmenter(t) for t in ids]
            return to_classes(ids, None if self.vocab is None else self.vocab)
        out: list[list[int] | None] = []
        for ref, kind in zip(refs, kinds):
            if kind != TRANSCRIPT or not ref:
                out.append(None)
                continue
            try:
                seq = self.phonemizer([ref])[0]
            except ValueError:
                out.append(None)
                continue
            idx = [self._phoneme_index.get(p) for p in seq]
            out.append(None if None in idx else idx)
        return out

    def text_targets(self, texts: Sequence[str]) -> list[list[int] | None]:
        """Class indices of candidate transcripts (joint decoding's CTC score); None: not spellable here."""
        if self.phonemes is None:
            ids = [self.segmenter(self.tokenizer.encode(" " + t, add_special_tokens=False)) for t in texts]
            return to_classes(ids, self.vocab)
        out: list[list[int] | None] = []
        for t in texts:
            try:
                idx = [self._phoneme_index.get(p) for p in self.phonemizer([t])[0]] if t.strip() else [None]
            except ValueError:
                idx = [None]
            out.append(None if None in idx else idx)
        return out

    # ------------------------------------------------------------------ the Objective contract
    def loss(self, outs: dict[str, tuple[Tensor, Tensor]], batch: dict, embeddings: Tensor) -> dict[str, Tensor]:
        if self.modality not in outs:
            return {}
        out, lengths = outs[self.modality]
        value = ctc_loss(self.logits(out, embeddings), lengths,
                         batch["modal"][self.modality]["sample_index"].to(out.device), self.targets(batch), self.blank)
        return {} if value is None else {f"ctc_{self.modality}": value}

    def transform(self, name: str, out: Tensor, lengths: Tensor, embeddings: Tensor,
                  source: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor] | None:
        if name != self.modality or not self.compress:
            return None
        if self.phonemes:
            return ctc_compress(out, lengths, self.phoneme_table(embeddings), 0, soft=True,
                                logits=self.logits(out, embeddings), drop_blank=True)
        return ctc_compress(out, lengths, embeddings, self.placeholder_id, vocab=self.vocab,
                            soft=self.compress == "soft", logits=self.logits(out, embeddings))

    def symbol_rows(self, name: str, symbols: Tensor, embeddings: Tensor) -> Tensor | None:
        """Phoneme distributions [n, N, V] (text-only reading practice) -> their rows, as soft compression maps a clip."""
        if name != self.modality or not self.phonemes or self.compress != "soft":
            return None
        if symbols.shape[-1] != len(self.phonemes):
            raise ValueError(f"{name}: phoneme inputs over {symbols.shape[-1]} classes, this chain has {len(self.phonemes)}")
        table = self.phoneme_table(embeddings)
        return (symbols.to(table.device).float() @ table.float()).to(table.dtype)

    def validation_batch(self, outs: dict[str, tuple[Tensor, Tensor]], batch: dict, embeddings: Tensor) -> None:
        from tasks.evaluate import edit_distance, normalize

        reads = self.readout(batch, outs, embeddings)
        if self.phonemes:
            for hyp, tgt in zip(reads, self.targets(batch)):
                if hyp is not None and tgt:
                    self._counts[0] += edit_distance([self.phonemes[t] for t in tgt], hyp.split())
                    self._counts[1] += len(tgt)
            return
        for hyp, ref, kind in zip(reads, batch["references"], batch["types"]):
            if hyp is not None and token_target(self.tokenizer, ref, kind):
                words = normalize(ref or "")
                self._counts[0] += edit_distance(words, normalize(hyp))
                self._counts[1] += len(words)

    def validation_metrics(self) -> dict[str, float]:
        errors, units = self._counts
        self._counts = [0, 0]
        return {("val/ctc_per" if self.phonemes else "val/ctc_wer"): errors / units} if units else {}

    def meta(self) -> dict[str, Any]:
        return {"ctc_vocab": self.vocab.tolist() if self.vocab is not None else None,
                "ctc_classifier": self.classifier, "ctc_phonemes": self.phonemes,
                "ctc_language": self.language if self.phonemes else None}

    # ------------------------------------------------------------------ readout
    @torch.no_grad()
    def readout(self, batch: dict, outs: dict[str, tuple[Tensor, Tensor]], embeddings: Tensor) -> list[str | None]:
        """The adaptor's own greedy CTC reading of each one-clip sample, without the LLM: text for token classes,
        space-separated phonemes for phoneme classes; None for other samples (or a full-vocabulary chain with
        no classes of its own to read). Why: it splits the error between hearing and the LLM's reading."""
        texts: list[str | None] = [None] * batch["input_ids"].shape[0]
        if self.modality not in outs or (self.vocab is None and not self.phonemes):
            return texts
        out, lengths = outs[self.modality]
        owner = batch["modal"][self.modality]["sample_index"].tolist()
        logits = self.logits(out, embeddings)
        if self.phonemes:
            runs = greedy_ctc_decode(out, lengths, None, 0, logits=logits)  # class indices, blank 0
            reads = [" ".join(self.phonemes[t] for t in r) for r in runs]
        else:
            hyps = greedy_ctc_decode(out, lengths, embeddings, self.placeholder_id, vocab=self.vocab, logits=logits)
            reads = [self.tokenizer.decode(h).strip() for h in hyps]
        for k, i in enumerate(owner):
            texts[i] = reads[k] if owner.count(i) == 1 else None
        return texts


def build_ctc_objective(modality: Any, settings: Mapping[str, Any], inherited: Sequence[Mapping[str, Any]],
                        train_records: Callable[[], list[dict]], tokenizer: Any, placeholder_id: int,
                        trainable: bool) -> CtcObjective | None:
    """The speech CTC objective of a run: the chain's classes when it trained some (its heads load from it),
    else new classes from the stage settings (``stage.ctc_weight`` > 0 with ``stage.ctc_vocab``)."""
    weight = float(settings.get("ctc_weight", 0.0) or 0.0)
    common = dict(modality=modality.name, tokenizer=tokenizer, placeholder_id=placeholder_id, d_llm=modality.d_llm,
                  weight=weight, trainable=trainable, compress=getattr(modality, "ctc_compress", False))
    chain = next((m for m in inherited if m.get("ctc_vocab") or m.get("ctc_phonemes")), None)
    if chain is not None and chain.get("ctc_phonemes"):
        return CtcObjective(phonemes=chain["ctc_phonemes"], language=chain.get("ctc_language") or "en-us", **common)
    if chain is not None:
        return CtcObjective(vocab=torch.tensor(chain["ctc_vocab"], dtype=torch.long),
                            classifier=chain.get("ctc_classifier", "cosine"), **common)
    if weight <= 0:
        if common["compress"]:
            raise ValueError("modality.ctc_compress needs CTC classes: init_from a chain trained with stage.ctc_weight > 0")
        return None
    kind = settings.get("ctc_vocab", "full")
    if kind == "phonemes":
        language = settings.get("ctc_language", "en-us")
        ph = Phonemizer(language)  # its cache then holds every train transcript's targets
        return CtcObjective(phonemes=phoneme_classes(train_records(), ph), language=language, phonemizer=ph, **common)
    if kind == "corpus":
        vocab = corpus_token_classes(train_records(), tokenizer, placeholder_id, int(settings.get("ctc_min_count", 1)))
        return CtcObjective(vocab=vocab, classifier=settings.get("ctc_classifier", "cosine"), **common)
    if kind != "full":
        raise ValueError(f"stage.ctc_vocab must be corpus, full or phonemes, got {kind!r}")
    return CtcObjective(classifier=settings.get("ctc_classifier", "cosine"), **common)


def corpus_token_classes(records: list[dict], tokenizer: Any, blank_id: int, min_count: int = 1) -> Tensor:
    """The tokens of the TRAIN transcripts seen >= min_count times, single characters, the blank: ctc_vocab=corpus.

    Train only: a class no training sample spells cannot be learned, and val may be held-out data."""
    import logging

    targets = [t for r in records if (t := token_target(tokenizer, r.get("reference"), r.get("type")))]
    vocab = corpus_vocab(targets, [blank_id], min_count, always=single_char_tokens(tokenizer))
    logging.getLogger(__name__).info("CTC over the corpus vocabulary: %d of %d tokens (seen >= %d times, + single "
                                     "characters)", len(vocab), len(tokenizer), min_count)
    return vocab


def phoneme_classes(records: list[dict], ph: Phonemizer) -> list[str]:
    """Every phoneme espeak-ng says in the TRAIN transcripts (blank first)."""
    texts = sorted({r["reference"] for r in records if r.get("type") == TRANSCRIPT and r.get("reference")})
    seqs = []
    for t in tqdm(texts, desc="phonemes", unit="text", leave=False):
        try:
            seqs += ph([t])
        except ValueError:
            continue
    return phoneme_inventory(seqs)
