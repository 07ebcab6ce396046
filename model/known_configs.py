"""The config.json of the models our presets name, kept here so that their shapes are known offline (memory plans,
checks with random weights of the same shapes) where no hub can be reached.

    model_config("Qwen/Qwen3-8B")          # a known name (or an alias: qwen3-8b), a model directory, or a config.json
    known_config("qwen3-0.6b")             # the dict, or None for a name we do not know
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ModelConfig

_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
          "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
          "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
          "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "torch_dtype": "bfloat16",
          "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}

KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 36,
                      "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
                      "tie_word_embeddings": False},
    "Qwen/Qwen3-0.6B": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "max_window_layers": 28,
                        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
                        "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192,
        "mlp_bias": False, "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pad_token_id": 2, "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152},
}
# the base Llama 3.1 differs from the instruct model in its EOS only
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"] = {**KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"], "eos_token_id": 128001}

ALIASES = {"qwen3-8b": "Qwen/Qwen3-8B", "qwen3-0.6b": "Qwen/Qwen3-0.6B",
           "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
           "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "default": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def known_config(name: str) -> dict | None:
    """The config.json dict of a known model name or alias (case-insensitive), else None."""
    key = ALIASES.get(str(name).lower(), str(name))
    by_lower = {k.lower(): v for k, v in KNOWN_CONFIGS.items()}
    found = by_lower.get(key.lower())
    return None if found is None else json.loads(json.dumps(found))  # a copy the caller may change


def model_config(source) -> ModelConfig:
    """The ModelConfig of a known name or alias, a model directory (its config.json) or a config.json file."""
    cfg = known_config(source)
    if cfg is not None:
        return ModelConfig.from_dict(cfg, source=str(source))
    p = Path(str(source)).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return ModelConfig.from_file(p)
    known = ", ".join(list(KNOWN_CONFIGS) + sorted(ALIASES))
    raise FileNotFoundError(f"{source}: not a known model ({known}), a model directory or a config.json")
