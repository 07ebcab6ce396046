"""Our own transformer, its checkpoints and tokenizer.

    from model import load_model, load_tokenizer, save_model
    model = load_model("smollm2-135m-instruct")     # or a directory, a .gguf file, a Hugging Face repo id
    tok = load_tokenizer("smollm2-135m-instruct")
    logits = model(input_ids)                       # (B, T, vocab)
    save_model(model, tok, "out/dir")               # loadable by transformers and by load_model
    model = load_model("base", adapter="out/adapter")  # the base with a LoRA adapter (model/lora.py)
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import build_model, load_weights, save_checkpoint
from .config import ModelConfig
from .freeze import freeze_all_but_top
from .kv_cache import KVCache
from .lora import add_lora, load_adapter, lora_enabled, merge_lora, save_adapter
from .tokenizer import Tokenizer
from .transformer import Transformer

__all__ = ["load_model", "load_tokenizer", "save_model", "resolve_model", "Transformer", "ModelConfig",
           "KVCache", "Tokenizer", "default_dtype", "add_lora", "lora_enabled", "merge_lora", "save_adapter",
           "load_adapter", "freeze_all_but_top", "is_sharded"]


def resolve_model(name_or_path) -> Path:
    """A model name, directory, .gguf file or repo id -> a local HF-format directory (see model/hub.py)."""
    from .hub import resolve_model as _resolve

    return Path(_resolve(name_or_path))


def default_dtype(device) -> torch.dtype:
    """float32 on CPU (bf16 matmul is ~300x slower on our CPUs), bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def is_sharded(model) -> bool:
    """Whether the model's weights are split over ranks (FSDP): each forward is then a collective that every rank
    must run, whereas a full copy on each rank computes alone and needs no agreement with the others."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def load_model(name_or_path, dtype: torch.dtype | None = None, device=None, adapter=None) -> Transformer:
    """Build the model of a checkpoint on the meta device and fill it tensor by tensor; returned in eval mode.

    adapter: a LoRA adapter directory (PEFT's layout, see model/lora.py) to apply: the base weights are then
    frozen and the adapter's A and B are the only trainable parameters."""
    device = torch.device(device or "cpu")
    dtype = dtype or default_dtype(device)
    path = resolve_model(name_or_path)
    cfg = ModelConfig.from_file(path / "config.json")
    model = load_weights(build_model(cfg), path, dtype, device)
    model.source = str(path)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval()


def load_tokenizer(name_or_path) -> Tokenizer:
    return Tokenizer.from_dir(resolve_model(name_or_path))


def save_model(model: Transformer, tokenizer: Tokenizer | None, out_dir, state_dict=None,
               max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write an HF model directory (atomically). Pass `state_dict` when the model is sharded (FSDP full state)."""
    sd = state_dict if state_dict is not None else model.state_dict()
    return save_checkpoint(out_dir, model.config, sd, tokenizer, max_shard_bytes=max_shard_bytes)
