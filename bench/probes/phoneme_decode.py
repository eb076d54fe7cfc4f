"""Words from a phoneme recognizer (bench/probes/phoneme_probe.py): lexicon + word LM beam search, then LLM rescoring.

    python -m bench.probes.phoneme_decode outputs/phoneme_probe --tune data_cache/speech_long/val.jsonl \
        --report data_cache/speech_long/eval.jsonl

The lexicon holds every word of the LM text plus a general word list (/usr/share/dict/american-english,
apt package ``wamerican``), each phonemized by espeak-ng alone (modality.speech.asr.lexicon). The word trigram is trained
on the train manifests' transcripts only (never the held-out sentences). The decoder's LM weight and word
score and the LLM's weight are picked on ``--tune`` clips, then measured once on ``--report`` clips.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.probes.phoneme_probe import collate, read
from bench.probes.phoneme_probe import greedy as greedy_ids
from tasks.evaluate import edit_distance, normalize, wer
from modality.speech.asr.lexicon import (
    LexiconDecoder,
    NgramLM,
    build_lexicon,
    read_texts,
    text_logprobs,
)
from modality.speech.asr.phonemes import Phonemizer

LM_TEXT = ("data_cache/speech_long/train.jsonl,data_cache/speech_wordnet/train.jsonl,"
           "data_cache/speech_wndefs/train.jsonl")


def load_model(run: Path):
    from modality.speech.plugin import SpeechModality
    from modality.speech.asr.ctc import linear_head

    meta = json.loads((run / "classes.json").read_text())
    sp = SpeechModality(d_llm=576, target_rms=None, adaptor="transformer", cache_dir="data_cache/encoder_cache",
                        hidden=meta["hidden"], layers=meta["layers"], stack=meta["stack"], encoder_layers="all")
    head = linear_head(576, len(meta["classes"]))
    state = load_file(str(run / "model.safetensors"))
    sp.adaptor.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("adaptor.")})
    head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    return sp.eval(), head.eval(), meta


@torch.no_grad()
def emissions(sp, head, rows: list[dict]) -> list[tuple[torch.Tensor, int]]:
    from bench.probes.phoneme_probe import Clips

    out = []
    for h, lengths, _, _ in torch.utils.data.DataLoader(Clips(sp, rows, [[0]] * len(rows)), batch_size=25,
                                                        collate_fn=collate):
        o, ol = sp.adapt(h, lengths)
        logp = head(o).float().log_softmax(-1)
        out += [(logp[i, : int(n)].clone(), int(n)) for i, n in enumerate(ol)]
    return out


def llm_logp(texts: list[str]) -> dict[str, float]:
    """Text-only log-probability of each distinct sentence under SmolLM2 (modality.speech.asr.lexicon.text_logprobs)."""
    from llm.loader import load_llm

    lm = load_llm(name="smollm2-135m-instruct")
    uniq = sorted(set(texts))
    return dict(zip(uniq, text_logprobs(lm.model.eval(), lm.tokenizer, uniq)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--tune", default="data_cache/speech_long/val.jsonl")
    ap.add_argument("--report", default="data_cache/speech_long/eval.jsonl")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--lm-text", default=LM_TEXT)
    ap.add_argument("--wordlist", default="/usr/share/dict/american-english")
    ap.add_argument("--lm-weights", default="0.5,1,1.5,2")
    ap.add_argument("--word-scores", default="-1,0,1")
    ap.add_argument("--llm-weights", default="0,0.25,0.5,1")
    ap.add_argument("--nbest", type=int, default=10)
    ap.add_argument("--beam", type=int, default=100)
    ap.add_argument("--variant-sentences", type=int, default=10000, help="LM sentences read for in-context variants")
    args = ap.parse_args(argv)
    run = Path(args.run)
    sp, head, meta = load_model(run)
    classes = meta["classes"]
    ph = Phonemizer(meta["language"])
    t0 = time.perf_counter()
    texts = read_texts(args.lm_text.split(","))
    sents = [normalize(t) for t in texts]
    words = {w for s in sents for w in s}
    if args.wordlist and Path(args.wordlist).is_file():
        words |= {w for line in Path(args.wordlist).read_text(errors="ignore").split() for w in normalize(line)
                  if w.isascii()}
    lex = build_lexicon(words, ph, classes, sentences=texts[:: max(1, len(texts) // args.variant_sentences)])
    lm = NgramLM(sents, lex)
    print(f"lexicon {len(lex)} words ({sum(len(v) for v in lex.values())} pronunciations), LM text {len(texts)} "
          f"sentences; {time.perf_counter() - t0:.0f} s", flush=True)
    result: dict = {"run": str(run), "lexicon_words": len(lex)}
    splits = {}
    for name, manifest in (("tune", args.tune), ("report", args.report)):
        rows = read(manifest, args.n)
        em = emissions(sp, head, rows)
        refs = [r["text"] for r in rows]
        ref_ph = ph(refs)
        greedy = [[classes[k] for k in greedy_ids(e[None], torch.tensor([n]))[0]] for e, n in em]
        per = sum(edit_distance(g, r) for g, r in zip(greedy, ref_ph)) / sum(len(r) for r in ref_ph)
        oov = sum(w not in lex for r in refs for w in normalize(r)) / sum(len(normalize(r)) for r in refs)
        splits[name] = (rows, em, refs)
        result[f"{name}_per"], result[f"{name}_oov"] = round(per, 4), round(oov, 4)
        print(f"{name}: greedy PER {per:.1%}, words outside the lexicon {oov:.1%}", flush=True)
    grid = []
    for lw in [float(x) for x in args.lm_weights.split(",")]:
        for ws in [float(x) for x in args.word_scores.split(",")]:
            dec = LexiconDecoder(classes, lex, lm, nbest=args.nbest, beam_size=args.beam, ngram_weight=lw, word_score=ws)
            rows, em, refs = splits["tune"]
            t1 = time.perf_counter()
            nb = _decode(dec, em)
            w = wer(refs, [c[0][0] if c else "" for c in nb])
            grid.append({"lm_weight": lw, "word_score": ws, "tune_wer": round(w, 4),
                         "seconds": round(time.perf_counter() - t1, 1)})
            print(json.dumps(grid[-1]), flush=True)
    best = min(grid, key=lambda g: g["tune_wer"])
    dec = LexiconDecoder(classes, lex, lm, nbest=args.nbest, beam_size=args.beam, ngram_weight=best["lm_weight"],
                         word_score=best["word_score"])
    nbests = {name: _decode(dec, em) for name, (_, em, _) in splits.items()}
    scores = llm_logp([t for nb in nbests.values() for c in nb for t, _ in c])
    llm_grid = []
    for a in [float(x) for x in args.llm_weights.split(",")]:
        pick = {name: [max(c, key=lambda h: h[1] + a * scores[h[0]])[0] if c else "" for c in nb]
                for name, nb in nbests.items()}
        llm_grid.append({"llm_weight": a, **{f"{n}_wer": round(wer(splits[n][2], p), 4) for n, p in pick.items()}})
        print(json.dumps(llm_grid[-1]), flush=True)
    oracle = {n: round(wer(splits[n][2], [min(c, key=lambda h: edit_distance(normalize(r), normalize(h[0])))[0]
                                                 if c else "" for c, r in zip(nb, splits[n][2])]), 4)
              for n, nb in nbests.items()}
    chosen = min(llm_grid, key=lambda g: g["tune_wer"])
    result |= {"grid": grid, "decoder": best, "llm_grid": llm_grid, "chosen": chosen, "oracle": oracle,
               "report_wer": chosen["report_wer"]}
    examples = [{"ref": r, "hyp": max(c, key=lambda h: h[1] + chosen["llm_weight"] * scores[h[0]])[0] if c else ""}
                for r, c in zip(splits["report"][2][:10], nbests["report"][:10])]
    result["examples"] = examples
    (run / "decode.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("decoder", "chosen", "oracle", "report_wer")}), flush=True)
    for e in examples[:5]:
        print(e["ref"], "->", e["hyp"])
    return result


def _decode(dec: LexiconDecoder, em: list[tuple[torch.Tensor, int]]) -> list[list[tuple[str, float]]]:
    out = []
    for e, n in em:
        out += dec(e[None], torch.tensor([n]))
    return out


if __name__ == "__main__":
    main()
