"""Words from phonemes: a pronunciation lexicon, a word n-gram LM, and lexicon-constrained CTC beam search.

Why: a phoneme recognizer (modality.speech.asr.phonemes) hears sounds, not words. A lexicon turns its output into words,
including words no training clip ever said (any word list: /usr/share/dict, the LLM's own text), and a word
LM picks among homophones and segmentations. The search is flashlight's LexiconDecoder (via torchaudio's
``ctc_decoder``, package ``flashlight-text``) with the LM below as a Python callback (no KenLM needed).
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from tasks.evaluate import normalize
from modality.speech.asr.phonemes import BLANK, WORD, Phonemizer

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


class NgramLM:
    """Interpolated absolute-discount word trigram with Kneser-Ney continuation unigrams (natural log).

    Every ``vocab`` word gets probability mass (add-``floor`` on continuation counts), so a lexicon word the
    LM text never had can still be decoded: that is the point of a lexicon.
    """

    def __init__(self, sentences: Iterable[Sequence[str]], vocab: Iterable[str], discount: float = 0.75,
                 floor: float = 0.5):
        self.d = discount
        self.tri: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.bi: dict[str, Counter] = defaultdict(Counter)
        for words in sentences:
            seq = [BOS, BOS, *words, EOS]
            for u, v, w in zip(seq, seq[1:], seq[2:]):
                self.tri[(u, v)][w] += 1
                self.bi[v][w] += 1
        self.counts: Counter = Counter()  # raw word counts (the continuation unigrams below are not frequencies)
        for c in self.bi.values():
            self.counts.update(c)
        cont = Counter(w for ws in self.bi.values() for w in ws)
        vocab = set(vocab) | set(cont) | {EOS}
        total = sum(cont.values()) + floor * len(vocab)
        self.uni = {w: (cont.get(w, 0) + floor) / total for w in vocab}
        self.bi_tot = {v: sum(c.values()) for v, c in self.bi.items()}
        self.tri_tot = {k: sum(c.values()) for k, c in self.tri.items()}
        self.cache: dict[tuple[str, str, str], float] = {}

    def _p2(self, v: str, w: str) -> float:
        p1 = self.uni.get(w, 0.0)
        c = self.bi.get(v)
        if not c:
            return p1
        return (max(c.get(w, 0) - self.d, 0) + self.d * len(c) * p1) / self.bi_tot[v]

    def logp(self, context: tuple[str, str], word: str) -> float:
        """log P(word | two previous words); -100 for a word outside the vocabulary."""
        key = (*context, word)
        if key not in self.cache:
            p2 = self._p2(context[1], word)
            c = self.tri.get(context)
            p = p2 if not c else (max(c.get(word, 0) - self.d, 0) + self.d * len(c) * p2) / self.tri_tot[context]
            self.cache[key] = math.log(p) if p > 0 else -100.0
        return self.cache[key]

    def sentence_logp(self, words: Sequence[str]) -> float:
        ctx, total = (BOS, BOS), 0.0
        for w in [*words, EOS]:
            total += self.logp(ctx, w)
            ctx = (ctx[1], w)
        return total


def build_lexicon(words: Iterable[str], phonemizer: Phonemizer, classes: Sequence[str],
                  sentences: Sequence[str] = (), min_variant: int = 2) -> dict[str, list[tuple[str, ...]]]:
    """word -> pronunciations (phonemes with ``WORD`` after each spoken unit), over ``classes`` only.

    Each word is phonemized alone; ``sentences`` add the in-context variants espeak-ng uses (``the`` before a
    vowel, ``a`` as ɐ rather than the letter's name) seen at least ``min_variant`` times
    (Phonemizer.by_word). Pronunciations with a phoneme outside ``classes`` are left out.
    """
    known = set(classes)
    words = sorted({w for w in words if w})
    lex: dict[str, list[tuple[str, ...]]] = {}
    for w, spoken in zip(words, phonemizer.words(words)):
        pron = tuple(p for s in spoken for p in (*s, WORD))
        if spoken and set(pron) <= known:
            lex[w] = [pron]
    variants: Counter = Counter()
    for text in sentences:
        try:
            spoken = phonemizer.by_word(text)
        except ValueError:
            continue  # a text espeak cannot say gives no variant
        variants.update((w, tuple(p for u in units for p in (*u, WORD))) for w, units in zip(normalize(text), spoken))
    for (w, pron), n in variants.items():
        if n >= min_variant and pron not in lex.get(w, []) and set(pron) <= known:
            lex.setdefault(w, []).append(pron)
    return lex


MAX_HOMOPHONES = 6  # flashlight's trie keeps at most this many words per pronunciation


def _top_homophones(lexicon: dict[str, list[tuple[str, ...]]], lm: NgramLM | None) -> dict[str, list[tuple[str, ...]]]:
    """At most MAX_HOMOPHONES words per pronunciation, the LM's most frequent first. Why: beyond that flashlight
    drops words in its own (hash) order, so a common word could lose its place to rare homophones."""
    by_pron: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for w, prons in lexicon.items():
        for p in prons:
            by_pron[p].append(w)
    freq = (lambda w: lm.counts.get(w, 0)) if lm is not None else (lambda w: 0)
    kept: dict[str, list[tuple[str, ...]]] = {}
    for p, ws in by_pron.items():
        for w in sorted(ws, key=lambda w: (-freq(w), w))[:MAX_HOMOPHONES]:
            kept.setdefault(w, []).append(p)
    return kept


class LexiconDecoder:
    """CTC log-probs over phoneme ``classes`` -> n-best word sequences, constrained to ``lexicon``, scored
    acoustics + ``ngram_weight`` x LM + ``word_score`` per word. ``classes[0]`` must be the blank."""

    def __init__(self, classes: Sequence[str], lexicon: dict[str, list[tuple[str, ...]]], lm: NgramLM | None,
                 nbest: int = 10, beam_size: int = 100, ngram_weight: float = 1.0, word_score: float = 0.0,
                 beam_threshold: float = 25.0):
        from torchaudio.models.decoder import (
            CTCDecoderLM,
            CTCDecoderLMState,
            ctc_decoder,
        )

        if classes[0] != BLANK or WORD not in classes:
            raise ValueError(f"classes must start with {BLANK!r} and hold {WORD!r}")
        lexicon = _top_homophones(lexicon, lm)
        self.words = sorted(lexicon) + [UNK]
        tmp = Path(tempfile.mkdtemp(prefix="mmlm_lexicon_"))
        with open(tmp / "lexicon.txt", "w") as f:
            for w in self.words[:-1]:
                f.writelines(f"{w} {' '.join(pron)}\n" for pron in lexicon[w])
        (tmp / "words.txt").write_text("\n".join(self.words) + "\n")
        words = self.words

        class _LM(CTCDecoderLM):
            """flashlight calls back per word; each state remembers its two previous words."""

            def __init__(self):
                CTCDecoderLM.__init__(self)
                self.ctx: dict = {}

            def start(self, start_with_nothing: bool):
                state = CTCDecoderLMState()
                self.ctx = {state: (BOS, BOS)}
                return state

            def score(self, state, idx: int):
                child = state.child(idx)
                ctx = self.ctx[state]
                self.ctx.setdefault(child, (ctx[1], words[idx]))
                return child, (lm.logp(ctx, words[idx]) if words[idx] != UNK else -100.0)

            def finish(self, state):
                return state, lm.logp(self.ctx[state], EOS)

        self._lm = _LM() if lm is not None else None
        self.decoder = ctc_decoder(lexicon=str(tmp / "lexicon.txt"), tokens=list(classes), lm=self._lm,
                                   lm_dict=str(tmp / "words.txt"), nbest=nbest, beam_size=beam_size,
                                   beam_threshold=beam_threshold, lm_weight=ngram_weight if lm is not None else 0.0,
                                   word_score=word_score, blank_token=BLANK, sil_token=WORD, unk_word=UNK)

    def __call__(self, logp: torch.Tensor, lengths: torch.Tensor) -> list[list[tuple[str, float]]]:
        """logp [B, T, C] (log-softmax, CPU float32), lengths [B] -> per clip, n-best (text, decoder score)."""
        hyps = self.decoder(logp.float().cpu().contiguous(), lengths.to(torch.int32).cpu())
        return [[(" ".join(w for w in h.words if w != UNK), float(h.score)) for h in clip] for clip in hyps]


def read_texts(files: Iterable[str]) -> list[str]:
    """Distinct transcripts (``text`` fields) of JSONL manifests or .json record lists (a chain's instruct
    conversations: records without a ``text`` give none); missing files are skipped (logged by the caller)."""
    import json

    from data.jsonl import read_jsonl

    def rows(f: str) -> list:
        if Path(f).suffix == ".json":
            try:
                got = json.loads(Path(f).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not a JSON list of records ({e})") from None
            return got if isinstance(got, list) else []
        return read_jsonl(f)

    texts = {row["text"] for f in files if Path(f).is_file() for row in rows(f) if isinstance(row, dict) and row.get("text")}
    return sorted(texts)


def word_decoder(classes: Sequence[str], phonemizer: Phonemizer, spec: Any, train_files: Sequence[str] | None,
                 ) -> LexiconDecoder:
    """eval.lexicon -> the decoder a phoneme chain's evaluation writes words with.

    Words: every word of the LM text plus ``spec.words`` (a word list, one or more per line; default the
    system's /usr/share/dict/american-english). LM text: ``spec.lm_text`` manifests, else the chain's own
    training manifests (never the evaluated ones: a user passing those would grade the LM on its own text).
    """
    import logging

    log = logging.getLogger(__name__)
    get = (lambda k, d: spec.get(k, d)) if hasattr(spec, "get") else (lambda k, d: d)
    files = list(get("lm_text", None) or train_files or [])
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        log.warning("eval.lexicon: LM text files not found, left out: %s", missing)
    texts = read_texts(files)
    sents = [normalize(t) for t in texts]
    words = {w for s in sents for w in s}
    wordlist = get("words", "/usr/share/dict/american-english")
    if wordlist:
        if not Path(wordlist).is_file():
            raise ValueError(f"eval.lexicon.words: {wordlist} not found (apt-get install wamerican, or words=null)")
        words |= {w for line in Path(wordlist).read_text(errors="ignore").split() for w in normalize(line) if w.isascii()}
    step = max(1, len(texts) // int(get("variant_sentences", 10000)))
    lex = build_lexicon(words, phonemizer, classes, sentences=texts[::step])
    lm = NgramLM(sents, lex)
    log.info("lexicon: %d words, LM text: %d sentences from %d files", len(lex), len(texts), len(files) - len(missing))
    dec = LexiconDecoder(classes, lex, lm, nbest=int(get("nbest", 10)), beam_size=int(get("beam", 100)),
                         ngram_weight=float(get("ngram_weight", 0.5)), word_score=float(get("word_score", 1.0)))
    dec.llm_weight = float(get("llm_weight", 0.0))
    return dec


@torch.no_grad()
def text_logprobs(llm: Any, tokenizer: Any, texts: Sequence[str], batch: int = 32) -> list[float]:
    """log p_LLM(text) of each sentence alone (no speech, no prompt): the LLM as a text prior for rescoring."""
    device = next(llm.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    for i in range(0, len(texts), batch):
        ids = [[start] + tokenizer.encode(t[:1].upper() + t[1:] + ".", add_special_tokens=False)
               for t in texts[i:i + batch]]
        n = max(len(x) for x in ids)
        x = torch.tensor([s + [start] * (n - len(s)) for s in ids], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in ids], device=device)
        logp = llm(input_ids=x, attention_mask=mask).logits.float().log_softmax(-1)
        out += (logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0] * mask[:, 1:]).sum(1).tolist()
    return out


def lexicon_decode(model: Any, objective: Any, dec: LexiconDecoder, batch: dict, max_new_tokens: int,
                   transcript_types: set[str]) -> tuple[list[str], list[str | None], list[list[dict] | None]]:
    """A phoneme chain's evaluation batch: one-clip transcript samples get words from the lexicon decoder ``dec``
    (n-best re-ranked with ``dec.llm_weight`` x log p_LLM(text) when > 0); other samples the LLM's answer.
    ``objective``: the chain's phoneme CtcObjective. Returns (texts, greedy phoneme readouts, candidates per sample)
    as modality.speech.asr.decode.joint_decode does."""
    B = batch["input_ids"].shape[0]
    outs = model.adapt_all(batch)
    table = model.llm.get_input_embeddings().weight
    phones = objective.readout(batch, outs, table)
    texts: list[str | None] = [None] * B
    cands: list[list[dict] | None] = [None] * B
    for name, (out, lengths) in outs.items():
        if name != objective.modality:
            continue
        logp = objective.logits(out, table).float().log_softmax(-1).cpu()
        for k, b in enumerate(batch["modal"][name]["sample_index"].tolist()):
            if batch["types"][b] in transcript_types and phones[b] is not None:
                n = int(lengths[k])
                nbest = dec(logp[k:k + 1, :n], torch.tensor([n]))[0]
                cands[b] = [{"text": t, "decoder": s} for t, s in nbest] or [{"text": "", "decoder": 0.0}]
    todo = [b for b in range(B) if cands[b] is not None]
    if dec.llm_weight > 0 and todo:
        flat = [c for b in todo for c in cands[b]]
        for c, v in zip(flat, text_logprobs(model.llm, model.tokenizer, [c["text"] or "." for c in flat])):
            c["llm"] = v
    for b in todo:
        texts[b] = max(cands[b], key=lambda c: c["decoder"] + dec.llm_weight * c.get("llm", 0.0))["text"]
    rest = [b for b in range(B) if texts[b] is None]
    if rest:  # questions, or several clips: the LLM answers
        answers = model.generate(batch, max_new_tokens=max_new_tokens)
        for b in rest:
            texts[b] = answers[b]
    return [t or "" for t in texts], phones, cands
