"""Checkpoint I/O in the Hugging Face layout: config.json + (sharded) safetensors + tokenizer + generation config.

Loading builds the module on the meta device and assigns each tensor as it is read, so peak memory stays near
one copy of the weights. Saving writes into a temporary directory beside the target and renames it at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .transformer import Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(RuntimeError):
    pass


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: missing shard file(s): {', '.join(missing)}")
        return files
    if (path / SINGLE).exists():
        return [path / SINGLE]
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} found")


def build_model(cfg: ModelConfig, device="meta") -> Transformer:
    with torch.device(device):
        return Transformer(cfg)


def checkpoint_tensors(path: Path, shapes: dict[str, torch.Size], config: ModelConfig):
    """The tensors of the checkpoint at `path` that a model with these parameters takes (name -> shape; a tied head
    appears once, as model.embed_tokens.weight): yields (name, file, handle) with the file open, so the caller
    reads `handle.get_tensor(name)` or some rows, `handle.get_slice(name)[a:b]`. Names and shapes are checked
    before anything is read; a tensor the model lacks raises at once, one the checkpoint lacks after the last
    file, each a CheckpointError naming the file."""
    tied = config.tie_word_embeddings
    seen: set[str] = set()
    for file in weight_files(path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # truncated or corrupt header
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
        with handle as f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue  # some exporters store the tied head anyway; the embedding is authoritative
                if name not in shapes:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} for a {config.model_type} model")
                try:
                    shape = tuple(f.get_slice(name).get_shape())
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
                if shape != tuple(shapes[name]):
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {shape}, "
                                          f"expected {tuple(shapes[name])} from config.json")
                yield name, file, f
                seen.add(name)
    missing = sorted(set(shapes) - seen)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks tensor(s): {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))


def read_tensor(file: Path, name: str, read):
    """`read()` (a tensor read from an open safetensors file), its failure a CheckpointError naming the file."""
    try:
        return read()
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None


def load_weights(model: Transformer, path: Path, dtype: torch.dtype, device) -> Transformer:
    """Fill a meta-device model from the checkpoint at `path`, tensor by tensor, checking names and shapes."""
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for name, file, f in checkpoint_tensors(path, shapes, model.config):
        t = read_tensor(file, name, lambda: f.get_tensor(name))
        _assign(model, name, t.to(device=device, dtype=dtype))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    return model


def _assign(model: nn.Module, name: str, tensor: torch.Tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[attr] = nn.Parameter(tensor, requires_grad=mod._parameters[attr].requires_grad)


def _fsync_write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(out_dir: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                    tokenizer=None, max_shard_bytes: int = 2 * 1024**3, extra_files: dict | None = None):
    """Write an HF model directory atomically: a sibling temp dir, then rename over `out_dir`."""
    adapters = [k for k in state_dict if ".lora_A." in k or ".lora_B." in k]
    if adapters:  # neither transformers nor load_weights would accept them in a model directory
        raise CheckpointError(f"the state dict holds LoRA adapter tensors ({adapters[0]}, ...): write them with "
                              "model.lora.save_adapter, or merge_lora(model) before saving the model")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        dtype = next(iter(sd.values())).dtype
        _write_shards(tmp, sd, max_shard_bytes)
        cfg = config.to_dict()
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
        _fsync_write_json(tmp / "config.json", cfg)
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        _fsync_write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, obj in (extra_files or {}).items():
            _fsync_write_json(tmp / name, obj)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_shards(tmp: Path, sd: dict[str, torch.Tensor], max_shard_bytes: int):
    shards, cur, size = [], {}, 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata=meta)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    _fsync_write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _replace_dir(tmp: Path, out_dir: Path):
    """Rename tmp to out_dir; an existing out_dir is moved aside first and deleted only after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
