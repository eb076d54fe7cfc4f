"""Can the voice's labels be read off the frozen encoder without the LLM? A linear/MLP probe per label.

    python -m bench.probes.tone_probe [--train data_cache/speech_long/train.jsonl] [--eval data_cache/speech_long/eval.jsonl]

Features per clip: the mean and standard deviation over time of every Whisper tiny.en state (the cached encoder output
of ``modality.encoder_layers=all``, 5 x 384 wide), plus log phonemes per second (espeak-ng's phonemes of the
transcript over the clip's duration; a phoneme adaptor's readout gives the same count at evaluation). Labels: the
TTS settings in the manifest (gender, pitch_class, speed_class, accent_region). Held-out voices are scored.
Why: the LLM can only say what reaches it; if a probe on these features reads a label, a head on the adaptor can
hand it to the LLM (as the phoneme head hands it sounds).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

LABELS = ("gender", "pitch_class", "speed_class", "accent_region")


def features(rows: list[dict], root: Path, modality, ph, adaptor: bool = False) -> torch.Tensor:
    from tqdm.auto import tqdm

    out = []
    for r in tqdm(rows, desc="features", unit="clip"):
        h, _ = modality.load_features(r["audio_filepath"], str(root))  # cached [T', 5*384] (encoded on a miss)
        if adaptor:  # the trained adaptor's output instead [ceil(T'/stack), d_llm]
            with torch.no_grad():
                h = modality.adapt(h[None], torch.tensor([h.shape[0]]))[0][0]
        n = sum(len(w) for w in ph.words([r["text"]])[0])
        rate = math.log(max(n, 1) / max(r["duration"], 0.1))
        out.append(torch.cat([h.mean(0), h.std(0), torch.tensor([rate, math.log(r["duration"])])]))
    return torch.stack(out)


def fit(x: torch.Tensor, y: torch.Tensor, n_cls: int, hidden: int, steps: int = 400) -> torch.nn.Module:
    torch.manual_seed(0)
    net = (torch.nn.Linear(x.shape[1], n_cls) if hidden == 0 else
           torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(hidden, n_cls)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (512,))
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def main(argv: list[str] | None = None) -> None:
    from modality.speech import SpeechModality
    from modality.speech.asr.phonemes import Phonemizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", default="data_cache/speech_long/train.jsonl")
    ap.add_argument("--eval", default="data_cache/speech_long/eval.jsonl")
    ap.add_argument("--cache", default="data_cache/encoder_cache")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--adaptor", default=None, help="a phoneme-chain run dir: pool its adaptor's output instead")
    a = ap.parse_args(argv)
    m = SpeechModality(d_llm=576, encoder_layers="all", cache_dir=a.cache)
    if a.adaptor:
        from tasks.checkpoint import META_KEY, read_chain

        _, ckpt = read_chain(a.adaptor)[-1]
        cfg = {k: v for k, v in ckpt[META_KEY]["modality_cfg"].items() if k in ("stack", "adaptor", "hidden", "layers",
                                                                             "heads", "target_rms", "encoder_layers")}
        m = SpeechModality(d_llm=576, cache_dir=a.cache, **cfg)
        m.load_state_dict({k.removeprefix("modalities.speech."): v for k, v in ckpt["state_dict"].items()
                           if k.startswith("modalities.speech.")}, strict=False)
        m.eval()
    ph = Phonemizer("en-us")
    tr = [json.loads(x) for x in open(a.train)][:: max(1, sum(1 for _ in open(a.train)) // a.n_train)][: a.n_train]
    ev = [json.loads(x) for x in open(a.eval)][: a.n_eval]
    xt = features(tr, Path(a.train).parent, m, ph, bool(a.adaptor))
    xe = features(ev, Path(a.eval).parent, m, ph, bool(a.adaptor))
    mu, sd = xt.mean(0), xt.std(0).clamp(min=1e-4)
    xt, xe = (xt - mu) / sd, (xe - mu) / sd
    print(f"{len(tr)} train clips, {len(ev)} held-out-voice clips; features {xt.shape[1]}")
    print("label          classes  majority  linear  mlp-256  rate-only(linear)")
    for lab in LABELS:
        classes = sorted({r[lab] for r in tr})
        yt = torch.tensor([classes.index(r[lab]) for r in tr])
        ye = torch.tensor([classes.index(r[lab]) if r[lab] in classes else -1 for r in ev])
        major = max((ye == c).float().mean().item() for c in range(len(classes)))
        accs = []
        for hidden, cols in ((0, slice(None)), (256, slice(None)), (0, slice(-2, None))):
            net = fit(xt[:, cols], yt, len(classes), hidden)
            with torch.no_grad():
                accs.append((net(xe[:, cols]).argmax(-1) == ye).float().mean().item())
        print(f"{lab:<14} {len(classes):>7}  {major:8.3f}  {accs[0]:6.3f}  {accs[1]:7.3f}  {accs[2]:8.3f}")


if __name__ == "__main__":
    main()
