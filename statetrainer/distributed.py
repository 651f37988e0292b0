"""Many processes: the process group torchrun describes, the model's DDP wrapper, and the few collectives a run needs.

A script that builds a ``Trainer`` runs unchanged under
``torchrun --nproc_per_node=N script.py``: the trainer sees torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``...), joins the default
process group (or uses the one the script made), puts the rank on
``cuda:LOCAL_RANK`` on CUDA, and wraps the model in
``DistributedDataParallel``, unless the script sharded it with FSDP2's
``fully_shard`` (``shard_model`` does it by blocks): such a model gathers its
parameters and reduces its gradients itself. Everything here is a no-op in
one process.

The collectives are all tensors (never pickle-based object collectives) and
each is called by every rank at the same point of the run, so no rank waits
for one that will not come.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import CheckpointError
from .saved_state import unwrap_model

__all__ = ["Ranks", "StopVote", "agree", "all_gather", "all_reduce", "fully_sharded", "gather_tree", "gathered_states",
           "join_process_group", "launched_by_torchrun", "on_every_rank", "shard_model", "sharded_precision", "sharding_mesh",
           "wrap_model"]  # fmt: skip

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` (or any ``env://``) launch."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes.

    Attributes:
        rank: Its global rank, from 0.
        world_size: How many processes train together.
        local_rank: Its rank on this machine (which GPU it takes).
        backend: The process group's backend (``"gloo"``, ``"nccl"``); None in one process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def collective_device(self, device: torch.device) -> torch.device:
        """Where tensors for a collective live: the run's GPU under NCCL, else the CPU."""
        return device if self.backend == "nccl" else torch.device("cpu")


def join_process_group(device: torch.device) -> tuple[Ranks, torch.device]:
    """This process's ``Ranks``, joining torchrun's process group when the script has not; and the device to use.

    Under torchrun, ``cuda`` (no index) becomes ``cuda:LOCAL_RANK`` (modulo the
    GPUs there are, so one GPU can host several ranks for a correctness check;
    an explicit ``cuda:1`` is kept). The backend is NCCL when every local rank
    has a GPU of its own, else gloo.
    """
    joining = dist.is_available() and not dist.is_initialized() and launched_by_torchrun()
    if not (joining and int(os.environ["WORLD_SIZE"]) > 1) and not (dist.is_available() and dist.is_initialized()):
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == torch.device("cuda"):
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if joining:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        nccl = device.type == "cuda" and torch.cuda.device_count() >= local_ranks
        dist.init_process_group("nccl" if nccl else "gloo", device_id=device if nccl else None)
        atexit.register(_leave_process_group)
    if dist.get_world_size() < 2:
        return Ranks(), device
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend()), device


_WRAPPED: weakref.WeakSet[nn.parallel.DistributedDataParallel] = weakref.WeakSet()
_RELEASE_AT_EXIT: list[bool] = []  # whether _release_wrappers is registered with atexit


def _release_wrappers() -> None:
    """Free the DDP models' C++ reducers while the process group still exists.

    Left to the interpreter's teardown, a reducer can outlive its process
    group, and the process then aborts as it exits ("terminate called without
    an active exception"; about one exit in six with gloo on torch 2.15).
    """
    for wrapper in list(_WRAPPED):
        for native in ("reducer", "logger"):
            if native in wrapper.__dict__:
                delattr(wrapper, native)
    gc.collect()


def _leave_process_group() -> None:
    _release_wrappers()
    if dist.is_initialized():
        dist.destroy_process_group()


def fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded with FSDP2's ``fully_shard`` at its root (its parameters are DTensors).

    Raises:
        ValueError: Some of its modules are sharded but not the root, which FSDP2 needs to manage the rest.
    """
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415 -- not where torch has no distributed package

    model = unwrap_model(model)  # under torch.compile
    if isinstance(model, FSDPModule):
        return True
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        raise ValueError("the model has modules sharded with fully_shard, but not the model itself: call "
                         "fully_shard(model) last, on the whole model (statetrainer.distributed.shard_model does)")  # fmt: skip
    return False


def sharding_mesh(model: nn.Module) -> Any:
    """The device mesh of a model sharded with ``fully_shard`` (its parameters'); None for any other model."""
    if not fully_sharded(model):
        return None
    return next(getattr(parameter, "device_mesh") for parameter in model.parameters()  # noqa: B009 -- a DTensor's
                if hasattr(parameter, "device_mesh"))  # fmt: skip


def sharded_precision(model: nn.Module) -> dict[str, str] | None:
    """Each sharded module's FSDP2 ``MixedPrecisionPolicy`` as text, by module name (``""``: the root): a setting
    an exact resume depends on. None for a model not sharded with ``fully_shard``."""
    if not fully_sharded(model):
        return None
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415 -- as in fully_sharded

    def text(value: Any) -> str:  # a dtype, a flag, or a function of the parameter
        return getattr(value, "__qualname__", None) or str(value).removeprefix("torch.")

    policies = {}
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, FSDPModule):
            policy = module._get_fsdp_state()._mp_policy  # noqa: SLF001 -- FSDP2 offers no public getter of it
            policies[name] = ", ".join(f"{field.name}={text(getattr(policy, field.name))}"
                                       for field in fields(policy))  # fmt: skip
    return policies


def shard_model(model: nn.Module, blocks: Iterable[nn.Module] | None = None, *,
                mp_policy: Any = None) -> nn.Module:  # fmt: skip
    """Shard ``model`` with FSDP2, as torchtitan does: ``fully_shard`` on each block, then on the whole model.

    Each block's parameters are then gathered for its forward and backward only, and its gradients reduced
    and sharded as its backward ends. Call it under torchrun before building the ``Trainer`` (it joins the
    process group, as the trainer would), with the model on the rank's device.

    Args:
        model: The model to shard, in place.
        blocks: The modules to shard one by one; by default the children of the model's outermost
            ``nn.ModuleList``s (a transformer's layers), or for a model with none, its direct children that have
            parameters.
        mp_policy: FSDP2's ``MixedPrecisionPolicy``, for every block and the root.

    Returns:
        ``model``, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415 -- as in fully_sharded

    device = next(model.parameters()).device
    join_process_group(device)
    if blocks is None:
        blocks = _outermost_list_blocks(model) or [
            child for child in model.children() if any(True for _ in child.parameters())]  # fmt: skip
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _outermost_list_blocks(module: nn.Module) -> list[nn.Module]:
    """The children of the ``nn.ModuleList``s in ``module`` that are in no other list's block (FSDP2 shards the
    inner modules before the outer, so a block's own lists stay in it)."""
    blocks: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        else:
            blocks.extend(_outermost_list_blocks(child))
    return blocks


def wrap_model(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` for a run of several processes (as it is when already wrapped, or
    sharded with ``fully_shard``)."""
    if not ranks.distributed or fully_sharded(model):
        return model
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if not _RELEASE_AT_EXIT:
        _RELEASE_AT_EXIT.append(True)
        atexit.register(_release_wrappers)  # runs before _leave_process_group (atexit runs last-in first-out)
    _WRAPPED.add(model)
    return model


def all_gather(tensor: torch.Tensor, ranks: Ranks, device: torch.device, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on each), in rank order, on ``tensor``'s device; over
    ``group``, a gloo group of every rank (the tensors go over it from the CPU), or the run's own."""
    if not ranks.distributed:
        return [tensor]
    where = ranks.collective_device(device) if group is None else torch.device("cpu")
    local = tensor.to(where).contiguous()
    gathered = [torch.empty_like(local) for _ in range(ranks.world_size)]
    dist.all_gather(gathered, local, group=group)
    return [part.to(tensor.device) for part in gathered]


def all_reduce(tensor: torch.Tensor, ranks: Ranks, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """``tensor`` reduced over the ranks with ``op`` (in place where it can be; returned either way)."""
    if not ranks.distributed:
        return tensor
    where = ranks.collective_device(tensor.device)
    if tensor.device == where:
        dist.all_reduce(tensor, op)
        return tensor
    moved = tensor.to(where)
    dist.all_reduce(moved, op)
    return moved.to(tensor.device)


@contextlib.contextmanager
def on_every_rank(ranks: Ranks, device: torch.device, what: str) -> Iterator[None]:
    """Run the block on every rank; if it raises on any, raise on every one (the others a ``CheckpointError``
    naming ``what``), so no rank goes on to a collective that will not come. In one process, just the block."""
    failure: BaseException | None = None
    try:
        yield
    except Exception as error:  # noqa: BLE001 -- the other ranks hear of it before it propagates
        failure = error
    if not agree(failure is None, ranks, device):
        raise failure or CheckpointError(f"another rank could not {what}; see its error")


def agree(ok: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when ``ok`` holds on every rank (a barrier that also tells whether any rank failed)."""
    if not ranks.distributed:
        return ok
    vote = torch.tensor([int(ok)], dtype=torch.int32, device=ranks.collective_device(device))
    dist.all_reduce(vote, dist.ReduceOp.MIN)
    return bool(vote.item())


class StopVote:
    """Shares a stop signal between the ranks at batch boundaries, so every rank stops after the same batch.

    torchrun forwards SIGTERM to every rank, but each gets it at its own point
    of its own batch. After each batch, every rank sends the signal it has
    received (0 for none) into an all-reduce (max) on a gloo group, started
    without waiting; the next boundary reads the result, which is the same on
    every rank. So the run stops at most one batch after the first rank got
    the signal, the exchange costs no GPU sync, and it overlaps a batch.

    Rank 0's failed background checkpoint write travels the same way, as
    ``WRITE_FAILED`` (above every signal number), so every rank raises at one
    boundary instead of rank 0 alone.

    Args:
        ranks: The run's ranks (a vote exists only with several).
    """

    WRITE_FAILED = 1 << 20

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        group = dist.new_group(backend="gloo") if ranks.backend != "gloo" else None
        assert not isinstance(group, int)  # not GroupMember.NON_GROUP_MEMBER: every rank is in a group of all ranks
        self.group = group
        self.received = 0  # this rank's signal (set by its handler), or WRITE_FAILED; only ever raised
        self._outgoing = torch.zeros(1, dtype=torch.int32)
        self._pending: dist.Work | None = None
        self._decided = 0

    def exchange(self) -> int:
        """At a batch boundary: the signal any rank had received by the previous boundary (0 for none)."""
        self.settle()
        decided, self._decided = self._decided, 0
        self._outgoing[0] = self.received
        self._pending = dist.all_reduce(self._outgoing, dist.ReduceOp.MAX, group=self.group, async_op=True)
        return decided

    def settle(self) -> None:
        """Wait for the exchange in flight and keep its result for the next boundary (every rank calls it alike)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending, self._decided = None, int(self._outgoing[0])

    def abandon(self) -> None:
        """Forget the exchange in flight: the run ended in an error, and another rank may never answer."""
        self._pending = None


def gathered_states(local: Sequence[torch.Tensor], ranks: Ranks, device: torch.device) -> list[list[torch.Tensor]]:
    """``local`` tensors of every rank: ``result[rank][index]`` (each tensor's shape the same on every rank)."""
    if not ranks.distributed:
        return [list(local)]
    per_tensor = [all_gather(tensor, ranks, device) for tensor in local]
    return [[gathered[rank] for gathered in per_tensor] for rank in range(ranks.world_size)]


def gather_tree(tree: Any, ranks: Ranks, device: torch.device) -> list[Any]:
    """Every rank's ``tree`` (dicts and lists of tensors, numbers, strings, None), in rank order.

    The trees must have the same structure and tensor shapes on every rank;
    numbers travel as tensors, and strings and None are taken as this rank has them.
    """
    if not ranks.distributed:
        return [tree]
    leaves, spec = tree_flatten(tree)
    sent = [_as_tensor(leaf) for leaf in leaves if isinstance(leaf, (torch.Tensor, bool, int, float))]
    return [tree_unflatten(_received(leaves, iter(rank_leaves)), spec)
            for rank_leaves in gathered_states(sent, ranks, device)]  # fmt: skip


def _as_tensor(leaf: torch.Tensor | float) -> torch.Tensor:
    if isinstance(leaf, torch.Tensor):
        return leaf
    return torch.tensor(leaf, dtype=torch.float64 if isinstance(leaf, float) else torch.int64)


def _received(leaves: list[Any], received: Iterator[torch.Tensor]) -> list[Any]:
    """``leaves`` with each tensor and number replaced by the next of ``received`` (a number as its own type)."""
    return [next(received) if isinstance(leaf, torch.Tensor)
            else type(leaf)(next(received).item()) if isinstance(leaf, (bool, int, float)) else leaf
            for leaf in leaves]  # fmt: skip
