"""Data-parallel training on the engines users already run: ``torchrun`` with DDP or FSDP2.

peftlab has no distributed layer of its own. This module only connects the lab trainer to
``torch.distributed``:

* :func:`init_from_env` starts the process group from the variables ``torchrun`` (or
  ``accelerate launch``) sets: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``. Backend ``nccl`` on CUDA, ``gloo`` on CPU.
* :func:`wrap` wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel`
  (``strategy="ddp"``) or shards it in place with FSDP2's
  :func:`torch.distributed.fsdp.fully_shard` (``strategy="fsdp"``: every transformer block
  named in the model's ``_no_split_modules``, then the root).
* :class:`Dist` holds the rank and world size and the few collectives the trainer needs
  (sum of the step's loss and tokens, agreement on a NaN stop, gathering RNG states).
* :func:`full_parameters` unshards an FSDP2 model for saving (:func:`peftlab.save` then sees
  whole tensors); :func:`full_tensor` and :func:`copy_full` move checkpoint tensors in and out
  of shards.

Which methods shard: a method whose class sets ``Method.fsdp_compatible = False`` is refused
under FSDP with an error naming the engine to use instead (``Method.fsdp_alternative``); every
attached method's ``Method.prepare_sharding`` runs before ``fully_shard`` (QLoRA makes its
quantized storage parameters there, so that it shards).
``Method.ddp_find_unused_parameters`` asks DDP to look for parameters that get no gradient in a
step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.core.errors import ConfigError

__all__ = ["STRATEGIES", "Dist", "copy_full", "current", "full_parameters", "full_tensor", "init_from_env",
           "is_sharded", "wrap"]

STRATEGIES = ("ddp", "fsdp")
"""Values of ``TrainConfig.strategy``: how the model is wrapped when more than one process runs."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, progress bars and reports."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (fp64 on the CPU or the local GPU)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current() -> Dist:
    """The running job as ``torch.distributed`` sees it (rank 0 of 1 when it is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", 0)))
    return Dist()


def init_from_env() -> tuple[Dist, bool]:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Returns:
        The :class:`Dist` and whether this call created the group (the caller then destroys it).

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 without the rest of torchrun's variables.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return current(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; start the job with "
                          "`torchrun --nproc_per_node N -m peftlab.cli train ...` (or accelerate launch)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend)
    return current(), True


def device_for(dist: Dist) -> torch.device:
    """The device a process of a distributed job trains on: its local GPU, else the CPU."""
    if dist.active and torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


# --------------------------------------------------------------------------- wrapping


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` has been sharded with FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_strategy(model: nn.Module, strategy: str) -> None:
    """Refuse a strategy that an attached method cannot run under, naming what to use instead.

    Raises:
        ConfigError: Unknown strategy, or FSDP with a method whose ``fsdp_compatible`` is False.
    """
    from peftlab.api import adapters

    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy != "fsdp":
        return
    for name, method in adapters(model).items():
        if not getattr(method, "fsdp_compatible", True):
            instead = getattr(method, "fsdp_alternative", "") or "--strategy ddp"
            raise ConfigError(f"adapter {name!r} ({method.method_name}) cannot be sharded with FSDP: "
                              f"{getattr(method, 'fsdp_reason', '') or 'its tensors do not shard'}; "
                              f"use {instead} instead")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one: modules whose class is named in the model's
    ``_no_split_modules`` (transformers' list of blocks that must stay whole), outermost only.

    A block holding the input embeddings stays in the root's group: input-side methods (soft
    prompts) call the embedding from a hook on the model, and the root group is gathered
    before that hook runs, a block's group only when the block itself is called."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        bases = {c.__name__ for c in type(module).__mro__}
        holds_embeddings = embeddings is not None and any(m is embeddings for m in module.modules())
        if module is not model and names & bases and not holds_embeddings:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def wrap(model: nn.Module, strategy: str, dist: Dist) -> nn.Module:
    """The module to call in training: ``model`` itself when not distributed or already
    sharded, a DDP wrapper around it, or ``model`` sharded in place with ``fully_shard``.

    Parameters stay addressable under their own names on ``model`` (DDP wraps it; FSDP2 swaps
    each parameter for a DTensor shard in place), so build the optimizer after this call.
    """
    check_strategy(model, strategy)
    if not dist.active or is_sharded(model):
        return model
    from peftlab.api import adapters

    device = next(model.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        find_unused = any(getattr(m, "ddp_find_unused_parameters", False) for m in adapters(model).values())
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for method in adapters(model).values():
        method.prepare_sharding(model)
    mesh = init_device_mesh(device.type, (dist.world,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(runner: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP ``no_sync``) or reduce-scatter (FSDP2) inside the block
    when ``enabled`` is False: gradient accumulation syncs only on the last micro-batch."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(runner, DistributedDataParallel):
        with runner.no_sync():
            yield
    elif is_sharded(runner):
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)
    else:
        yield


# --------------------------------------------------------------------------- tensors


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not sharded)."""
    return t.to_local() if _is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor shard: every rank must call it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def copy_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor ``value`` into ``target``, into this rank's shard when it is a DTensor."""
    with torch.no_grad():
        if _is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            value = value.to(device=target.device, dtype=target.dtype)
            shard = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(value.to(dtype=target.dtype))


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every parameter of an FSDP2-sharded ``model`` is a whole tensor (all
    ranks enter together: gathering is a collective), so :func:`peftlab.save` or
    ``save_pretrained`` see full tensors; afterwards the shards are put back. A model that is not
    sharded passes through unchanged."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # a group left unsharded after a forward (the root) holds views
        if isinstance(module, FSDPModule):  # of gather buffers: back to its shards first
            module.reshard()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and _is_dtensor(param):
                    whole = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                    module._parameters[key] = whole
                    swapped.append((module, key, param))
        yield model
    finally:
        for module, key, param in reversed(swapped):
            module._parameters[key] = param


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's ``state_dict`` with whole tensors: FSDP2 shards (DTensors) are gathered (a
    collective: every rank calls this). The layout is the one a single process writes, so a
    checkpoint does not depend on the strategy."""
    state = optimizer.state_dict()
    if not any(_is_dtensor(v) for s in state["state"].values() for v in s.values()):
        return state
    whole = {i: {k: full_tensor(v).cpu() if _is_dtensor(v) else v for k, v in s.items()}
             for i, s in sorted(state["state"].items())}
    return {"state": whole, "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`: whole tensors of a sharded parameter become this
    rank's shard (placed like the parameter) before ``load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(_is_dtensor(p) for p in params):
        from torch.distributed.tensor import DTensor, distribute_tensor

        placed = {}
        for i, s in state["state"].items():
            p = params[int(i)]
            placed[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                         if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                         for k, v in s.items()}
        state = {"state": placed, "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)
