"""torchrun / FSDP2 plumbing: process group, sharding, filling shards from checkpoint files, full state dicts,
collectives that every rank runs.

One process without torchrun is the same code path with world size 1 and no sharding.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# how long a collective waits for the other ranks before the process group's watchdog ends the run (nccl's default
# is 10 minutes): the ranks wait at a barrier while rank 0 gathers and writes a checkpoint's HF export, minutes
# for an 8B model on a slow disk
TIMEOUT = timedelta(minutes=60)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    one_rank_fsdp: bool = False  # a process group of one rank whose models are sharded all the same (--fsdp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether models are sharded and the collectives run: several ranks, or one under --fsdp."""
        return self.world > 1 or self.one_rank_fsdp


def setup(device: str | None = None, fsdp: bool = False) -> Dist:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU). fsdp: join it and shard also
    when torchrun runs a single process (the multi-GPU code path on one device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if fsdp and "LOCAL_RANK" not in os.environ:
        from .config import ConfigError

        raise ConfigError("--fsdp needs torchrun (e.g. torchrun --nproc_per_node=1 scripts/train_grpo.py --fsdp ...)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if (world > 1 or fsdp) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local, device=dev, one_rank_fsdp=fsdp and world == 1)


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


def shard(model: torch.nn.Module, d: Dist, compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`fully_shard_model` when d.enabled (several ranks, or one under --fsdp); else the model as it is.

    The sharded weights keep their dtype (fp32 masters for the policy); a lower compute_dtype (bf16) is FSDP's
    param_dtype (the gathered copies forward multiplies by), with gradients reduced in fp32.
    """
    if not d.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = None
    if compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return fully_shard_model(model, mp)


def fully_shard_model(model: torch.nn.Module, mp_policy=None) -> torch.nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the root (embeddings, final norm, head).

    The blocks reshard their parameters after forward; the root keeps its own gathered (backward needs them
    first). That is FSDP's choice for a root, made explicit here so that it holds from the first forward on,
    also when that forward runs inside `gathered`.
    """
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=True, **kw)
    return fully_shard(model, reshard_after_forward=False, **kw)


def load_shards(model: torch.nn.Module, path, extra: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Fill a model that was sharded on the meta device (`fully_shard_model`) and then given storage on the rank's
    device (`to_empty`) with the weights of the HF checkpoint directory `path`: each rank reads only the rows of
    its own shard of each tensor (safetensors reads lazily), so no rank ever holds a whole model. Names and shapes
    are checked as by `load_model`. extra: whole tensors, on the CPU, of the parameters the checkpoint lacks (LoRA
    adapters), of which each rank keeps its rows too. The RoPE buffer, left uninitialised by to_empty, is
    recomputed. A model without FSDP (one process) is filled whole the same way."""
    from model.checkpoint import checkpoint_tensors, read_tensor

    params = dict(model.named_parameters())
    extra = extra or {}
    unknown = sorted(set(extra) - set(params))
    if unknown:
        raise ValueError(f"load_shards: no parameter named {unknown[0]!r} in the model")
    shapes = {name: p.shape for name, p in params.items() if name not in extra}
    with torch.no_grad():
        for name, file, f in checkpoint_tensors(path, shapes, model.config):
            _fill_rows(params[name], name, lambda a, b: read_tensor(file, name, lambda: f.get_slice(name)[a:b]))
        for name, t in extra.items():
            _fill_rows(params[name], name, lambda a, b: t[a:b])
    model.reset_rope()
    return model


def _fill_rows(param: torch.Tensor, name: str, read_rows):
    """Copy rows [a, b) of the whole tensor, `read_rows(a, b)`, into this rank's shard of `param`: FSDP2 cuts dim 0
    into world-size chunks of ceil(rows / world) rows (torch.chunk; the last ones shorter or empty)."""
    from torch.distributed.tensor import DTensor, Shard

    local, start, stop = param, 0, param.shape[0]
    if isinstance(param, DTensor):
        if tuple(param.placements) != (Shard(0),):
            raise ValueError(f"{name}: placements {param.placements}, expected FSDP's Shard(0) on a 1-D mesh")
        local, mesh = param.to_local(), param.device_mesh
        per = -(-param.shape[0] // mesh.size())
        start = min(mesh.get_local_rank() * per, param.shape[0])
        stop = min(start + per, param.shape[0])
    if local.is_meta:
        raise RuntimeError(f"{name}: still on the meta device (give the model storage first: model.to_empty)")
    if local.shape[0] != stop - start:  # FSDP cut the tensor otherwise than assumed
        raise RuntimeError(f"{name}: this rank's shard has {local.shape[0]} rows, expected rows {start}..{stop}")
    if stop > start:
        local.copy_(read_rows(start, stop))


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshards_after_forward(module) -> bool:
    """Whether an FSDP module frees its gathered parameters after forward (FSDP keeps the setting in its
    parameter groups: a post-forward mesh, or None to keep them; there is no public getter)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch versions with a single group per module
        groups = [g for g in [state._fsdp_param_group] if g is not None]
    return any(g.post_forward_mesh_info is not None for g in groups)


@contextmanager
def gathered(model):
    """Keep every FSDP module's parameters gathered for the duration (a rollout: hundreds of forwards, one
    all-gather each instead of one per forward); then reshard them and give each module back its own setting
    (the root keeps its parameters after a training forward, the blocks do not). A no-op without FSDP."""
    mods = fsdp_modules(model)
    before = [reshards_after_forward(m) for m in mods]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m, reshard in zip(mods, before):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (a collective under FSDP: call it on every rank; rank 0 uses it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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


def pad_to_world(items: list, d: Dist) -> tuple[list, int]:
    """This rank's equal-sized share of `items` (the last share padded by repeating the final element, so every
    rank runs the same number of forward passes), and how many of its entries are real."""
    per = -(-len(items) // d.world)
    mine = items[d.rank * per:(d.rank + 1) * per]
    real = len(mine)
    return mine + [items[-1]] * (per - real), real
