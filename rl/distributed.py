"""torchrun / FSDP2 plumbing: process group, sharding, full state dicts, collectives that every rank runs.

One process without torchrun is the same code path with world size 1 and no sharding.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> Dist:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def teardown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def local_main_first(d: Dist):
    """Local rank 0 runs the body first, every other rank after it (a barrier): a model source is converted or
    downloaded into the node's cache once, and the other ranks find it there. Without a process group: just
    the body."""
    if d.enabled and d.local_rank != 0:
        dist.barrier()
    try:
        yield
    finally:  # even when the body failed: the others then try, and fail with their own error, not a hang
        if d.enabled and d.local_rank == 0:
            dist.barrier()


def exit_if_distributed():
    """End a torchrun worker right after its work: skip the interpreter's shutdown, where a gloo worker once
    aborted with "terminate called without an active exception" after the process group was destroyed and
    every file written (a C++ thread torn down during static destruction; seen once in ~20 two-rank CI runs).
    One process without torchrun exits normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def shard(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the root (embeddings, final norm, head).

    On CUDA the compute runs in bf16 with gradients reduced in fp32; the sharded master weights stay fp32.
    """
    if not d.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if d.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if mp is not None else {}
    for block in model.model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model):
    """Keep every block's parameters gathered for the duration (a rollout: hundreds of forwards, one all-gather
    each instead of one per forward). A no-op without FSDP."""
    mods = fsdp_modules(model)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (a collective under FSDP: call it on every rank; rank 0 uses it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optim_state_dict(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optim_state_dict(model, optimizer, state: dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def all_sum(x, d: Dist):
    """Sum a number or tensor over ranks (returned as a tensor on the rank's device)."""
    t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else x.dtype, device=d.device).clone()
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(x, d: Dist):
    t = torch.as_tensor(x, device=d.device).clone()
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
