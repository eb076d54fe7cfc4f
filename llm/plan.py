"""Memory planner: expected per-GPU memory of a run, before anyone books a node.

    python -m llm.plan llm=llama31_8b trainer=fsdp trainer.devices=8 data.batch_size=4 [--seq-len 2048]

Composes the real Hydra config (conf/ + the same overrides train.py takes), reads the model's
shape without downloading anything (a built-in table of known hub models, a local config.json,
or ``llm.model.tiny``), and prints weights, LoRA, optimizer state, gradients and activations per
GPU for the strategy (ddp replicates, fsdp shards) and GPU count. Arithmetic lives in
``estimate`` (plain arguments); ``main`` only reads the config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llm.quant import quantized_bytes
from llm.shapes import EncoderShape, ModelShape, modality_shapes, model_shape

GiB = 2**30
RUNTIME_OVERHEAD = 1.0 * GiB  # CUDA context + cuBLAS/NCCL workspaces + allocator slack, measured typical


@dataclass
class PlanInput:
    """Everything the estimate depends on, as plain values."""

    shape: ModelShape
    weight_bytes: float = 2.0          # bytes per frozen LLM weight (fp32 4, bf16 2); ignored for quantised linears
    quant: str | None = None           # nf4 / fp4: decoder linears in 4 bits (+ absmax), the rest in weight_bytes
    lora_r: int = 0                    # 0: no LoRA (align stage)
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0
    adaptor_params: int = 0            # trainable modality parameters (adaptors; encoder too if it trains)
    encoder: EncoderShape | None = None
    encoder_trains: bool = False
    encoder_bytes: float = 4.0
    strategy: str = "single"           # single | ddp | fsdp
    world: int = 1
    precision: str = "32-true"
    micro_batch: int = 1               # per GPU
    seq_len: int = 512
    label_fraction: float = 0.5        # share of positions with labels (the LM head runs only there)
    checkpointing: bool = False
    attention: str = "flash"           # flash (GPU SDPA: O(s) memory) | math (CPU: keeps the s x s probabilities)
    extra_tokens: int = 1              # placeholder rows added to the embeddings

    def __post_init__(self) -> None:
        if self.strategy not in ("single", "ddp", "fsdp"):
            raise ValueError(f"strategy={self.strategy!r}: expected single, ddp or fsdp")
        if self.world < 1 or self.micro_batch < 1 or self.seq_len < 1:
            raise ValueError(f"world, micro_batch and seq_len must be >= 1: {self.world}, {self.micro_batch}, {self.seq_len}")
        if self.attention not in ("flash", "math"):
            raise ValueError(f"attention={self.attention!r}: expected flash or math")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction={self.label_fraction}: must be in (0, 1]")
        if self.strategy == "single" and self.world != 1:
            raise ValueError("strategy=single runs on one device")

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element: bf16 under bf16 precisions (autocast outputs), else fp32."""
        return 2 if self.precision.startswith(("bf16", "16")) else 4

    @property
    def train_bytes(self) -> int:
        """Trainable weights, their gradients and AdamW states: fp32, bf16 only under *-true half precisions."""
        return 2 if self.precision in ("bf16-true", "16-true") else 4


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """LoRA A (r x in) + B (out x r) for every targeted linear of every layer."""
    if r <= 0:
        return 0
    linears = shape.linears()
    hit = [n for n in linears if any(re.fullmatch(t, n) or n.endswith(t) for t in targets)]
    missing = [t for t in targets if not any(re.fullmatch(t, n) or n.endswith(t) for n in linears)]
    if missing:
        raise ValueError(f"lora.targets: {missing[0]!r} matches no linear layer of the LLM (examples: {sorted(linears)})")
    return shape.layers * sum(r * (linears[n][0] + linears[n][1]) for n in hit)


def _lora_hits(p: PlanInput) -> list[str]:
    return [n for n in p.shape.linears() if any(re.fullmatch(t, n) or n.endswith(t) for t in p.lora_targets)] if p.lora_r else []


def layer_activation_bytes(p: PlanInput) -> float:
    """Bytes autograd keeps for ONE decoder layer, per token (checked tensor by tensor on CPU, see tests).

    RMSNorms keep an fp32 copy of their input (+ rsqrt); SDPA keeps q, k, v (GQA expanded when a
    padding mask is passed), its output and logsumexp; the SiLU-gated MLP keeps gate, SiLU(gate) and up;
    frozen linears keep nothing; LoRA keeps its input (shared by q/k/v, by gate/up; o_proj reads the
    SDPA output, already kept) and A's r-wide output; with dropout each LoRA keeps a private copy + mask.
    """
    s, e, h, i = p.shape, p.act_bytes, p.shape.hidden, p.shape.intermediate
    total = 2 * (4 * h + 4)                                  # two RMSNorms: fp32 input + rsqrt
    total += e * 4 * h + 4 * s.heads                         # q, k, v, out, fp32 logsumexp per head
    if p.attention == "math":
        total += e * s.heads * p.seq_len                     # softmax probabilities [heads, s] per query
    total += 3 * e * i                                       # gate, silu(gate), up
    hit = _lora_hits(p)
    if p.lora_dropout > 0:
        total += sum((e + 1) * s.linears()[n][0] for n in hit)
    else:
        total += e * h * any(n in hit for n in ("q_proj", "k_proj", "v_proj"))
        total += e * h * any(n in hit for n in ("gate_proj", "up_proj"))
        total += e * i * ("down_proj" in hit)
    return float(total + e * p.lora_r * len(hit))


def estimate(p: PlanInput) -> dict[str, float]:
    """Per-GPU bytes of each component (and totals) for the run ``p`` describes."""
    s = p.shape
    shards = p.world if p.strategy == "fsdp" else 1
    counts = s.param_counts(p.extra_tokens)
    rest = counts["total"] - counts["decoder_linear"]
    if p.quant:
        layer_bytes = sum(quantized_bytes(a * b) for a, b in s.linears().values())
    else:
        layer_bytes = counts["layer_linear"] * p.weight_bytes
    llm_total = s.layers * layer_bytes + rest * p.weight_bytes
    lora = lora_params(s, p.lora_r, p.lora_targets)
    enc = p.encoder.params() if p.encoder else 0
    trainable = lora + p.adaptor_params + (enc if p.encoder_trains else 0)
    tokens = p.micro_batch * p.seq_len
    per_layer = layer_activation_bytes(p) * tokens
    stream = 2 if p.precision in ("bf16-true", "16-true") else 4   # residual stream dtype (fp32 under autocast)
    labeled = tokens * p.label_fraction
    vocab = s.vocab_size(p.extra_tokens)
    kept_layers = s.layers * tokens * s.hidden * stream if p.checkpointing else s.layers * per_layer
    rope = 2 * p.seq_len * s.hd * 4                                  # cos, sin (fp32), shared by all layers
    out = {
        "llm_weights": llm_total / shards,
        # two layers unsharded at a time (current + prefetch) + the root unit (embeddings, head), whole step
        "fsdp_gather": (2 * layer_bytes + (counts["embed"] + counts["head"]) * p.weight_bytes * (1 - 1 / p.world))
        if p.strategy == "fsdp" and p.world > 1 else 0.0,
        "encoder_weights": 0.0 if p.encoder_trains else enc * p.encoder_bytes,
        "trainable_weights": trainable * p.train_bytes / shards,
        "gradients": trainable * p.train_bytes / shards,
        "optimizer": trainable * 2 * p.train_bytes / shards,
        # kept for backward: layers (or their inputs only, with checkpointing), final norm, fp32 log-softmax
        "activations": kept_layers + tokens * (4 * s.hidden + 4) + labeled * (vocab * 4 + 8) + rope,
        "recompute_peak": per_layer if p.checkpointing else 0.0,       # one layer re-run during backward
        "logits_peak": labeled * vocab * (p.act_bytes + 4),            # head output + its fp32 copy, transient
    }
    out["model_states"] = sum(out[k] for k in ("llm_weights", "fsdp_gather", "encoder_weights", "trainable_weights",
                                               "gradients", "optimizer"))
    out["total"] = out["model_states"] + out["activations"] + max(out["recompute_peak"], out["logits_peak"])
    out["total_with_runtime"] = out["total"] + RUNTIME_OVERHEAD
    out.update(llm_params=counts["total"], lora_params=lora, adaptor_params=p.adaptor_params, encoder_params=enc,
               trainable_params=trainable, llm_bytes_total=llm_total)
    return out


# ------------------------------------------------------------------ config -> PlanInput
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def _strategy_name(strategy) -> str:
    if strategy is None:
        return "single"
    target = strategy.get("_target_", "") if hasattr(strategy, "get") else str(strategy)
    low = target.lower()
    return "fsdp" if "fsdp" in low else "ddp" if "ddp" in low else "single"


def from_config(cfg, seq_len: int | None = None, label_fraction: float = 0.5, attention: str = "flash") -> PlanInput:
    """Read the composed run config into a PlanInput (no weights are loaded)."""
    from llm.sharding import check_scale

    m, t, stage = cfg.llm.model, cfg.trainer, cfg.stage
    scale = check_scale(strategy=t.get("strategy"), accelerator="gpu", devices=t.devices, num_nodes=t.num_nodes,
                        precision=t.precision, quant=m.get("quant"), batch_size=cfg.data.batch_size,
                        global_batch_size=cfg.get("global_batch_size"), accumulate=t.get("accumulate_grad_batches", 1))
    strategy = _strategy_name(t.get("strategy"))
    shape = model_shape(m.name, m.get("tiny"))
    dtype_bytes = 4 if str(m.get("dtype", "float32")) in ("float32", "fp32") else 2
    if str(t.precision) in ("bf16-true", "16-true"):
        dtype_bytes = 2
    lora = stage.get("lora", False)
    enc, adaptor = modality_shapes(cfg.modality, shape.hidden)
    return PlanInput(
        shape=shape, weight_bytes=dtype_bytes, quant=m.get("quant"),
        lora_r=int(cfg.llm.lora.r) if lora else 0, lora_targets=tuple(cfg.llm.lora.targets) if lora else (),
        lora_dropout=float(cfg.llm.lora.get("dropout", 0.0)),
        adaptor_params=adaptor, encoder=enc,
        encoder_trains=bool(stage.get("encoder", False)), encoder_bytes=2 if str(t.precision) == "bf16-true" else 4,
        strategy="single" if scale.world_size == 1 else strategy,
        world=scale.world_size, precision=str(t.precision), micro_batch=scale.per_device_batch,
        seq_len=int(seq_len or cfg.data.get("max_length", 512)), label_fraction=label_fraction,
        checkpointing=bool(m.get("gradient_checkpointing", False)), attention=attention)


def report(p: PlanInput, est: dict[str, float], gpu_gib: float | None = None) -> str:
    """A human table of ``est`` (GiB per GPU)."""
    s = p.shape
    g = lambda b: f"{b / GiB:9.2f}"
    head = (f"LLM {s.name}: {est['llm_params'] / 1e9:.3f} B params (L={s.layers} h={s.hidden} V={s.vocab}"
            f"{' tied' if s.tied else ''}), weights {est['llm_bytes_total'] / GiB:.2f} GiB total"
            f"{' in ' + p.quant if p.quant else ''}\n"
            f"trainable: LoRA {est['lora_params'] / 1e6:.2f} M + adaptor {est['adaptor_params'] / 1e6:.2f} M; "
            f"encoder {est['encoder_params'] / 1e6:.1f} M ({'trains' if p.encoder_trains else 'frozen, replicated'})\n"
            f"{p.strategy} x {p.world} GPU(s), precision {p.precision}, micro-batch {p.micro_batch} x seq {p.seq_len}, "
            f"activation checkpointing {'on' if p.checkpointing else 'off'}, attention {p.attention}")
    rows = [("LLM weights (frozen)", est["llm_weights"], f"/ {p.world} shards" if p.strategy == "fsdp" else "replicated"),
            ("FSDP all-gather", est["fsdp_gather"], "2 layers + root (embeddings, head) unsharded"),
            ("encoder weights (frozen)", est["encoder_weights"], "replicated"),
            ("trainable weights", est["trainable_weights"], f"{p.train_bytes}-byte master copy"),
            ("gradients", est["gradients"], ""),
            ("optimizer (AdamW m, v)", est["optimizer"], ""),
            ("activations (kept for backward)", est["activations"], "incl. fp32 log-softmax on labeled tokens"),
            ("transient peak", max(est["recompute_peak"], est["logits_peak"]),
             "max(one layer recomputed, logits of labeled tokens)" if p.checkpointing else
             f"logits of labeled tokens (fraction {p.label_fraction})"),
            ("total", est["total"], ""),
            ("+ runtime overhead", est["total_with_runtime"], "CUDA context, workspaces (~1 GiB)")]
    lines = [head, "", f"{'component':34s}{'GiB/GPU':>9s}  note"]
    lines += [f"{name:34s}{g(v)}  {note}" for name, v, note in rows]
    if gpu_gib:
        fits = est["total_with_runtime"] <= gpu_gib * GiB
        lines.append(f"\n{'fits' if fits else 'DOES NOT FIT'} in {gpu_gib:g} GiB per GPU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (llm=..., trainer=..., data.batch_size=...)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: data.max_length)")
    ap.add_argument("--label-fraction", type=float, default=0.5)
    ap.add_argument("--attention", default="flash", choices=["flash", "math"])
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU, to say whether it fits")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        p = from_config(compose(args.overrides), args.seq_len, args.label_fraction, args.attention)
        est = estimate(p)
    except Exception as e:  # bad overrides (Hydra) or an impossible run (ValueError): one line, exit 2
        from hydra.errors import HydraException

        if not isinstance(e, (ValueError, HydraException)):
            raise
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"input": {k: v for k, v in asdict(p).items() if k not in ("shape", "encoder")}, **est}, indent=1)
          if args.json else report(p, est, args.gpu_gib))
    return est


if __name__ == "__main__":
    main()


class SavedTensorMeter:
    """Measures activation memory on any device: bytes of the distinct tensors autograd saves for
    backward while active, parameters excluded. (CPU has no max_memory_allocated; this is what the
    planner's 'activations' row predicts.)"""

    def __init__(self, module=None):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
        self.seen: dict[int, int] = {}

    def _pack(self, t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self.params:
                self.seen[ptr] = max(self.seen.get(ptr, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            pass
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> SavedTensorMeter:
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
