"""Import a Llama-family GGUF file (llama.cpp's format) as a Hugging Face model directory.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2")

writes config.json, model.safetensors (float32), generation_config.json and the tokenizer files (with the chat
template) such that both `transformers.AutoModelForCausalLM.from_pretrained(out)` and our own loader read it.

What the GGUF format does differently from an HF checkpoint (gguf-py / llama.cpp convert_hf_to_gguf.py):
- tensor names: `blk.{i}.attn_q.weight` instead of `model.layers.{i}.self_attn.q_proj.weight` (see GGUF_TO_HF);
- dims are listed fastest-first (ggml's ne[0] is the row length), so an HF (out, in) weight has GGUF shape
  [in, out]; the reader already hands us the bytes in C order, we only reverse the listed shape;
- tensors may be block-quantized (Q4_0, Q4_1, Q8_0, K-quants, ...): gguf.quants.dequantize turns them into float32;
- the rows of the q and k projections are permuted (see unpermute_qk);
- Llama 3's rope scaling is stored as a tensor of per-frequency divisors, `rope_freqs.weight` (see _llama3_rope).
Conversion goes tensor by tensor straight into the safetensors file, so at most one tensor is dequantized at a time.
"""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# GGUF name (the part after `blk.{i}.`) -> HF module path inside `model.layers.{i}.`
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# tensors outside the blocks
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; unknown names raise KeyError."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise KeyError(name)
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{LAYER_TENSORS[parts[2]]}.{kind}"
    if len(parts) == 1 and stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{kind}"
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------------------------
# Q/K row permutation.
#
# HF Llama applies RoPE with rotate_half: inside each head of size D = 2h, output row j (j < h) is rotated together
# with row j + h. llama.cpp's kernel (the original Meta layout) rotates adjacent pairs (2j, 2j + 1) instead. So
# llama.cpp's convert_hf_to_gguf.py reorders the rows of W_q and W_k, head by head, to put the HF row pair
# (j, j + h) at positions (2j, 2j + 1):
#     gguf_row(head, 2j + i) = hf_row(head, i*h + j)      for i in {0, 1}, j < h.
# In array terms the HF rows of one head are indexed [i, j] (shape (2, h)) and the GGUF rows [j, i] (shape (h, 2)):
# reshape to (n_head, 2, h, ...), swap axes 1 and 2, flatten back (permute_qk below).
# The inverse reads the GGUF rows as [j, i], i.e. reshape to (n_head, h, 2, ...), swaps the same two axes back to
# [i, j] and flattens (unpermute_qk). k uses n_head = number of KV heads, since W_k has n_kv_head * D rows.
# The same reordering applies to a bias vector (the trailing `...` is then empty).
# ---------------------------------------------------------------------------------------------------------------
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate_half) row order -> GGUF (interleaved pairs) row order. w: (n_head * D, ...) or (n_head * D,)."""
    h = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, h, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF (interleaved pairs) row order -> HF (rotate_half) row order; the inverse of permute_qk."""
    h = w.shape[0] // n_head // 2
    return w.reshape(n_head, h, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# metadata -> config.json
# ---------------------------------------------------------------------------------------------------------------
def _field(reader, key, default=KeyError, path=None):
    """The value of a GGUF metadata key (scalar, string or list); `default` when absent, error if no default."""
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise ValueError(f"{path}: GGUF metadata key '{key}' is missing")
        return default
    return f.contents()


def _llama3_factors(inv_freq, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Llama 3.1 rope scaling as published by Meta (llama-models, apply_scaling): the divisor of each frequency.
    High frequencies (wavelength < old_len / high_ff) are kept, low ones (wavelength > old_len / low_ff) are divided
    by `factor`, and in between the divisor blends smoothly: 1 / ((1 - s) / factor + s)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context_len / high_freq_factor, 1.0,
                    np.where(wavelen > old_context_len / low_freq_factor, factor, mid))


def _llama3_rope(rope_freqs: np.ndarray, theta: float, head_dim: int, original_len: int, path) -> dict:
    """Recover HF's llama3 `rope_parameters` from llama.cpp's `rope_freqs` tensor (one divisor per frequency).
    The GGUF keeps only the divisors; we find the published Llama 3.x settings (low 1, high 4) that reproduce them."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (head_dim / 2,)
    factor = float(rope_freqs.max())
    params = dict(rope_type="llama3", rope_theta=theta, factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=original_len)
    want = _llama3_factors(inv_freq, factor, 1.0, 4.0, original_len)
    if rope_freqs.shape != want.shape or not np.allclose(rope_freqs, want, rtol=1e-4, atol=0):
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' does not match Llama 3 rope scaling "
                         f"(factor {factor}, low 1, high 4, original length {original_len}); not supported")
    return params


def gguf_config(reader, path) -> dict:
    """The HF LlamaConfig dict for a llama-architecture GGUF (keys documented in ggml's docs/gguf.md)."""
    arch = _field(reader, "general.architecture", path=path)
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture '{arch}' is not supported (only 'llama' is)")
    a = lambda key, default=KeyError: _field(reader, f"llama.{key}", default, path)  # noqa: E731
    n_head = a("attention.head_count")
    n_kv = a("attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_kv, list):
        raise ValueError(f"{path}: per-layer head counts are not supported")
    hidden = a("embedding_length")
    head_dim = a("attention.key_length", hidden // n_head)
    if a("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path}: llama.attention.value_length differs from key_length; not supported")
    if a("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count {a('rope.dimension_count')} != head_dim {head_dim} "
                         f"(partial rotary embeddings are not supported)")
    if a("expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts llama GGUF files are not supported")
    names = {t.name for t in reader.tensors}
    theta = float(a("rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    scaling = a("rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(a("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type '{scaling}' is not supported")
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        original = int(a("rope.scaling.original_context_length", 8192))
        rope = _llama3_rope(_dequantize(t, path), theta, head_dim, original, path)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    bos = _field(reader, "tokenizer.ggml.bos_token_id", None)
    eos = _field(reader, "tokenizer.ggml.eos_token_id", None)
    pad = _field(reader, "tokenizer.ggml.padding_token_id", None)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(embd.shape[1]),  # GGUF shape [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": a("context_length"),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "rope_theta": theta,  # older transformers read rope_theta / rope_scaling, newer ones rope_parameters
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": "float32",
    }
    return cfg


def _expected_shapes(cfg) -> dict:
    """HF name -> shape of every tensor the config implies (lm_head only when untied)."""
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f),
                       p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
        if cfg["attention_bias"]:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (d,)})
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------------------------
def _dequantize(t, path) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (C) order: the reversed GGUF shape."""
    from gguf.quants import dequantize
    try:
        x = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, "
                         f"which the gguf package cannot dequantize") from None
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    return np.asarray(x, dtype=np.float32).reshape(shape)


def _write_safetensors(path: Path, entries: list):
    """Stream tensors into a safetensors file, one at a time.
    entries: [(name, shape, make)] where make() returns the float32 array of that shape.
    Format (github.com/huggingface/safetensors): 8-byte little-endian header length N, an N-byte JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with spaces to a multiple
    of 8, then the raw little-endian tensor bytes at those offsets (relative to the end of the header)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in entries:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for name, shape, make in entries:
            x = np.ascontiguousarray(make(), dtype="<f4")
            assert x.shape == tuple(shape), (name, x.shape, shape)
            fh.write(memoryview(x).cast("B"))


def _tensor_entries(reader, cfg, path) -> list:
    """[(hf_name, shape, make)] for every weight, checked against the config before any data is read."""
    want = _expected_shapes(cfg)
    entries = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # folded into config.rope_parameters
            continue
        try:
            name = gguf_to_hf_name(t.name)
        except KeyError:
            raise ValueError(f"{path}: unexpected tensor '{t.name}' for a llama model") from None
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if name not in want:
            raise ValueError(f"{path}: unexpected tensor '{t.name}' for this config")
        if shape != want[name]:
            raise ValueError(f"{path}: tensor '{t.name}' has shape {shape}, expected {want[name]}")
        n_head = {".attn_q.": cfg["num_attention_heads"], ".attn_k.": cfg["num_key_value_heads"]}
        heads = next((n for key, n in n_head.items() if key in t.name), None)

        def make(t=t, heads=heads):
            x = _dequantize(t, path)
            return x if heads is None else unpermute_qk(x, heads)
        entries.append((name, shape, make))
    missing = sorted(set(want) - {e[0] for e in entries})
    if missing:
        raise ValueError(f"{path}: missing tensors for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    return entries


# ---------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------
def _save_tokenizer(reader, gguf_path: Path, out: Path):
    """Tokenizer, special tokens and chat template from the GGUF metadata, through transformers' own converter."""
    from transformers import AutoTokenizer
    if "tokenizer.ggml.model" not in reader.fields:
        raise ValueError(f"{gguf_path}: the GGUF file has no tokenizer (tokenizer.ggml.* metadata)")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for attr in ("bos", "eos"):  # the GGUF's own special tokens win (SmolLM2-Instruct's eos is <|im_end|>)
        i = _field(reader, f"tokenizer.ggml.{attr}_token_id", None)
        token = None if i is None else reader.fields["tokenizer.ggml.tokens"].contents(i)
        if token is not None and getattr(tok, f"{attr}_token") != token:
            setattr(tok, f"{attr}_token", token)
    template = _field(reader, "tokenizer.chat_template", None)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(out))


def convert_gguf(gguf_path, out_dir) -> Path:
    """Convert a llama-architecture GGUF file into an HF model directory at out_dir (which must not exist).
    Written into a temporary directory beside out_dir and renamed at the end, so out_dir is complete or absent."""
    from gguf import GGUFReader
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    if out.exists():
        raise FileExistsError(f"{out}: output directory already exists")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # the reader raises bare ValueError/KeyError/struct errors on bad files
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    cfg = gguf_config(reader, gguf_path)
    entries = _tensor_entries(reader, cfg, gguf_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_safetensors(tmp / "model.safetensors", entries)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _save_tokenizer(reader, gguf_path, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it the permissions of a normal directory
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
