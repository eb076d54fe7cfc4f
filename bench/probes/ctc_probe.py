"""How fast does an adaptor learn to spell the transcript in LLM tokens, WITHOUT the LLM (cheap on CPU)?

    python -m bench.probes.ctc_probe --data data_cache/speech_long --kinds transformer --classifiers cosine,linear --steps 200

Trains each (adaptor kind, classifier) pair with CTC alone on cached Whisper tiny.en outputs of the train
voices, one after the other in one run with the same seed, data and batches, and reports greedy CTC WER on
the held-out voices every ``--eval-every`` steps. Classes are LLM tokens (the train transcripts' tokens seen
>= ``--min-count`` times plus single characters, rarer words re-spelled with them: modality.speech.asr.ctc.SpellingSegmenter);
the placeholder token is the blank. Classifiers: ``cosine`` scores outputs against the frozen SmolLM2
embedding rows (centred), ``linear`` is a trained Linear(d_llm -> classes), as MultimodalLM builds them for
stage.ctc_classifier. bench/RESULTS.md records what one run measured.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def load_split(sp, manifest: Path, limit: int | None) -> list[tuple[torch.Tensor, str]]:
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()][:limit]
    sp.precompute_cache([manifest.parent / r["audio_filepath"] for r in rows])
    return [(sp.load_features(manifest.parent / r["audio_filepath"])[0], r["text"]) for r in rows]


def pad(hs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([h.shape[0] for h in hs])
    out = torch.zeros(len(hs), int(lengths.max()), hs[0].shape[1])
    for i, h in enumerate(hs):
        out[i, : h.shape[0]] = h
    return out, lengths


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data_cache/speech_long")
    ap.add_argument("--cache", default="data_cache/encoder_cache")
    ap.add_argument("--kinds", default="transformer")
    ap.add_argument("--classifiers", default="cosine,linear")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--min-count", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the curve as JSON here")
    args = ap.parse_args(argv)

    from llm.loader import load_llm
    from llm.tokens import add_placeholder_tokens
    from modality.speech.plugin import SpeechModality
    from modality.speech.asr.ctc import (
        SpellingSegmenter,
        class_index,
        corpus_vocab,
        cosine_logits,
        ctc_loss,
        greedy_ctc_decode,
        linear_head,
        single_char_tokens,
        to_classes,
    )
    from tasks.evaluate import wer

    lm = load_llm(name="smollm2-135m-instruct")
    tok = lm.tokenizer
    blank = add_placeholder_tokens(tok, lm.model, ["<speech>"])["<speech>"]
    table = lm.model.get_input_embeddings().weight.detach()
    root = Path(args.data)
    rows: list[dict] = []
    train = held = None
    for kind in args.kinds.split(","):
        for classifier in args.classifiers.split(","):
            torch.manual_seed(0)
            sp = SpeechModality(d_llm=lm.hidden_size, target_rms=lm.embedding_rms, adaptor=kind, cache_dir=args.cache,
                                hidden=args.hidden, layers=args.layers)
            if train is None:
                train = load_split(sp, root / "train.jsonl", args.n_train)
                held = load_split(sp, root / "eval.jsonl", args.n_eval)
                raw = {t: tok.encode(" " + t.strip(), add_special_tokens=False) for t in {t for _, t in train}}
                vocab = corpus_vocab([raw[t] for _, t in train], [blank], args.min_count, always=single_char_tokens(tok))
                seg = SpellingSegmenter(tok, vocab)
                targets = {t: to_classes([seg(ids)], vocab)[0] for t, ids in raw.items()}
                sub, sub_blank = table[vocab], class_index(vocab, blank)
                print(f"CTC over {len(vocab)} classes", flush=True)
            head = linear_head(lm.hidden_size, len(vocab)) if classifier == "linear" else None

            def logits(out, head=head, sub=sub):
                return head(out).float() if head is not None else cosine_logits(out, sub)

            params = list(sp.adaptor.parameters()) + (list(head.parameters()) if head is not None else [])
            opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
            rng, t0, order = random.Random(0), time.perf_counter(), []
            for step in range(1, args.steps + 1):
                if len(order) < args.batch:
                    order += rng.sample(range(len(train)), len(train))
                b = [train[i] for i in order[: args.batch]]
                del order[: args.batch]
                sp.adaptor.train()
                h, lengths = pad([x for x, _ in b])
                out, out_len = sp.adapt(h, lengths)
                loss = ctc_loss(logits(out), out_len, torch.arange(len(b)), [targets[t] for _, t in b], sub_blank)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                if step % args.eval_every == 0 or step == args.steps:
                    sp.adaptor.eval()
                    hyps = []
                    with torch.no_grad():
                        for i in range(0, len(held), 50):
                            h, lengths = pad([x for x, _ in held[i:i + 50]])
                            out, out_len = sp.adapt(h, lengths)
                            hyps += [tok.decode(s) for s in greedy_ctc_decode(out, out_len, table, blank, vocab=vocab,
                                                                               logits=logits(out))]
                    point = {"kind": kind, "classifier": classifier, "step": step, "loss": round(float(loss.detach()), 3),
                             "seconds": round(time.perf_counter() - t0, 1), "ctc_wer": round(wer([t for _, t in held], hyps), 4)}
                    rows.append(point)
                    print(json.dumps(point), flush=True)
            print("example:", held[0][1], "->", hyps[0], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
