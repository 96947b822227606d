"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`), the one place that shards.

The way torchtitan and torchtune do it, not through accelerate's FSDP plugin: accelerate stays the
launcher and the process state (ranks, `reduce`, `gather`, barriers), and never wraps what is sharded
(its FSDP set-up exists only for GPU distributed types, takes one model per `prepare()`, and would
reduce in bf16). What this module gives a loop:

* `shard_model`: one FSDP unit per decoder layer, the input embedding and the tail (final norm and head)
  as units of their own, or one unit when the embeddings are tied (a parameter may live in one unit
  only), then the root (which keeps a reward model's scalar head and final norm). On GPU a mixed-precision policy: bf16 compute weights, fp32 gradient reduction,
  fp32 master weights (the parameters stay fp32, so AdamW updates fp32). On CPU fp32 throughout.
* `grad_sync`: the micro-batch context. FSDP2 has no `no_sync`: on all but the last micro-batch,
  `set_requires_gradient_sync(False)` accumulates unsharded gradients locally; the last one
  reduce-scatters their sum, the same arithmetic as DDP's single all-reduce per optimiser step.
* `clip_grad_norm`: the global norm over the shards (`torch.nn.utils.clip_grad_norm_` on DTensor
  gradients returns a replicated DTensor holding the global norm; checked against one process).
* `full_state_dict`: the gathered weights on rank 0 for `final/` (every rank must call it).
* `full_weights`: a block with the whole weights on every rank and no collectives inside (rollouts);
  `resharded_after`: the block of a lockstep rollout (`rollout_sharded: lockstep`), weights left sharded.
* `memory_report`: this rank's bytes of parameters, gradients and AdamW state; `planned_memory`: the
  same for every rank of any world size, from the parameter shapes alone (bench/memory.py).

The optimiser must be built after `shard_model`, so that it holds the sharded parameters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# accelerate launch with accelerate_configs/fsdp.yaml sets this; align then shards itself.
ACCELERATE_FSDP_ENV = "ACCELERATE_USE_FSDP"
# Seconds a collective may wait before it fails (tests set 60 so a hang fails instead of blocking).
PG_TIMEOUT_ENV = "ALIGN_PG_TIMEOUT_S"


def launched_with_fsdp() -> bool:
    """Whether accelerate was launched with an FSDP config (accelerate_configs/fsdp.yaml)."""
    return os.environ.get(ACCELERATE_FSDP_ENV, "false").lower() == "true"


def wants_sharding(cfg: Any) -> bool:
    """`sharding=fsdp`, or a launch with accelerate's FSDP config (every stage shards itself)."""
    return getattr(cfg, "sharding", "none") == "fsdp" or launched_with_fsdp()


def check_sharding(cfg: Any) -> None:
    """Refuse, with a one-line reason naming the keys, what sharding cannot do (yet); before loading."""
    lockstep = getattr(cfg, "rollout_sharded", "unshard") == "lockstep"
    if not wants_sharding(cfg):
        if lockstep:
            raise ValueError(
                "rollout_sharded=lockstep without sharding=fsdp: an unsharded policy decodes on each process "
                "on its own, there is nothing to keep in step; set sharding=fsdp or rollout_sharded=unshard"
            )
        return
    if cfg.use_lora:
        raise ValueError(
            "sharding=fsdp with use_lora=true: not supported (the final merge needs the whole model on one "
            "process, and LoRA's few trained weights gain little from sharding); use sharding=none"
        )
    if getattr(cfg, "eval_tasks", 0) > 0 and cfg.dataset == "embedded":
        raise ValueError(
            "sharding=fsdp with dataset=embedded and eval_tasks>0: the held-out generation runs on one "
            "process and cannot read sharded weights yet; set eval_tasks=0"
        )
    if getattr(cfg, "offload_frozen", False):
        raise ValueError(
            "sharding=fsdp with offload_frozen=true: the frozen models are sharded instead of moved (moving "
            "FSDP units is not supported); set offload_frozen=false"
        )
    engine = getattr(cfg, "rollout_engine", None)
    if engine == "vllm":
        raise ValueError(
            "sharding=fsdp with rollout_engine=vllm: the weight sync would hand vLLM shards, not whole "
            "tensors (not built yet); use rollout_engine=hf, manual or static"
        )
    if lockstep and engine not in ("hf", "manual"):
        raise ValueError(
            f"rollout_sharded=lockstep with rollout_engine={engine}: only the manual and hf engines decode in "
            "lockstep (the static engine refills finished slots per rank, so ranks' forward counts differ); "
            "use rollout_engine=manual or hf, or rollout_sharded=unshard"
        )
    compiled = getattr(cfg, "rollout_compile", "auto")
    if engine == "static" and (compiled == "on" or (compiled == "auto" and torch.cuda.is_available())):
        raise ValueError(
            f"sharding=fsdp with rollout_engine=static and rollout_compile={compiled}: a compiled decoding "
            "step cannot trace through FSDP's hooks; set rollout_compile=off"
        )


def ensure_process_group() -> None:
    """A one-process group where none was set up (a single process, `sharding=fsdp`): FSDP2 needs one."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, by the classes transformers names in `_no_split_modules` (peft-wrapped too)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"sharding: found no decoder layers in {type(model).__name__} (_no_split_modules)")
    return layers


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    backbone = getattr(model, "backbone", None)  # align's RewardModel: a base transformer and a scalar head
    return backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model_prefix", None)
    inner = getattr(model, base, None) if base else None
    return getattr(inner, "norm", None) if isinstance(inner, nn.Module) else None


def shard_model(model: nn.Module, *, mixed_precision: bool | None = None, frozen: bool = False) -> nn.Module:
    """Shard `model` in place over the default process group and return it.

    Args:
        mixed_precision: bf16 compute with fp32 reduction and fp32 master weights; default: on GPU only.
        frozen: a model that is never trained (an RL reference or reward model): no gradients, eval mode,
            and every unit, the root included, resharded after each forward (the root's default keeps its
            weights whole until a backward that never comes).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group()
    if frozen:
        model.requires_grad_(False).eval()
    if mixed_precision is None:
        mixed_precision = next(model.parameters()).device.type == "cuda"
    kwargs: dict[str, Any] = {"reshard_after_forward": True} if frozen else {}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    embed = _input_embeddings(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Without an LM head (a reward or value model) the final norm stays with the root, as does the scalar
    # head: a grouped [norm, head] unit would gather twice when the head runs twice (return_all).
    norm = _final_norm(model) if head is not None else None
    tail = [m for m in (norm, head) if isinstance(m, nn.Module)]
    if embed is not None and head is not None and head.weight is embed.weight:
        fully_shard([embed, *tail], **kwargs)  # tied: the shared weight may belong to one unit only
    else:
        if embed is not None:
            fully_shard(embed, **kwargs)
        if tail:
            fully_shard(tail, **kwargs)
    fully_shard(model, **kwargs)  # the root: whatever is left, and the lazy init of the whole tree
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def grad_sync(accelerator: Any, model: nn.Module, sync: bool) -> Any:
    """The context of one micro-batch's backward: gradients synchronised only when `sync` (the last
    micro-batch of an optimiser step). DDP through accelerate's `no_sync`; FSDP2 through
    `set_requires_gradient_sync`, switched back on when the block ends."""
    if not is_sharded(model):
        return nullcontext() if sync else accelerator.no_sync(model)
    return _fsdp_sync(model, sync)


@contextmanager
def _fsdp_sync(model: Any, sync: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(parameters: Any, max_norm: float) -> float:
    """Clip to the global norm over every process's shards; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor gradients give a DTensor norm (replicated)
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered to CPU on rank 0 ({} on the others); a collective.

    Cloned: on the CPU `cpu_offload` would hand back tensors that alias the live parameters. Tied
    weights stay one tensor, so `save_pretrained` sees the tie and writes the weight once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}
    first: dict[int, str] = {}  # the gather gives tied names separate copies: make them one tensor again
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in out:
            out[name] = out[first.setdefault(id(param), name)]
    return out


@contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Hold every FSDP unit's whole weights for the block: one all-gather per unit on entry, none inside.

    Forwards inside make no collectives, so ranks may run different numbers of them (rollouts whose rows
    stop at different lengths, an evaluation on one rank). On exit every unit is resharded, so the next
    optimiser step updates what the next forward reads (an unsharded unit would keep the old weights:
    `unshard()` does nothing on a unit that already is). Every rank must enter and leave together.
    Run the block under `torch.no_grad()`, not `torch.inference_mode()` (FSDP2 reuses the unsharded
    parameter storage for training). A model that is not sharded passes through unchanged."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # Whether each unit reshards after forward, to put back; private to FSDP2 in torch 2.13.
    before = [any(g._reshard_after_forward for g in m._get_fsdp_state()._fsdp_param_groups) for m in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for handle in [unit.unshard(async_op=True) for unit in units]:
        if handle is not None:
            handle.wait()
    try:
        yield
    finally:
        for unit, flag in zip(units, before, strict=True):
            unit.reshard()
            unit.set_reshard_after_forward(flag, recurse=False)


@contextmanager
def resharded_after(model: nn.Module) -> Iterator[None]:
    """The block of a lockstep rollout (`align.rollout.lockstep`): the weights stay shards, every forward
    gathers them unit by unit with every rank in step. On exit every unit is resharded, so one a no-grad
    forward left whole (the root keeps its weights until a backward) cannot serve stale weights after the
    next optimiser step. Every rank must enter and leave together."""
    from torch.distributed.fsdp import FSDPModule

    try:
        yield
    finally:
        for unit in [m for m in model.modules() if isinstance(m, FSDPModule)]:
            unit.reshard()


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def memory_report(model: nn.Module, accumulation_steps: int = 1) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and AdamW state (two moments per trained parameter),
    from the tensors it holds; the optimiser state is counted before it exists, at its fp32 size.

    `grads_accumulating`: what FSDP2 holds in addition while micro-batches accumulate without
    synchronisation (unsharded gradients of the whole model); 0 with one micro-batch per step."""
    params = list({id(p): p for p in model.parameters()}.values())
    trained = [p for p in params if p.requires_grad]
    param_bytes = sum(_local_bytes(p) for p in params)
    grad_bytes = sum(_local_bytes(p) for p in trained)
    optim_bytes = sum(2 * (p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in trained)
    full = sum(p.numel() * p.element_size() for p in trained)  # DTensor.numel() is the global size
    sharded = is_sharded(model)
    return {
        "params": param_bytes,
        "grads": grad_bytes,
        "optimizer": optim_bytes,
        "total": param_bytes + grad_bytes + optim_bytes,
        "grads_accumulating": full if sharded and accumulation_steps > 1 else 0,
    }


def planned_memory(model: nn.Module, world: int, accumulation_steps: int = 1) -> list[dict[str, int]]:
    """What `memory_report` gives each of `world` ranks once `shard_model` has sharded `model` over them,
    from the parameter shapes alone: `model` may live on the meta device (a 72B model costs nothing) and
    the ranks need not exist. FSDP2 cuts every parameter along its first dimension as `torch.chunk` does:
    chunks of ceil(rows / world) rows, so the last ranks may hold fewer rows or none. `world` 1: the
    unsharded model. Checked against the bytes measured on 2 processes (tests/test_sharding.py)."""
    params = list({id(p): p for p in model.parameters()}.values())
    full = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    ranks = []
    for rank in range(world):
        held = {"params": 0, "grads": 0, "optimizer": 0}
        for p in params:
            rows = p.shape[0] if p.dim() else 1
            chunk = -(-rows // world)
            numel = max(0, min(chunk, rows - rank * chunk)) * (p.numel() // rows if rows else 0)
            held["params"] += numel * p.element_size()
            if p.requires_grad:
                held["grads"] += numel * p.element_size()
                held["optimizer"] += 2 * numel * 4  # AdamW's two fp32 moments
        ranks.append(
            {
                **held,
                "total": sum(held.values()),
                "grads_accumulating": full if world > 1 and accumulation_steps > 1 else 0,
            }
        )
    return ranks
