"""Does a PHONEME recognizer on the frozen tiny.en features generalise to unseen voices and words better than
the token-level one (bench/RESULTS.md: held-out greedy CTC WER 44.9 % at best)?

    python -m bench.probes.phoneme_probe --train data_cache/speech_long/train.jsonl,data_cache/speech_wordnet/train.jsonl \
        --steps 1500 --out outputs/phoneme_probe

Trains the phase-1 adaptor (transformer, every Whisper state, cached features) with CTC over espeak-ng's
canonical phonemes (modality.speech.asr.phonemes; stack 2 = 25 positions a second, since speech has ~15 phonemes a
second), reports the held-out phoneme error rate (PER) every ``--eval-every`` steps and saves the adaptor +
head (safetensors) and the classes for ``modality.speech.asr.lexicon`` (words from phonemes). No LLM is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from modality.speech.asr.ctc import greedy_ctc_decode
from tasks.evaluate import edit_distance
from modality.speech.asr.phonemes import Phonemizer, phoneme_inventory


class Clips(Dataset):
    def __init__(self, sp, rows: list[dict], targets: list[list[int]]):
        self.sp, self.rows, self.targets = sp, rows, targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.sp.load_features(self.rows[i]["path"])[0], self.targets[i], i


def collate(items):
    hs = [h for h, _, _ in items]
    lengths = torch.tensor([h.shape[0] for h in hs])
    out = torch.zeros(len(hs), int(lengths.max()), hs[0].shape[1])
    for i, h in enumerate(hs):
        out[i, : h.shape[0]] = h
    return out, lengths, [t for _, t, _ in items], [i for _, _, i in items]


def read(manifests: str, limit: int | None = None) -> list[dict]:
    rows = []
    for m in manifests.split(","):
        m = Path(m)
        for line in m.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r["path"] = str(m.parent / r["audio_filepath"])
                rows.append(r)
    return rows[:limit]


def length_batches(rows: list[dict], batch: int, rng: random.Random, mega: int = 50) -> list[list[int]]:
    """Shuffled batches of similar duration (sorted within mega-batches of ``mega`` batches)."""
    order = rng.sample(range(len(rows)), len(rows))
    out = []
    for k in range(0, len(order), batch * mega):
        chunk = sorted(order[k:k + batch * mega], key=lambda i: rows[i]["duration"])
        out += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    rng.shuffle(out)
    return out


def greedy(logits: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Class-index readouts (blank 0 dropped, repeats merged): modality.speech.asr.ctc.greedy_ctc_decode over the head's logits."""
    return greedy_ctc_decode(logits, lengths, None, 0, logits=logits)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default="data_cache/speech_long/train.jsonl,data_cache/speech_wordnet/train.jsonl")
    ap.add_argument("--eval", default="data_cache/speech_long/eval.jsonl")
    ap.add_argument("--cache", default="data_cache/encoder_cache")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--stack", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="outputs/phoneme_probe")
    args = ap.parse_args(argv)

    from modality.speech.plugin import SpeechModality
    from modality.speech.asr.ctc import linear_head

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train, held = read(args.train), read(args.eval, args.n_eval)
    ph = Phonemizer()
    t0 = time.perf_counter()
    train_ph, held_ph = ph([r["text"] for r in train]), ph([r["text"] for r in held])
    classes = phoneme_inventory(train_ph)
    index = {p: i for i, p in enumerate(classes)}
    unk = sum(p not in index for s in held_ph for p in s)
    print(f"{len(classes)} classes; phonemized {len(train)} + {len(held)} texts in {time.perf_counter() - t0:.1f} s; "
          f"{unk} held-out phonemes outside them", flush=True)
    tgt = [[index[p] for p in s] for s in train_ph]
    sp = SpeechModality(d_llm=576, target_rms=None, adaptor="transformer", cache_dir=args.cache, hidden=args.hidden,
                        layers=args.layers, stack=args.stack, encoder_layers="all")
    head = linear_head(576, len(classes))
    params = list(sp.adaptor.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(0)
    ds = Clips(sp, train, tgt)
    held_ds = Clips(sp, held, [[0]] * len(held))
    curve, step, t0 = [], 0, time.perf_counter()
    (out_dir / "classes.json").write_text(json.dumps({"classes": classes, "language": ph.language,
                                                      "stack": args.stack, "hidden": args.hidden, "layers": args.layers}))
    while step < args.steps:
        loader = DataLoader(ds, batch_sampler=length_batches(train, args.batch, rng), collate_fn=collate,
                            num_workers=args.workers, prefetch_factor=4 if args.workers else None)
        for h, lengths, targets, _ in loader:
            sp.adaptor.train()
            out, out_len = sp.adapt(h, lengths)
            logp = head(out).float().log_softmax(-1)
            flat = torch.tensor([t for s in targets for t in s])
            loss = torch.nn.functional.ctc_loss(logp.transpose(0, 1), flat, out_len, torch.tensor([len(s) for s in targets]),
                                                blank=0, zero_infinity=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0:
                print(f"step {step} loss {float(loss):.3f} {(time.perf_counter() - t0) / step:.2f} s/step", flush=True)
            if step % args.eval_every == 0 or step == args.steps:
                sp.adaptor.eval()
                errs = n = 0
                with torch.no_grad():
                    for hb, lb, _, idx in DataLoader(held_ds, batch_size=25, collate_fn=collate):
                        o, ol = sp.adapt(hb, lb)
                        for i, seq in zip(idx, greedy(head(o), ol)):
                            errs += edit_distance([classes[k] for k in seq], held_ph[i])
                            n += len(held_ph[i])
                point = {"step": step, "loss": round(float(loss), 3), "per": round(errs / n, 4),
                         "minutes": round((time.perf_counter() - t0) / 60, 1)}
                curve.append(point)
                print(json.dumps(point), flush=True)
                (out_dir / "curve.json").write_text(json.dumps(curve, indent=1))
                state = {f"adaptor.{k}": v.contiguous() for k, v in sp.adaptor.state_dict().items()}
                state |= {f"head.{k}": v.contiguous() for k, v in head.state_dict().items()}
                save_file(state, str(out_dir / "model.safetensors"))
                if (out_dir / "STOP").exists():
                    return curve
            if step >= args.steps:
                break
    return curve


if __name__ == "__main__":
    main()
