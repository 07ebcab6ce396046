"""LoRA: low-rank adapters on the projections of our transformer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv 2106.09685).

A frozen projection W (out, in) gets a trainable update of rank r:

    y = W x + (alpha / r) * B (A (dropout(x)))        A (r, in) Kaiming-uniform, B (out, r) zeros

so a fresh adapter leaves the model's outputs exactly as they were. Every base parameter is frozen; A and B are
the only parameters with requires_grad.

    add_lora(model, rank=16, alpha=32)               # the policy: base weights frozen, adapters trainable
    with lora_enabled(model, False):                 # the same weights without the adapters: the reference
        ref_logits = model(ids)
    save_adapter(model, "out/adapter")               # adapter_model.safetensors + adapter_config.json (PEFT)
    load_model(base, adapter="out/adapter")          # the base model with the adapter applied
    merge_lora(model)                                # W += (alpha / r) B A, plain Linear layers again (export)

Files follow PEFT's layout, so `peft.PeftModel.from_pretrained(transformers_model, dir)` loads an adapter saved
here, and one saved by PEFT (plain LoRA on these projections) loads here. Our parameter names are those of
transformers' *ForCausalLM classes, so a PEFT key is "base_model.model." + our name, e.g.
base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import CheckpointError, _replace_dir
from .linear import Linear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def _initial_pair(in_features: int, out_features: int, rank: int,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's initialisation, fp32 on the CPU: A (rank, in) as nn.Linear's default (Kaiming-uniform, a = sqrt(5))
    drawn from `generator`, B (out, rank) zeros."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a, torch.zeros(out_features, rank)


class LoRALinear(Linear):
    """A projection with a low-rank adapter: W x + b + scaling * B(A(dropout(x))), scaling = alpha / rank.

    Holds the base layer's own `weight` and `bias` Parameters (same names, so the base checkpoint keys do not
    change) plus `lora_A` (rank, in) and `lora_B` (out, rank), themselves `Linear`s: in a CPU decode step they
    take the same batch-independent path as the base product. `enabled = False` gives the base layer's output.
    """

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # initialised on the CPU, then moved beside the base weight (on the meta device their values are gone:
        # `initial_adapter_weights` draws them again)
        a, b = _initial_pair(base.in_features, base.out_features, rank, generator)
        self.lora_A = Linear(base.in_features, rank, bias=False, device="meta")  # weight (r, in)
        self.lora_B = Linear(rank, base.out_features, bias=False, device="meta")  # weight (out, r)
        self.lora_A.weight = nn.Parameter(a.to(self.weight.device, self.weight.dtype))
        self.lora_B.weight = nn.Parameter(b.to(self.weight.device, self.weight.dtype))
        self.enabled = True

    def forward(self, x):  # x (..., in) -> (..., out)
        y = super().forward(x)  # the base projection, with Linear's decode path
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32: (out, r) @ (r, in) -> (out, in)."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters (call add_lora or load_model(..., adapter=DIR))")
    return layers


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=PROJECTIONS,
             seed: int = 0) -> nn.Module:
    """Wrap the `targets` projections of every block in LoRALinear and freeze every other parameter.

    rank r >= 1; the update is scaled by alpha / r. dropout applies to the adapter's input only (in train mode).
    A is drawn from a generator seeded with `seed`, layer after layer, so every process (every FSDP rank) builds
    the same adapters. Adapters take the dtype and device of the weight they adapt. Returns the model.
    """
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be among {', '.join(PROJECTIONS)} (got {list(targets)})")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if attr in targets and isinstance(module, Linear) and parent_name:
            setattr(model.get_submodule(parent_name), attr, LoRALinear(module, rank, alpha, dropout, gen))
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets)}
    return model


@contextmanager
def lora_enabled(model: nn.Module, enabled: bool = True):
    """Switch every adapter on or off for the duration, e.g. the RL reference = the policy's base weights:

        with torch.no_grad(), lora_enabled(policy, False):
            ref_logits = policy(ids)

    The previous state of each adapter is restored on exit."""
    layers = _require_lora(model).values()
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = enabled
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.enabled = state


class AdaptersOff:
    """A view of a model with LoRA adapters that runs it with every adapter switched off: the frozen base model,
    without a second copy of its weights (the reference of RL with a LoRA policy). Calls run under
    lora_enabled(model, False); every attribute (config, new_cache, parameters, ...) is the model's own."""

    def __init__(self, model: nn.Module):
        _require_lora(model)
        self.model = model

    def __call__(self, *args, **kwargs):
        with lora_enabled(self.model, False):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its weight (W += scaling * B @ A, summed in fp32) and put the plain Linear back.
    Adapters are merged whether switched on or off.

    In place: the base weights change, so merge a copy (or a model from load_model(base, adapter=DIR)) when the
    base is still needed, e.g. as a reference. The result saves with save_model like any model."""
    for name, m in _require_lora(model).items():
        m.weight.copy_((m.weight.float() + m.delta_weight()).to(m.weight.dtype))
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
    del model.lora_config
    return model


# ---- files in PEFT's layout -------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names, on the CPU. Pass `state_dict` when the model is sharded (the FSDP
    full state dict); by default model.state_dict()."""
    sd = state_dict if state_dict is not None else model.state_dict()
    return {PEFT_PREFIX + k.removeprefix("_orig_mod."): v.detach().to("cpu").contiguous() for k, v in sd.items()
            if k.endswith((".lora_A.weight", ".lora_B.weight"))}  # (no "_orig_mod." of torch.compile)


def adapter_config(model: nn.Module, base_model_name: str | None = None) -> dict:
    """PEFT's LoraConfig fields for this model's adapters (the ones we use; PEFT fills in the rest)."""
    _require_lora(model)
    base = base_model_name if base_model_name is not None else getattr(model, "source", None)
    return {**model.lora_config, "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_adapter(model: nn.Module, out_dir, base_model_name: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json into `out_dir` (atomically: a sibling temp dir,
    then a rename). base_model_name defaults to the directory the model was loaded from. Pass `state_dict`
    when the model is sharded (the FSDP full state dict, on the rank that writes)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model, state_dict)
    config = adapter_config(model, base_model_name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# LoraConfig options that change the computation, with the only value we implement (absent = that value)
_PLAIN_LORA = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
               "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
               "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}


def _is_plain(value, plain) -> bool:
    return value is None or value == plain or (isinstance(value, (dict, list)) and not value)


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json, checked to describe a plain LoRA on our projections."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read adapter config ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r}, only 'LORA' is supported")
    odd = [f"{k}={cfg[k]!r}" for k, plain in _PLAIN_LORA.items() if not _is_plain(cfg.get(k), plain)]
    if odd:
        raise CheckpointError(f"{path}: unsupported LoRA option(s) {', '.join(odd)}")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not set(targets) <= set(PROJECTIONS):
        raise CheckpointError(f"{path}: target_modules {targets!r} must be a list among {', '.join(PROJECTIONS)}")
    return cfg


def add_lora_as(model: nn.Module, adapter_dir) -> nn.Module:
    """Add adapters of the rank, alpha, dropout and targets that `adapter_dir` (PEFT's layout) describes, not
    yet its weights (see `adapter_weights`). Returns the model."""
    cfg = read_adapter_config(adapter_dir)
    add_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout") or 0.0, cfg["target_modules"])
    model.adapter = str(adapter_dir)
    return model


def adapter_weights(model: nn.Module, adapter_dir) -> dict[str, torch.Tensor]:
    """The adapter tensors of `adapter_dir` on the CPU under the model's parameter names, checked against the
    model's adapters (names and shapes); the model's may be on the meta device."""
    params = {PEFT_PREFIX + k: p for k, p in model.named_parameters() if ".lora_" in k}
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
    out = {}
    with handle as f:
        names = set(f.keys())
        if names != set(params):
            extra, missing = sorted(names - set(params)), sorted(set(params) - names)
            raise CheckpointError(f"{file}: adapter tensors do not match the model "
                                  f"(unexpected: {extra[:4]}, missing: {missing[:4]})")
        for name in sorted(names):
            t, p = f.get_tensor(name), params[name]
            if t.shape != p.shape:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            out[name.removeprefix(PEFT_PREFIX)] = t
    return out


def initial_adapter_weights(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The values `add_lora(model, ..., seed=seed)` gave the model's adapters, drawn again in the same order, on
    the CPU under the model's parameter names: for adapters added on the meta device (a model sharded before its
    weights are read), whose values are gone."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in lora_layers(model).items():
        a, b = _initial_pair(m.in_features, m.out_features, m.rank, gen)
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
    return out


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Add the adapters described by `adapter_dir` (PEFT's layout) to a model without any, and load their
    weights, checking names and shapes. Returns the model (base frozen, adapters trainable)."""
    add_lora_as(model, adapter_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in adapter_weights(model, adapter_dir).items():
            params[name].copy_(t)
    return model
