"""Run checkpoints: `run_dir/checkpoints/step_N/` = an HF model directory (`model/`, loadable by transformers and
by our loader) or, for a LoRA policy, the adapter in PEFT's layout (`adapter/`: adapter_model.safetensors +
adapter_config.json, on the base model named in it) + `optimizer.pt` + `trainer_state.json` (step, data
position, scheduler, config) + RNG states.

A checkpoint is written into a hidden temporary directory and renamed to `step_N` only when complete, so a run
killed mid-write leaves the previous checkpoints intact and loadable. The last `keep` are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.lora import lora_layers, save_adapter

from . import distributed as dist

STEP_RE = re.compile(r"^step_(\d+)$")


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
    """Collective (every rank calls it); rank 0 writes. Returns the checkpoint directory on rank 0.

    optimizer and scheduler may be None (a loop that starts a fresh optimizer for each phase); `extras` names
    other models saved beside the policy, {"recommender": (model, tokenizer)} -> step_N/recommender/."""
    model_sd = dist.full_state_dict(model)
    optim_sd = dist.full_optim_state_dict(model, optimizer) if optimizer is not None else None
    extra_sd = {name: dist.full_state_dict(m) for name, (m, _) in (extras or {}).items()}
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = dist.all_gather_objects(rng, d)
    out = None
    if d.is_main:
        root = Path(run_dir) / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        out = root / f"step_{step}"
        tmp = Path(tempfile.mkdtemp(prefix=f".step_{step}.tmp-", dir=root))
        try:
            base = model.module if hasattr(model, "module") else model
            if lora_layers(base):  # the adapter alone: the base weights did not change
                save_adapter(base, tmp / "adapter", state.get("config", {}).get("model"), state_dict=model_sd)
            else:
                save_checkpoint(tmp / "model", base.config, model_sd, tokenizer)
            for name, (m, tok) in (extras or {}).items():
                save_checkpoint(tmp / name, (m.module if hasattr(m, "module") else m).config, extra_sd[name], tok)
            if optim_sd is not None:
                torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save({f"rank{r}": s for r, s in enumerate(rngs)}, tmp / "rng.pt")
            full_state = {**state, "step": step}
            if scheduler is not None:
                full_state["scheduler"] = scheduler.state_dict()
            (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=2, sort_keys=True, default=str))
            if out.exists():  # a re-run of the same step: replace it
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step_*.tmp-*"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
    if d.enabled:
        torch.distributed.barrier()
    return out


def load_training_state(ckpt: Path, model, optimizer, scheduler, d: dist.Dist) -> dict:
    """Restore optimizer, scheduler (each when given) and this rank's RNG (the weights were loaded from
    `ckpt/model` when the model was built). Every rank reads the files (a shared filesystem, as on one node)."""
    if optimizer is not None:
        optim_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        dist.load_full_optim_state_dict(model, optimizer, optim_sd)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rngs = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    mine = rngs.get(f"rank{d.rank}")
    if mine is not None:
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
    return state
