"""One training step of an 8B-shaped Llama behind the speech modality: mmlm vs a plain HF+PEFT loop.

    python -m bench.gpu_step [--batch 2] [--seq 2048] [--steps 5] [--out results.json]   # one CUDA GPU
    python -m bench.gpu_step --toy                                                       # CPU, toy sizes, seconds

Random weights built from the config (no download): Llama-3.1-8B shape (bf16), a Whisper-tiny-shaped
SpeechModality encoder (frozen) + its adaptor, instruct stage (adaptor + LoRA r=64 on all linears).
Four settings: bf16 LoRA and QLoRA (NF4), each with and without activation checkpointing. For each,
in the same process and on the same model and batch: mmlm's MultimodalLM trained by a Lightning
Trainer, and a hand-written HF+PEFT loop (model(inputs_embeds, labels) with HF's full-logits loss).
Reports tokens/s, MFU (LLM + encoder + adaptor FLOPs a step needs, see ``step_flops``), peak memory
and the planner's (llm/plan.py) estimate of it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm.loader import enable_checkpointing  # noqa: E402
from llm.shapes import KNOWN, EncoderShape, ModelShape  # noqa: E402

H100_BF16_DENSE = 989e12
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WHISPER_TINY = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80)
TOY_LLM = ModelShape("toy", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)
TOY_ENCODER = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=80)


@dataclass
class Bench:
    shape: ModelShape
    encoder: dict
    batch: int = 2
    seq: int = 2048
    audio_frames: int = 1000       # log-mel frames per sample (10 s) -> 500 encoder frames -> 125 LLM positions
    label_fraction: float = 0.5    # the answer half of each sequence carries labels
    lora_r: int = 64
    stack: int = 4
    adaptor_hidden: int = 1024
    steps: int = 5
    warmup: int = 2
    device: str = "cuda"
    peak_flops: float | None = H100_BF16_DENSE

    def __post_init__(self) -> None:
        n = self.speech_positions
        if n + 8 > self.seq:
            raise ValueError(f"seq={self.seq} too short for {n} speech positions")

    @property
    def speech_positions(self) -> int:
        return -(-((self.audio_frames - 1) // 2 + 1) // self.stack)

    @property
    def encoder_shape(self) -> EncoderShape:
        e = self.encoder
        return EncoderShape("whisper", e["d_model"], e["encoder_layers"], e["encoder_ffn_dim"], e["num_mel_bins"])


def step_flops(b: Bench) -> dict[str, float]:
    """FLOPs one training step needs (what MFU counts; checkpointing's recompute is not useful work).

    LLM: forward 2 x (linear params) per token + causal attention 2 x s x h per token per layer, the
    LM head on labeled tokens only; backward = 2 x forward for activations+LoRA (frozen weights get no
    weight gradient: 1 x forward for input gradients, + LoRA's own). Encoder (frozen, no grad): forward
    only. Adaptor: forward + weight-gradient backward (6 x params per output position).
    """
    s, tokens = b.shape, b.batch * b.seq
    lin = sum(i * o for i, o in s.linears().values()) * s.layers
    lora = sum(b.lora_r * (i + o) for i, o in s.linears().values()) * s.layers
    attn = 2 * b.seq * s.hidden * s.layers                      # per token, causal: QK^T and AV over s/2 keys
    head = 2 * s.hidden * s.vocab * b.label_fraction
    fwd = tokens * (2 * lin + 2 * lora + attn + head)
    bwd = tokens * (2 * lin + 4 * lora + 2 * attn + 2 * head)   # input grads everywhere, weight grads on LoRA only
    e = b.encoder_shape
    t_enc = (b.audio_frames - 1) // 2 + 1
    enc_layer = 2 * (4 * e.d_model ** 2 + 2 * e.d_model * e.ffn) + 4 * t_enc * e.d_model
    enc = b.batch * (b.audio_frames * 2 * e.mels * e.d_model * 3 + t_enc * (2 * e.d_model ** 2 * 3 + e.layers * enc_layer))
    adaptor_params = e.d_model * b.stack * b.adaptor_hidden + b.adaptor_hidden * s.hidden
    adaptor = 6 * adaptor_params * b.batch * b.speech_positions
    return {"llm": fwd + bwd, "encoder": enc, "adaptor": adaptor, "total": fwd + bwd + enc + adaptor}


# ------------------------------------------------------------------ model and batch
def build_model(b: Bench, quant: str | None):
    """MultimodalLM (instruct stage) around a random Llama of ``b.shape`` and a random speech modality."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm.lora import LoraSpec
    from llm.quant import quantize_linear_layers
    from modality.speech.plugin import SpeechModality
    from tasks.multimodal import MultimodalLM, OptimSpec
    from tasks.stages import StagePolicy

    s = b.shape
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                      num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, tie_word_embeddings=s.tied,
                      max_position_embeddings=max(2048, b.seq), rope_theta=500000.0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16
    with torch.device(b.device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            llm = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
    llm.requires_grad_(False)
    if quant:
        quantize_linear_layers(llm, quant, compute_dtype=dtype, device=b.device)
    speech = SpeechModality(d_llm=s.hidden, tiny=dict(b.encoder), stack=b.stack, hidden=b.adaptor_hidden).to(b.device)
    model = MultimodalLM(llm, None, {"speech": speech}, {"speech": s.vocab - 1},
                         StagePolicy("instruct", lora=True, requires="align"),
                         lora=LoraSpec(r=b.lora_r, alpha=2 * b.lora_r, dropout=0.0, targets=list(TARGETS)),
                         optim=OptimSpec(lr=1e-4, warmup_steps=0), llm_name=s.name)
    return model.to(b.device)


def make_batch(b: Bench) -> dict:
    """Collator-shaped batch: a prompt, N speech placeholders, then text; labels on the last fraction."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, b.shape.vocab - 2, (b.batch, b.seq), generator=g)
    n = b.speech_positions
    ids[:, 4:4 + n] = b.shape.vocab - 1
    labels = torch.full_like(ids, -100)
    start = int(b.seq * (1 - b.label_fraction))
    labels[:, start:] = ids[:, start:]
    mel = torch.randn(b.batch, b.audio_frames, b.encoder["num_mel_bins"], generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "modal": {"speech": {"kind": "features", "values": mel, "mask": torch.ones(b.batch, b.audio_frames, dtype=torch.bool)}},
            "ids": [str(i) for i in range(b.batch)], "types": ["chat"] * b.batch, "references": [None] * b.batch,
            "skipped": []}


def to_device(batch: dict, device: str) -> dict:
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


# ------------------------------------------------------------------ the two loops
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def run_mmlm(model, batch: dict, b: Bench) -> dict:
    """mmlm's path: Lightning Trainer.fit on MultimodalLM (head on labeled tokens only), bf16 autocast."""
    import lightning as L

    class Timer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, *a):
            _sync(b.device)
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            _sync(b.device)
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    from torch.utils.data import DataLoader

    loader = DataLoader([batch] * (b.warmup + b.steps), batch_size=None, collate_fn=lambda x: x)
    trainer = L.Trainer(accelerator="gpu" if b.device.startswith("cuda") else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=b.warmup + b.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    _reset_peak(b.device)
    trainer.fit(model, train_dataloaders=loader)
    peak = _peak(b.device)
    model.trainer = None  # drop the Trainer (and its optimizer state) before the plain loop measures memory
    del trainer
    return {"step_s": sum(timer.times[b.warmup:]) / b.steps, "peak_gib": peak}


def run_plain(model, batch: dict, b: Bench) -> dict:
    """A hand-written HF+PEFT loop on the same modules: embeddings + speech, HF forward with labels (full logits)."""
    llm, speech = model.llm, model.modalities["speech"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98))
    model.train()
    batch = to_device(batch, b.device)
    times = []
    _reset_peak(b.device)
    for i in range(b.warmup + b.steps):
        _sync(b.device)
        t = time.perf_counter()
        with torch.autocast(device_type="cuda" if b.device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            embeds = llm.get_input_embeddings()(batch["input_ids"])
            sp = batch["modal"]["speech"]
            out, _ = speech.encode(sp["values"], sp["mask"])
            embeds = embeds.masked_scatter((batch["input_ids"] == b.shape.vocab - 1)[..., None], out.to(embeds.dtype))
            loss = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(b.device)
        times.append(time.perf_counter() - t)
    del opt
    return {"step_s": sum(times[b.warmup:]) / b.steps, "peak_gib": _peak(b.device)}


def activation_bytes(model, batch: dict, b: Bench) -> int:
    """Bytes autograd keeps for one mmlm step (llm/plan.py SavedTensorMeter), any device."""
    from llm.plan import SavedTensorMeter

    model.train()
    with torch.autocast(device_type="cuda" if b.device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
        with SavedTensorMeter(model) as meter:
            loss = model(to_device(batch, b.device))["loss"]
    del loss
    return meter.bytes


def planned(b: Bench, quant: str | None, checkpointing: bool) -> dict:
    from llm.plan import PlanInput, estimate

    p = PlanInput(shape=b.shape, weight_bytes=2, quant=quant, lora_r=b.lora_r, lora_targets=TARGETS,
                  adaptor_params=b.encoder_shape.d_model * b.stack * b.adaptor_hidden + b.adaptor_hidden
                  + b.adaptor_hidden * b.shape.hidden + b.shape.hidden, encoder=b.encoder_shape,
                  precision="bf16-mixed", micro_batch=b.batch, seq_len=b.seq, label_fraction=b.label_fraction,
                  checkpointing=checkpointing, extra_tokens=0)
    return estimate(p)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", action="store_true", help="toy sizes on CPU (a test runs this)")
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(KNOWN))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--settings", default="lora,lora+ckpt,qlora,qlora+ckpt")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.toy:
        b = Bench(TOY_LLM, TOY_ENCODER, batch=args.batch or 2, seq=args.seq or 64, audio_frames=40, lora_r=4,
                  adaptor_hidden=32, steps=args.steps or 2, warmup=1, device="cpu", peak_flops=None)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.gpu_step needs a CUDA GPU (or --toy for the CPU smoke run)")
        b = Bench(KNOWN[args.model], WHISPER_TINY, batch=args.batch or 2, seq=args.seq or 2048, steps=args.steps or 5)
    flops = step_flops(b)
    tokens = b.batch * b.seq
    rows = []
    settings = args.settings.split(",")
    for quant in (None, "nf4"):
        wanted = [s for s in settings if s.startswith("qlora" if quant else "lora")]
        if not wanted:
            continue
        model = build_model(b, quant)
        batch = make_batch(b)
        for setting in wanted:
            ckpt = setting.endswith("+ckpt")
            llm = model.llm.get_base_model()
            enable_checkpointing(llm, ckpt)
            row = {"setting": setting, "quant": quant, "checkpointing": ckpt}
            for name, fn in (("mmlm", run_mmlm), ("plain", run_plain)):
                r = fn(model, batch, b)
                row[name] = {**r, "tokens_per_s": tokens / r["step_s"],
                             "mfu": flops["total"] / r["step_s"] / b.peak_flops if b.peak_flops else None}
            row["activation_gib_measured"] = activation_bytes(model, batch, b) / 2**30
            est = planned(b, quant, ckpt)
            row["planner_gib"] = {k: est[k] / 2**30 for k in ("model_states", "activations", "total")}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, batch
        _reset_peak(b.device)
    header = {"bench": asdict(b) | {"shape": asdict(b.shape)}, "flops_per_step": flops, "tokens_per_step": tokens,
              "device": torch.cuda.get_device_name() if b.device.startswith("cuda") else "cpu", "results": rows}
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(header, indent=1, default=str))
    return rows


def table(rows: list[dict]) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    lines = ["| setting | mmlm tok/s | plain tok/s | mmlm/plain | mmlm MFU | plain MFU | mmlm peak GiB | plain peak GiB "
             "| planner GiB | activations GiB (measured / planned) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, p = r["mmlm"], r["plain"]
        lines.append(f"| {r['setting']} | {m['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} | "
                     f"{m['tokens_per_s'] / p['tokens_per_s']:.2f} | {f(m['mfu'], '.1%')} | {f(p['mfu'], '.1%')} | "
                     f"{f(m['peak_gib'], '.3g')} | {f(p['peak_gib'], '.3g')} | {r['planner_gib']['total']:.3g} | "
                     f"{r['activation_gib_measured']:.3g} / {r['planner_gib']['activations']:.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
