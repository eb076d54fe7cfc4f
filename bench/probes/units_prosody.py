"""Do the discrete speech tokens carry what text drops? Pitch and speed read off the tokens alone.

    python -m bench.probes.units_prosody [--train data_cache/speech/train.jsonl] [--eval data_cache/speech/eval.jsonl]

Tokenises clips with modality=speech_units (real Whisper tiny.en + a k-means codebook fitted on
the train manifest, fitted on first use) and, with NO training of the LLM, predicts each held-out
voice clip's TTS labels from two token statistics:
  pitch_class (low/medium/high)  <- the register token (the clip's median F0; pitch tokens are relative to it)
  speed_class (slow/normal/fast) <- semantic units per second (after repeats collapse)
by the nearest class mean fitted on train clips. The transcript carries neither (its accuracy is the
majority baseline). Also: Spearman correlation of the mean pitch bin with the clip's measured F0.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch


def stats(m, ids: torch.Tensor, duration: float) -> tuple[float, float]:
    """(register bin, NaN when unvoiced; unit tokens per second)."""
    h = m.hp
    register = int(ids[0]) - h.register0
    units = sum(1 for t in ids if int(t) < h.n_units)
    return (float(register) if register < h.register_bins else float("nan")), units / duration


def nearest_mean(train: list[tuple[float, str]], test: list[tuple[float, str]]) -> float:
    means = {c: sum(v for v, k in train if k == c) / max(1, sum(1 for _, k in train if k == c))
             for c in {k for _, k in train}}
    hits = sum(min(means, key=lambda c: abs(means[c] - v)) == k for v, k in test)
    return hits / len(test)


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default="data_cache/speech/train.jsonl")
    ap.add_argument("--eval", default="data_cache/speech/eval.jsonl")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-units", type=int, default=128)
    ap.add_argument("--data-dir", default="data_cache")
    args = ap.parse_args()

    from modality.speech.units import SpeechUnitsModality

    t0 = time.perf_counter()
    m = SpeechUnitsModality(d_llm=576, n_units=args.n_units, fit_manifest=args.train,
                            codebook=f"{args.data_dir}/units/codebook_k{args.n_units}.safetensors",
                            cache_dir=f"{args.data_dir}/units_cache", encoder_cache_dir=f"{args.data_dir}/encoder_cache")
    fit_s = time.perf_counter() - t0
    rows = {}
    for split, path, n in (("train", args.train, args.n_train), ("eval", args.eval, None)):
        recs = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()][:n]
        root = Path(path).parent
        m.precompute_cache([root / r["audio_filepath"] for r in recs])
        rows[split] = [(r, m.load_features(r["audio_filepath"], str(root))[0]) for r in recs]
    out = {}
    for label, idx in (("pitch_class", 0), ("speed_class", 1)):
        tr = [(stats(m, ids, r["duration"])[idx], r[label]) for r, ids in rows["train"]]
        te = [(stats(m, ids, r["duration"])[idx], r[label]) for r, ids in rows["eval"]]
        tr = [x for x in tr if not math.isnan(x[0])]
        te_ok = [x for x in te if not math.isnan(x[0])]
        majority = Counter(k for _, k in tr).most_common(1)[0][0]
        out[label] = {"tokens": nearest_mean(tr, te_ok), "majority": sum(k == majority for _, k in te) / len(te),
                      "n": len(te_ok)}
    # espeak's pitch classes are relative to each voice's base pitch (a low female voice ~ a high male one):
    # the same nearest-mean, fitted per gender, shows whether the pitch tokens separate them within a voice type
    hits, total = 0, 0
    for g in ("male", "female"):
        tr = [(stats(m, ids, r["duration"])[0], r["pitch_class"]) for r, ids in rows["train"] if r["gender"] == g]
        te = [(stats(m, ids, r["duration"])[0], r["pitch_class"]) for r, ids in rows["eval"] if r["gender"] == g]
        tr, te = [x for x in tr if not math.isnan(x[0])], [x for x in te if not math.isnan(x[0])]
        if tr and te:
            hits += nearest_mean(tr, te) * len(te)
            total += len(te)
    out["pitch_class (per gender)"] = {"tokens": hits / total, "majority": out["pitch_class"]["majority"], "n": total}
    ev = [(stats(m, ids, r["duration"])[0], r["f0_hz"]) for r, ids in rows["eval"]]
    ev = [(a, b) for a, b in ev if not (math.isnan(a) or math.isnan(b))]
    lens = [len(ids) / r["duration"] for r, ids in rows["eval"]]
    print(f"codebook k={args.n_units} ready in {fit_s:.0f} s; {len(rows['train'])} train / {len(rows['eval'])} "
          f"held-out-voice clips; tokens per second {sum(lens) / len(lens):.1f} (continuous path: 12.5)")
    print("| label | from the tokens (nearest class mean) | majority (what the transcript gives) | clips |")
    print("|---|---|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v['tokens']:.1%} | {v['majority']:.1%} | {v['n']} |")
    print(f"Spearman(register bin, measured F0) on held-out clips: {spearman(*zip(*ev)):.3f}")


if __name__ == "__main__":
    main()
