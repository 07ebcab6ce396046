"""Model configuration read from a Hugging Face `config.json`.

One dataclass covers the decoder families we train: Llama (incl. Llama 3.x rope scaling, SmolLM2), Qwen2/2.5
(bias on q/k/v) and Qwen3 (RMSNorm on q and k per head, head_dim independent of the hidden size).
Anything we do not implement is refused with an error naming the key, never silently ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED = ("llama", "qwen2", "qwen3")


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None or {"rope_type": "llama3"|"linear", ...}
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (Qwen2 always, Llama if attention_bias)
    o_bias: bool  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the config.json as read, written back on save

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ConfigError(f"{source}: unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}")

        def need(key):
            if key not in d or d[key] is None:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return d[key]

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act {act!r} (only 'silu')")
        if d.get("use_sliding_window") or (mt == "llama" and d.get("sliding_window")):
            raise ConfigError(f"{source}: sliding-window attention is not supported (use_sliding_window)")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{source}: unsupported layer_types {sorted(set(layer_types))} (only full_attention)")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp != 1 is not supported")

        n_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = d.get("head_dim") or hidden // n_heads
        n_kv = d.get("num_key_value_heads") or n_heads
        if n_heads % n_kv:
            raise ConfigError(f"{source}: num_attention_heads {n_heads} not divisible by num_key_value_heads {n_kv}")

        # RoPE: older configs have rope_theta + rope_scaling; newer (transformers >= 4.5x/5) have rope_parameters.
        rp = d.get("rope_parameters") or {}
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or None
        if rp and rp.get("rope_type", "default") != "default":
            scaling = dict(rp)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind == "llama3":
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if k not in scaling:
                        raise ConfigError(f"{source}: rope_scaling of type llama3 lacks {k!r}")
                scaling = {**scaling, "rope_type": "llama3"}
            elif kind == "linear":
                scaling = {**scaling, "rope_type": "linear"}
            else:
                raise ConfigError(f"{source}: unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")

        attn_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attn_bias,
            o_bias=False if mt == "qwen2" else attn_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
            qk_norm=mt == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            raw=dict(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """The HF config to save: the original keys, with the fields we own kept consistent."""
        d = dict(self.raw)
        d.update(model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
                 tie_word_embeddings=self.tie_word_embeddings)
        d.setdefault("architectures", [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                        "qwen3": "Qwen3ForCausalLM"}[self.model_type]])
        return d
