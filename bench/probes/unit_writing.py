"""Can the LLM write speech units? Next-unit accuracy on held-out clips vs a unigram baseline.

    python -m bench.probes.unit_writing [--init-from <a modality=speech_units run>] [--eval data_cache/speech/eval.jsonl]

Tokenises held-out clips with modality=speech_units (units and prosody are tokens of the LLM's vocabulary) and
scores the LLM's next-token prediction wherever the next token is a unit (modality.speech.unit_writing): argmax
among the unit tokens, over the whole vocabulary, and the nll, beside the unigram of the train clips' units.
Without --init-from the new rows are untrained (mean of the LLM's rows + noise): expect the unigram to win; after
align (the LLM reads units) and instruct (LoRA), the gap says how much of the unit sequence the LLM has modelled.
Real weights: not run in tests (tests/unit/modality/speech/test_units_writing.py tests the function).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init-from", default=None, help="a modality=speech_units run dir (its chain is loaded)")
    ap.add_argument("--train", default="data_cache/speech/train.jsonl", help="clips for the unigram baseline")
    ap.add_argument("--eval", default="data_cache/speech/eval.jsonl", help="held-out clips to score")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--prompt", default="", help="text read before each unit sequence")
    ap.add_argument("--fit-clips", type=int, default=600, help="clips the codebook is fitted on, when it is missing")
    ap.add_argument("--data-dir", default="data_cache", help="where the codebook and the caches are (written on a miss)")
    args = ap.parse_args()

    from modality.speech.unit_writing import next_unit_accuracy

    t0 = time.perf_counter()
    if args.init_from:
        from tasks.runner import build_trained

        built = build_trained(args.init_from, [])
        m, llm, tok = built.modality, built.model.llm, built.lm.tokenizer
    else:
        from llm.loader import load_llm
        from llm.tokens import add_placeholder_tokens
        from modality.speech.units import SpeechUnitsModality

        lm = load_llm()
        m = SpeechUnitsModality(d_llm=lm.hidden_size, target_rms=lm.embedding_rms, fit_manifest=args.train,
                                fit_clips=args.fit_clips,
                                codebook=f"{args.data_dir}/units/codebook_k128.safetensors",
                                cache_dir=f"{args.data_dir}/units_cache",
                                encoder_cache_dir=f"{args.data_dir}/encoder_cache")
        add_placeholder_tokens(lm.tokenizer, lm.model, [m.placeholder])
        m.bind_llm(lm.tokenizer, lm.model)
        llm, tok = lm.model, lm.tokenizer
    llm.eval()
    seqs = {}
    for split, path, n in (("train", args.train, args.n_train), ("eval", args.eval, args.n_eval)):
        recs = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()][:n]
        root = Path(path).parent
        m.precompute_cache([root / r["audio_filepath"] for r in recs])
        seqs[split] = [m.load_features(r["audio_filepath"], str(root))[0] for r in recs]
    prefix = tok.encode(args.prompt, add_special_tokens=False) if args.prompt else []
    got = next_unit_accuracy(llm, seqs["eval"], m.first_id, m.hp.n_units, train=seqs["train"], prefix=prefix,
                             pad_id=tok.pad_token_id or 0)
    got["seconds"] = round(time.perf_counter() - t0, 1)
    got["init_from"] = args.init_from
    print(json.dumps(got, indent=1))
    print(f"| next unit | LLM {got['accuracy']:.1%} (any token {got['accuracy_any']:.1%}, nll {got['nll']:.2f}) | "
          f"unigram {got['unigram_accuracy']:.1%} (nll {got['unigram_nll']:.2f}) | {got['positions']} positions |")


if __name__ == "__main__":
    main()
