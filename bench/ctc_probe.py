"""How readable are adaptor outputs, per adaptor design, WITHOUT the LLM in the loop (cheap on CPU).

    python -m bench.ctc_probe --steps 600 --kinds mlp,transformer

Trains each adaptor kind with CTC alone against the frozen SmolLM2 input-embedding table (cosine
logits, placeholder row = blank) on cached Whisper tiny.en outputs of the train voices, and reports
greedy CTC WER on the held-out voices every ``--eval-every`` steps. A step costs the adaptor only
(no LLM forward), so designs can be compared in minutes; the one measured in one run side by side
is what bench/RESULTS.md records.
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


def batches(data, batch: int, rng: random.Random):
    while True:
        idx = rng.sample(range(len(data)), batch)
        yield [data[i] for i in idx]


def pad(hs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([h.shape[0] for h in hs])
    out = torch.zeros(len(hs), int(lengths.max()), hs[0].shape[1])
    for i, h in enumerate(hs):
        out[i, : h.shape[0]] = h
    return out, lengths


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data_cache/speech")
    ap.add_argument("--cache", default="data_cache/encoder_cache")
    ap.add_argument("--kinds", default="mlp,transformer")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", default="1024,512", help="adaptor width per kind, comma-separated")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the curve as JSON here")
    ap.add_argument("--full-vocab", action="store_true",
                    help="classify over all LLM rows (default: the corpus's own tokens + blank, ~8x cheaper)")
    args = ap.parse_args(argv)

    from llm.loader import load_llm
    from llm.tokens import add_placeholder_tokens
    from modality.speech import SpeechModality
    from tasks.ctc import embedding_ctc_loss, greedy_ctc_decode
    from tasks.evaluate import wer

    lm = load_llm(name="smollm2-135m-instruct")
    blank = add_placeholder_tokens(lm.tokenizer, lm.model, ["<speech>"])["<speech>"]
    table = lm.model.get_input_embeddings().weight.detach()
    tok = lm.tokenizer
    root = Path(args.data)
    rows = []
    widths = [int(w) for w in args.hidden.split(",")]
    for k, kind in enumerate(args.kinds.split(",")):
        torch.manual_seed(0)
        sp = SpeechModality(d_llm=lm.hidden_size, target_rms=lm.embedding_rms, adaptor=kind, cache_dir=args.cache,
                            hidden=widths[min(k, len(widths) - 1)])
        if not rows:
            train = load_split(sp, root / "train.jsonl", args.n_train)
            held = load_split(sp, root / "eval.jsonl", args.n_eval)
            targets = {t: tok.encode(" " + t.strip(), add_special_tokens=False) for t in {t for _, t in train + held}}
            rows_used = list(range(table.shape[0])) if args.full_vocab else sorted(
                {blank, *(i for ids in targets.values() for i in ids)})
            remap = {r: k for k, r in enumerate(rows_used)}
            targets = {t: [remap[i] for i in ids] for t, ids in targets.items()}
            sub, sub_blank = table[rows_used], remap[blank]
            print(f"CTC over {len(rows_used)} embedding rows", flush=True)
        opt = torch.optim.AdamW(sp.adaptor.parameters(), lr=args.lr, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
        rng, t0, curve = random.Random(0), time.perf_counter(), []
        n_params = sum(p.numel() for p in sp.adaptor.parameters())
        for step, b in zip(range(1, args.steps + 1), batches(train, args.batch, rng)):
            sp.adaptor.train()
            h, lengths = pad([x for x, _ in b])
            out, out_len = sp.adapt(h, lengths)
            loss = embedding_ctc_loss(out, out_len, torch.arange(len(b)), [targets[t] for _, t in b], sub, sub_blank)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sp.adaptor.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % args.eval_every == 0 or step == args.steps:
                sp.adaptor.eval()
                hyps = []
                with torch.no_grad():
                    for i in range(0, len(held), 50):
                        h, lengths = pad([x for x, _ in held[i:i + 50]])
                        out, out_len = sp.adapt(h, lengths)
                        hyps += [tok.decode([rows_used[i] for i in s]) for s in greedy_ctc_decode(out, out_len, sub, sub_blank)]
                point = {"kind": kind, "params": n_params, "step": step, "loss": round(float(loss.detach()), 3),
                         "seconds": round(time.perf_counter() - t0, 1),
                         "ctc_wer": round(wer([t for _, t in held], hyps), 4)}
                curve.append(point)
                print(json.dumps(point), flush=True)
        print("example:", held[0][1], "->", hyps[0], flush=True)
        rows += curve
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
