"""Run checkpoints: `run_dir/checkpoints/step_N/` holds
  - the weights, as files others read, gathered and written by rank 0: `model/`, an HF model directory (loadable
    by transformers, by our loader, and as the --model of a next run), or for a LoRA policy `adapter/`, the
    adapter in PEFT's layout (adapter_model.safetensors + adapter_config.json, on the base model named in it);
  - `train_state/`: AdamW's state, sharded as the parameters are, and each rank's RNG, a
    torch.distributed.checkpoint (DCP) directory in which every rank writes its own file (`__R_0.distcp`, and
    `.metadata`): no rank gathers the optimizer, and a resumed run's ranks each read their own shards (at any
    number of ranks: DCP reshards);
  - `trainer_state.json`: step, scheduler, the optimizer's hyper-parameters (its param groups), config.
A resumed run reads its weights from `model/` or `adapter/` (rl/loop.build_models: under FSDP each rank reads its
own rows), not a second copy in train_state/. The run directory must be on a filesystem every rank sees (one
node, or a shared one). Nothing is unpickled: DCP's tensors are read with torch.load(weights_only=True) and its
metadata pickle by an unpickler that admits only DCP's metadata classes (`Reader`).

A checkpoint is written into a hidden temporary directory and renamed to `step_N` only when complete, so a run
killed mid-write leaves the previous checkpoints intact and loadable. The last `keep` are kept.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata

from model.checkpoint import CheckpointError, save_checkpoint
from model.lora import lora_layers, save_adapter

from . import distributed as dist

STEP_RE = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state"


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    ckpts = [p for p in list_checkpoints(run_dir) if (p / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None


def save(run_dir: Path | str, step: int, model, tokenizer, optimizer, scheduler, state: dict, d: dist.Dist,
         keep: int = 2, extras: dict | None = None) -> Path | None:
    """Collective (every rank calls it): each rank writes its shards of train_state/, rank 0 the rest. Returns
    the checkpoint directory on rank 0.

    optimizer and scheduler may be None (a loop that starts a fresh optimizer for each phase); `extras` names
    other models saved beside the policy, {"recommender": (model, tokenizer)} -> step_N/recommender/."""
    root = Path(run_dir) / "checkpoints"
    tmp = None
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".step_{step}.tmp-", dir=root)
    tmp = Path(dist.all_gather_objects(tmp, d)[0])  # rank 0's
    out = root / f"step_{step}"
    try:
        groups = save_train_state(tmp / TRAIN_STATE, model, optimizer, d)
        model_sd = dist.full_state_dict(model)
        extra_sd = {name: dist.full_state_dict(m) for name, (m, _) in (extras or {}).items()}
        if d.is_main:
            base = model.module if hasattr(model, "module") else model
            if lora_layers(base):  # the adapter alone: the base weights did not change
                save_adapter(base, tmp / "adapter", state.get("config", {}).get("model"), state_dict=model_sd)
            else:
                save_checkpoint(tmp / "model", base.config, model_sd, tokenizer)
            for name, (m, tok) in (extras or {}).items():
                save_checkpoint(tmp / name, (m.module if hasattr(m, "module") else m).config, extra_sd[name], tok)
            full_state = {**state, "step": step}
            if scheduler is not None:
                full_state["scheduler"] = scheduler.state_dict()
            if groups is not None:
                full_state["optimizer_param_groups"] = groups
            (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=2, sort_keys=True, default=str))
            if out.exists():  # a re-run of the same step: replace it
                shutil.rmtree(out)
            os.replace(tmp, out)
    except BaseException:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if d.is_main:
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step_*.tmp-*"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
    if d.enabled:
        torch.distributed.barrier()
    return out if d.is_main else None


def rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_train_state(path: Path, model, optimizer, d: dist.Dist) -> list[dict] | None:
    """Collective: write the optimizer's tensors (each rank its shards) and each rank's RNG into the DCP directory
    `path`. Returns the optimizer's param groups (hyper-parameters and parameter names: plain values, kept in
    trainer_state.json, so that train_state/ holds tensors alone), or None without an optimizer."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = {"rng": {f"rank{d.rank}": rng_state()}}
    groups = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        sd["optimizer"] = osd["state"]
        groups = [_plain(g, f"optimizer param group {i}") for i, g in enumerate(osd["param_groups"])]
    with _one_process_quiet():
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), no_dist=not torch.distributed.is_initialized())
    return groups


@contextmanager
def _one_process_quiet():
    """Without a process group DCP warns, at every save and load, that it assumes one process: it is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _plain(group: dict, what: str) -> dict:
    """A param group as JSON keeps it (numbers, strings, booleans, None and lists of them), or an error."""
    def ok(v):
        return v is None or isinstance(v, (bool, int, float, str)) or \
            (isinstance(v, (list, tuple)) and all(ok(x) for x in v))

    odd = [k for k, v in group.items() if not ok(v)]
    if odd:
        raise TypeError(f"{what}: {', '.join(odd)} cannot be written to trainer_state.json")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}


def load_training_state(ckpt: Path, model, optimizer, scheduler, d: dist.Dist) -> dict:
    """Restore optimizer, scheduler (each when given) and this rank's RNG (the weights were loaded from
    `ckpt/model` or `ckpt/adapter` when the model was built). Collective: each rank reads its own shards of
    train_state/. Returns trainer_state.json."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if not (ckpt / TRAIN_STATE).exists() and (ckpt / "optimizer.pt").exists():
        _load_before_dcp(ckpt, model, optimizer, d)
    else:
        load_train_state(ckpt / TRAIN_STATE, model, optimizer, state.get("optimizer_param_groups"), d)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def load_train_state(path: Path, model, optimizer, groups: list[dict] | None, d: dist.Dist):
    """Read this rank's shards of the optimizer's tensors and its RNG (when saved: a run on more ranks than the
    one saved keeps the new ranks' own) from the DCP directory `path`; `groups`: the saved param groups."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    reader = Reader(path)
    saved = set(reader.read_metadata().state_dict_metadata)  # flattened names: rng.rank0.torch, ...
    me = f"rank{d.rank}"
    sd = {"rng": {me: {k: v for k, v in rng_state().items() if f"rng.{me}.{k}" in saved}}}
    osd = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)  # its structure, filled in place (a first step made it)
        ours = [g["params"] for g in osd["param_groups"]]
        if groups is None or [g["params"] for g in groups] != ours:
            raise CheckpointError(f"{path}: the saved optimizer is not over this run's trainable parameters "
                                  f"(saved groups: {None if groups is None else [len(g['params']) for g in groups]}"
                                  f" parameters, this run: {[len(p) for p in ours]})")
        sd["optimizer"] = osd["state"]
    with _one_process_quiet():
        dcp.load(sd, storage_reader=reader, planner=TensorsOnly(), no_dist=not torch.distributed.is_initialized())
    if osd is not None:
        osd["param_groups"] = [{k: tuple(v) if isinstance(ours_g.get(k), tuple) else v for k, v in g.items()}
                               for g, ours_g in zip(groups, osd["param_groups"])]
        set_optimizer_state_dict(model, optimizer, osd)
    rng = sd["rng"][me]
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def _load_before_dcp(ckpt: Path, model, optimizer, d: dist.Dist):
    """A checkpoint written before train_state/: the whole optimizer in optimizer.pt, every rank's RNG in rng.pt,
    each read whole by every rank (tensors only: weights_only)."""
    if optimizer is not None:
        optim_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        dist.load_full_optim_state_dict(model, optimizer, optim_sd)
    mine = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True).get(f"rank{d.rank}")
    if mine is not None:
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])


class TensorsOnly(dcp.DefaultLoadPlanner):
    """DCP's load planner, refusing entries that are not tensors (DCP would unpickle them with torch.load)."""

    def load_bytes(self, read_item, value):
        raise CheckpointError(f"train_state: entry {read_item.dest_index.fqn!r} is not a tensor; refusing to "
                              "unpickle it")


class Reader(dcp.FileSystemReader):
    """DCP's file reader, whose metadata file (a pickle) is first read by an unpickler that admits only DCP's
    metadata classes and the torch types they hold; then by DCP as usual. A checkpoint cannot run code."""

    def __init__(self, path):
        super().__init__(path)
        self.dir = Path(path)

    def read_metadata(self, *args, **kwargs):
        file = self.dir / ".metadata"
        try:
            with open(file, "rb") as f:
                _MetadataUnpickler(f).load()
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read DCP metadata ({e})") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{file}: not DCP metadata ({e})") from None
        return super().read_metadata(*args, **kwargs)


class _MetadataUnpickler(pickle.Unpickler):
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module, name):  # nothing is imported before it is admitted
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch.distributed.checkpoint.metadata" and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")
