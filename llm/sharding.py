"""Scale-out: FSDP2 sharding of a MultimodalLM, the Lightning strategy that drives it, and the
checks that reject an impossible run (world size, precision, quant backend) before any work.

FSDP2 layout (``shard_multimodal``): every LLM decoder layer is its own ``fully_shard`` unit
(frozen base weights, 4-bit or not, sharded next to their LoRA weights); an untied input
embedding and LM head get a unit each; the root unit (MultimodalLM) holds what is left: tied
embeddings, the final norm and the modality adaptors. FROZEN modality encoders are left out
(``ignored_params``): replicated on every rank, never all-gathered, never in the optimizer —
and modality code may call their submodules directly, which FSDP hooks would not see.

Checkpoints are single files in the standard torch format (trainable weights by name, optimizer
state keyed 0..n-1 in optimizer order), whatever the strategy, so a run saved under FSDP2 on N
ranks resumes under DDP or on one device and vice versa.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {None: None, "null": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
PRECISIONS = ("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name not in DTYPES:
        raise ValueError(f"trainer.strategy.{what}={name!r}: expected one of bf16, fp16, fp32 or null")
    return DTYPES[name]


# ------------------------------------------------------------------ sharding
def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks of an HF causal LM (through a PEFT wrapper if any)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return layers
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for m in decoder.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"{type(base).__name__}: cannot find its decoder layers to shard")


def frozen_encoder_params(modalities: Mapping[str, nn.Module]) -> set[nn.Parameter]:
    """Parameters of every modality encoder that does not train: replicated, never sharded."""
    out: set[nn.Parameter] = set()
    for m in modalities.values():
        enc = getattr(m, "encoder", None)
        if enc is not None and not any(p.requires_grad for p in enc.parameters()):
            out.update(enc.parameters())
    return out


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_multimodal(model: nn.Module, mesh: Any, param_dtype: torch.dtype | None = None,
                     reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> None:
    """Apply FSDP2 ``fully_shard`` to a MultimodalLM in place (see the module docstring). Idempotent.

    ``param_dtype`` casts weights for compute (FSDP2 mixed precision); keep it None and use
    ``trainer.precision`` unless every modality casts its encoder output to its adaptor's dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        return
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh, mp_policy=mp)
    for layer in decoder_layers(model.llm):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    # Embeddings and LM head stay in the root unit, gathered for the whole step: auxiliary objectives and
    # modalities read the embedding table directly, outside any forward FSDP could hook.
    fully_shard(model, ignored_params=frozen_encoder_params(model.modalities), **kw)


# ------------------------------------------------------------------ state dicts
def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of every trainable parameter. Collective under FSDP2: call on all ranks."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().clone()
    return out


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes (Lightning's ModelParallelStrategy with
    ``data_parallel_size = world size``, ``tensor_parallel_size = 1``); the module's
    ``configure_model`` calls :func:`shard_multimodal` with this strategy's settings.
    Works on CPU (gloo) as on GPUs (nccl)."""

    strategy_name = "fsdp2"

    def __init__(self, param_dtype: str | None = None, reduce_dtype: str | None = None,
                 reshard_after_forward: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | int | None = None, save_distributed_checkpoint: bool = False):
        from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

        if save_distributed_checkpoint:
            raise ValueError("trainer.strategy.save_distributed_checkpoint=true is not supported: mmlm "
                             "checkpoints hold only trainable weights, in one file that loads on any strategy")
        timeout = timedelta(seconds=timeout) if isinstance(timeout, (int, float)) else timeout
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout or default_pg_timeout)
        self.shard_kwargs = dict(param_dtype=_dtype(param_dtype, "param_dtype"),
                                 reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"),
                                 reshard_after_forward=bool(reshard_after_forward))

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Trainable weights only, gathered in full (rank 0 gets them; frozen weights never move)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=opts)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The full optimizer state in torch's own format: params numbered 0..n-1 in optimizer order."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        osd = get_optimizer_state_dict(self.model, opt, options=opts)
        if self.global_rank != 0:
            return {}
        index = {n: i for i, n in enumerate(_optimizer_names(self.model, opt))}
        groups, start = [], 0
        for saved, live in zip(osd["param_groups"], opt.param_groups):
            groups.append({**{k: v for k, v in saved.items() if k != "params"},
                           "params": list(range(start, start + len(live["params"])))})
            start += len(live["params"])
        return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a single-file checkpoint saved under ANY strategy into the sharded model and optimizers."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            raise ValueError(f"{path}: a sharded (directory) checkpoint; mmlm resumes from single-file .ckpt only")
        ckpt = torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, ckpt.pop("state_dict"), options=opts)
        for opt, osd in zip(self.optimizers, ckpt.get("optimizer_states", [])):
            opt = opt._optimizer if isinstance(opt, LightningOptimizer) else opt
            names = _optimizer_names(self.model, opt)
            ids = [i for g in osd["param_groups"] for i in g["params"]]
            if len(ids) != len(names):
                raise ValueError(f"{path}: optimizer state has {len(ids)} params, this run trains {len(names)}")
            name_of = dict(zip(ids, names))  # torch's own rule: saved ids pair with live params by position
            fqn = {"state": {name_of[i]: s for i, s in osd["state"].items()},
                   "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in osd["param_groups"]]}
            set_optimizer_state_dict(self.model, opt, optim_state_dict=fqn, options=opts)
        return ckpt


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Hold a FSDP2-sharded module's root weights (embeddings, final norm, adaptors) gathered while code
    outside its ``forward`` reads them (generation, joint decoding, readouts); a no-op when unsharded.

    Collective: every rank must enter it and then run the same forwards (each decoder layer still
    all-gathers itself in its own forward), so sharded evaluation runs on all ranks over the same
    batches and rank 0 writes the results. Why not refuse generation under FSDP: the README's own
    ``trainer=fsdp`` command ends with an evaluation, and the learning curve evaluates mid-run.
    """
    depth = getattr(module, "_gathered_depth", 0)
    if depth or not is_sharded(module):  # re-entrant: only the outermost gathers and reshards
        yield
        return
    module.unshard()
    module._gathered_depth = 1
    try:
        yield
    finally:
        module._gathered_depth = 0
        module.reshard()


def _fsdp2_strategy(module: nn.Module) -> Any:
    """The FSDP2Strategy training ``module``, or None (any other strategy, or no trainer)."""
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    return strategy if isinstance(strategy, FSDP2Strategy) else None


def configure_sharding(module: nn.Module) -> None:
    """MultimodalLM.configure_model's body: shard when the trainer's strategy is FSDP2, else nothing."""
    if (strategy := _fsdp2_strategy(module)) is not None:
        shard_multimodal(module, strategy.device_mesh["data_parallel"], **strategy.shard_kwargs)


def configure_unit_sharding(module: nn.Module, unit: nn.Module) -> None:
    """A module that trains alone (a modality's encoder pretraining): ``unit`` (the part that trains and whose
    forward the module calls) becomes one FSDP2 unit when the strategy is FSDP2, else nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if (strategy := _fsdp2_strategy(module)) is None or is_sharded(unit):
        return
    kw = strategy.shard_kwargs
    fully_shard(unit, mesh=strategy.device_mesh["data_parallel"], reshard_after_forward=kw["reshard_after_forward"],
                mp_policy=MixedPrecisionPolicy(param_dtype=kw["param_dtype"], reduce_dtype=kw["reduce_dtype"]))


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and buffer of ``module`` in full on CPU (rank 0 holds them when sharded: collective then)."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _SyncExitLauncher(_MultiProcessingLauncher):
    """Spawned ranks leave the process group together once rank 0 has handed back its results.

    Left to exit on its own, a rank that finishes first tears gloo down while its peer still runs
    (observed: ``terminate called without an active exception``, the parent then reports SIGABRT
    for a run that had finished).
    """

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        leave_process_group()

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        """Also hand back the loop's progress (global_step) and every callback's state (the run's losses,
        learning curve, ...): without them the parent reports a run of 0 steps."""
        import io

        extra = super().get_extra_results(trainer)
        buffer = io.BytesIO()  # as bytes, like Lightning's callback metrics: tensors would travel as shared memory
        torch.save({"fit_loop": trainer.fit_loop.state_dict(),
                    "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks}}, buffer)
        extra["mmlm_state_bytes"] = buffer.getvalue()
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        import io

        super().update_main_process_results(trainer, extra)
        state = torch.load(io.BytesIO(extra["mmlm_state_bytes"]), weights_only=True)
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        for cb in trainer.callbacks:
            if cb_state := state["callbacks"].get(cb.state_key):
                cb.load_state_dict(cb_state)


def leave_process_group() -> None:
    """Barrier, then destroy the default process group (no-op when none is up)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class SpawnDDPStrategy(DDPStrategy):
    """DDP over ``torch.multiprocessing`` (trainer=ddp_spawn) whose ranks exit in step."""

    def __init__(self, *args: Any, start_method: str = "spawn", **kwargs: Any) -> None:
        super().__init__(*args, start_method=start_method, **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _SyncExitLauncher(self, start_method=self._start_method)


# ------------------------------------------------------------------ early validation
@dataclass
class Scale:
    """How one run spreads: processes, per-device micro-batch and the global batch it adds up to."""

    world_size: int
    per_device_batch: int
    accumulate: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_device_batch * self.accumulate


def world_size(devices: Any, num_nodes: int, accelerator: str = "auto") -> int:
    """Processes a Trainer with these flags starts: devices per node x nodes ("auto"/-1 = all visible GPUs)."""
    if num_nodes is None or int(num_nodes) < 1:
        raise ValueError(f"trainer.num_nodes={num_nodes}: must be a positive integer")
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        per_node = len(devices)
    elif devices in ("auto", -1, "-1", None):
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        per_node = torch.cuda.device_count() if gpu else 1
    else:
        try:
            per_node = int(devices)
        except ValueError:
            raise ValueError(f"trainer.devices={devices!r}: expected an int, a list of device ids or 'auto'") from None
        if per_node < 1:
            raise ValueError(f"trainer.devices={devices}: must be >= 1 (or 'auto')")
    return per_node * int(num_nodes)


def check_scale(*, strategy: Any, accelerator: str, devices: Any, num_nodes: int, precision: Any,
                quant: str | None, batch_size: int, global_batch_size: int | None = None,
                accumulate: int = 1) -> Scale:
    """Reject an impossible distributed run in one line, before any weights load; return its Scale.

    ``batch_size`` is PER DEVICE (Lightning's convention): the global batch is
    batch_size x world size x accumulate. ``global_batch_size``, when given, wins: the per-device
    batch becomes global / (world x accumulate), which must divide exactly.
    """
    from llm.quant import check_quant

    check_quant(quant)
    prec = str(precision)
    if prec not in PRECISIONS:
        raise ValueError(f"trainer.precision={prec}: expected one of {PRECISIONS}")
    target = strategy.get("_target_", "") if isinstance(strategy, Mapping) else str(strategy or "")
    name = target.rsplit(".", 1)[-1].lower()
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if name in ("fsdp", "fsdpstrategy"):  # FSDP1: needs CUDA, flattens frozen + LoRA weights together, untested here
        raise ValueError(f"trainer.strategy={target} is Lightning's FSDP1 (CUDA only); mmlm shards with FSDP2: "
                         f"use trainer=fsdp")
    if prec.startswith("16") and not cuda:
        raise ValueError(f"trainer.precision={prec}: fp16 needs a CUDA GPU; on CPU use bf16-mixed, bf16-true or 32")
    world = world_size(devices, num_nodes, accelerator)
    accumulate = int(accumulate or 1)
    if accumulate < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate}: must be >= 1")
    if global_batch_size is not None:
        per = int(global_batch_size) // (world * accumulate)
        if per < 1 or per * world * accumulate != int(global_batch_size):
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by world size {world} x "
                             f"accumulate_grad_batches {accumulate}")
        return Scale(world, per, accumulate)
    if int(batch_size) < 1:
        raise ValueError(f"data.batch_size={batch_size}: must be >= 1 (it is per device)")
    return Scale(world, int(batch_size), accumulate)
