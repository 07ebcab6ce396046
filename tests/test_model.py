"""Our transformer against transformers' implementation, checkpoint round trips and loader errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from model import load_model, load_tokenizer, save_model
from model.checkpoint import CheckpointError
from model.config import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"

# tiny configs, one per family, each with grouped-query attention (4 query heads over 2 KV heads)
COMMON = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    # Llama 3.x: llama3 rope scaling, untied embeddings, a short original context so the scaling bites
    "llama3": lambda: LlamaConfig(vocab_size=512, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **COMMON),
    # Qwen2: biases on q/k/v, an embedding table larger than the tokenizer's vocabulary
    "qwen2": lambda: Qwen2Config(vocab_size=520, tie_word_embeddings=True, **COMMON),
    # Qwen3: q/k RMSNorm, head_dim (an odd 10) independent of hidden_size / heads
    "qwen3": lambda: Qwen3Config(vocab_size=512, head_dim=10, tie_word_embeddings=False, **COMMON),
}


def make_checkpoint(cfg, path: Path, seed=0):
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms and biases too, so a missed one shows
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    ref.save_pretrained(path)
    load_tokenizer(STORIES).save(path)
    return ref


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(FAMILIES[request.param](), path)
    return request.param, path, ref


def left_padded_batch(vocab=500, lens=(13, 7, 10), seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    ids = torch.randint(3, vocab, (len(lens), T), generator=g)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1
        ids[b, : T - n] = 0
    return ids, mask


def test_logits_match_transformers(family):
    name, path, ref = family
    ours = load_model(path)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full_ours, full_ref = ours(ids), ref(ids).logits
        pad_ours = ours(ids, attention_mask=mask)
        pad_ref = ref(ids, attention_mask=mask).logits
    assert full_ours.shape == (3, 13, ours.config.vocab_size)
    assert (full_ours - full_ref).abs().max() <= 1e-4
    real = mask.bool()  # padding positions carry no meaning in either implementation
    assert (pad_ours[real] - pad_ref[real]).abs().max() <= 1e-4
    assert torch.isfinite(pad_ours).all()  # fully padded query rows must not produce NaN


def test_kv_cache_decode_equals_full_forward(family):
    _, path, _ = family
    m = load_model(path)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full = m(ids, attention_mask=mask)
        cache = m.new_cache(batch=3, max_len=ids.shape[1])
        out = [m(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)]
        for t in range(6, ids.shape[1]):  # one token at a time
            out.append(m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    step = torch.cat(out, dim=1)
    real = mask.bool()
    assert (step[real] - full[real]).abs().max() <= 1e-4


def test_real_stories260k_matches_transformers():
    m = load_model(STORIES)
    tok = load_tokenizer(STORIES)
    ref = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl")])
    with torch.no_grad():
        assert (m(ids) - ref(ids).logits).abs().max() <= 1e-4
    # greedy continuation is the known TinyStories opening
    x = torch.tensor([[1]])
    with torch.no_grad():
        for _ in range(20):
            x = torch.cat([x, m(x)[:, -1:].argmax(-1)], dim=1)
    assert tok.decode(x[0]).startswith("Once upon a time, there was a little girl named Lily.")


def test_default_dtype_and_api(family):
    _, path, _ = family
    m = load_model(path)
    assert next(m.parameters()).dtype == torch.float32 and not m.training
    assert load_model(path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("shard_bytes", [2 * 1024**3, 40_000])
def test_save_load_round_trip(family, tmp_path, shard_bytes):
    _, path, ref = family
    m = load_model(path)
    out = save_model(m, load_tokenizer(path), tmp_path / "saved", max_shard_bytes=shard_bytes)
    if shard_bytes < 2 * 1024**3:
        assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    ids, _ = left_padded_batch()
    again = load_model(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b, c = m(ids), again(ids), theirs(ids).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max() <= 1e-4
    assert load_tokenizer(out).encode("hello there") == load_tokenizer(path).encode("hello there")
    assert not list(tmp_path.glob(".saved.tmp-*"))  # no temp directory left behind


def test_gradient_checkpointing_same_gradients(family):
    _, path, _ = family
    ids, mask = left_padded_batch()
    grads = []
    for ckpt in (False, True):
        m = load_model(path).train()
        m.gradient_checkpointing = ckpt
        m(ids, attention_mask=mask).float().pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- loader errors ----------------------------------------------------------------------------------------------

@pytest.fixture
def sharded(family, tmp_path):
    _, path, _ = family
    return save_model(load_model(path), None, tmp_path / "sharded", max_shard_bytes=40_000)


def test_missing_shard_is_named(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(sharded)


def test_truncated_file_is_named(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(sharded)


def test_wrong_shape_names_the_tensor(family, tmp_path):
    _, path, _ = family
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight"):
        load_model(bad)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "yarn"),
    ({"use_sliding_window": True}, "sliding"),
])
def test_unsupported_config_is_a_clear_error(tmp_path, change, match):
    cfg = json.loads((STORIES / "config.json").read_text())
    cfg.update(change)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(STORIES / "model.safetensors", d)
    with pytest.raises(ConfigError, match=match):
        load_model(d)


@pytest.mark.parametrize("rows", [1, 3, 16, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_f_linear(rows, bias):
    """Linear's decode path (oneDNN's inner product for one token per row, no grad, fp32 CPU) gives F.linear's
    values, shape and layout, with the weight as it is or packed by packed_weights (bitwise the same), and each
    row's result does not depend on the rows beside it (bitwise)."""
    from model.linear import Linear, packed_weights

    torch.manual_seed(rows)
    lin = Linear(48, 80, bias=bias)
    x = torch.randn(rows, 1, 48)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        got = lin(x)
        with packed_weights(lin):
            assert lin.packed is not None
            packed = lin(x)
            assert torch.equal(lin(x[:1]), got[:1]) and torch.equal(lin(x[-2:]), got[-2:])
    assert lin.packed is None  # dropped on leaving the block: a later update never meets a stale copy
    assert got.shape == want.shape == (rows, 1, 80) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(packed, got)
    with torch.no_grad():
        assert torch.equal(lin(x[:1]), got[:1]) and torch.equal(lin(x[-2:]), got[-2:])
    y = lin(x)  # grad enabled: the training path, differentiable
    assert y.requires_grad
    y.sum().backward()
    assert lin.weight.grad is not None


def test_packed_weights_only_where_they_apply():
    """packed_weights packs fp32 CPU Linears only, not a model that computes under autocast, and a Linear under
    autocast keeps F.linear (bf16 products) even in a decode step."""
    from model.linear import Linear, packed_weights

    torch.manual_seed(0)
    lins = torch.nn.Sequential(Linear(8, 8), Linear(8, 8).to(torch.bfloat16))
    with packed_weights(lins):
        assert lins[0].packed is not None and lins[1].packed is None
    lins.autocast_dtype = torch.bfloat16
    with packed_weights(lins):
        assert lins[0].packed is None
    x = torch.randn(4, 1, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lins[0](x).dtype == torch.bfloat16


def test_decode_step_mask_without_host_sync_equals_general_mask():
    """A decode step with a padding mask takes a shortcut (no .all() sync): the same mask as the general path."""
    from model.transformer import Transformer

    torch.manual_seed(0)
    mask = torch.rand(3, 9) > 0.4
    mask[:, -1] = False  # the new token's own slot: the shortcut must open it, as the general path does
    fast = Transformer._attention_mask(mask, 8, 1, torch.device("cpu"))  # (B, 1, 1, S)
    S = 9
    k = torch.arange(S)[None, :]
    general = ((k <= 8) & mask[:, None, :]) | (k == 8)  # causal & padding, the query always sees itself
    assert fast.shape == (3, 1, 1, S) and torch.equal(fast, general[:, None])
    assert not mask[:, -1].any()  # the caller's mask is left untouched


def test_static_decode_step_equals_cached_forward(family):
    """cache_index (the capturable decode step): keys written at a tensor slot, attention over every slot of the
    cache with the unwritten ones hidden, positions from the mask over every slot; the logits of the usual cached
    forward, and `pos` untouched."""
    _, path, _ = family
    m = load_model(path)
    ids, mask = left_padded_batch()
    T, extra = ids.shape[1], 3  # slots beyond the last token stay unwritten and hidden
    slots_mask = torch.cat([mask, torch.ones(3, extra, dtype=mask.dtype)], 1)  # (B, T + extra) over every slot
    with torch.no_grad():
        full = m(ids, attention_mask=mask)
        cache = m.new_cache(batch=3, max_len=T + extra)
        out = [m(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)]
        for t in range(6, T):
            out.append(m(ids[:, t:t + 1], attention_mask=slots_mask, kv_cache=cache, cache_index=torch.tensor(t)))
        assert cache.pos == 6
        with pytest.raises(ValueError, match="expected"):
            m(ids[:, :1], attention_mask=mask, kv_cache=cache, cache_index=torch.tensor(T))
    step = torch.cat(out, dim=1)
    real = mask.bool()
    assert (step[real] - full[real]).abs().max() <= 1e-4


# ---- flash-attn's varlen path, with a reference kernel in its place ------------------------------------------------
def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               causal=False):
    """flash_attn_varlen_func's contract in plain PyTorch, one sequence at a time: q (Nq, H, hd), k, v (Nk, KV, hd)
    packed rows; the causal mask aligned bottom-right (query i of Lq sees keys up to Lk - Lq + i). -> (Nq, H, hd)"""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    for b in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = (int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(cu_seqlens_k[b]),
                          int(cu_seqlens_k[b + 1]))
        if q1 == q0:
            continue
        allowed = None
        if causal:
            allowed = torch.arange(k1 - k0)[None, :] <= torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        y = torch.nn.functional.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1), attn_mask=allowed,
            enable_gqa=True)  # (H, Lq, hd)
        out[q0:q1] = y.transpose(0, 1)
    return out


def test_unpad_pad_round_trip():
    from model.varlen import pad, unpad

    x = torch.randn(4, 6, 3, 2, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1]])
    xu, indices, cu, longest = unpad(x, mask)
    assert torch.equal(xu, x[mask.bool()]) and xu.shape == (11, 3, 2)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 4, 7, 7, 11] and longest == 4
    back = pad(xu, indices, 4, 6)
    assert torch.equal(back, x * mask[:, :, None, None])
    back.sum().backward()
    assert torch.equal(x.grad, mask[:, :, None, None].float().expand_as(x))  # gradients reach the real tokens only


def right_padded(ids, mask):
    """The left-padded batch with each row's real tokens moved to the front."""
    order = torch.argsort(1 - mask, dim=1, stable=True)  # real positions first, in order
    return ids.gather(1, order), mask.gather(1, order)


def test_varlen_path_equals_dense_sdpa(family, monkeypatch):
    """Where flash_attn_varlen_func would run (CUDA, bf16), a plain-PyTorch kernel with its contract runs instead
    on the CPU: logits at the real positions and gradients equal the dense-mask SDPA path, for left padding, right
    padding, both (prompt then completion, as in RL), a prefill into a KV cache followed by decode steps, new
    tokens after a cached prefix (queries fewer than keys: the bottom-right alignment), and a training forward and
    backward with activation checkpointing."""
    from model import transformer

    _, path, _ = family
    m = load_model(path)
    calls = []

    def kernel(*args, **kwargs):
        calls.append(kwargs["causal"])
        return varlen_attention_reference(*args, **kwargs)

    left = left_padded_batch()
    ids, mask = left
    completion_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])  # right-padded completions
    both = torch.cat([ids, ids[:, :4]], 1), torch.cat([mask, completion_mask], 1)
    prefix = torch.randint(3, 500, (1, 5), generator=torch.Generator().manual_seed(2))

    def run(ids, mask):
        with torch.no_grad():
            logits = m(ids, attention_mask=mask)  # (B, T, V)
            cache = m.new_cache(3, ids.shape[1])
            steps = [m(ids[:, :9], attention_mask=mask[:, :9], kv_cache=cache)]
            for t in range(9, ids.shape[1]):
                steps.append(m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
            cache = m.new_cache(1, 5)
            m(prefix, kv_cache=cache)
            cache = cache.repeat_interleave(3, max_len=5 + ids.shape[1])  # [prefix][padding][suffix] key slots
            after = m(ids, attention_mask=torch.cat([torch.ones(3, 5, dtype=mask.dtype), mask], 1), kv_cache=cache)
        m.zero_grad()
        m.train()
        m.gradient_checkpointing = True  # the backward recomputes each block, varlen kernel included
        loss = m(ids, attention_mask=mask)[mask.bool()].pow(2).mean()
        loss.backward()
        m.eval()
        grads = torch.cat([p.grad.flatten() for p in m.parameters()])
        return logits, torch.cat(steps, 1), after, grads

    for batch in (left, right_padded(*left), both):
        dense = run(*batch)
        assert not calls
        with monkeypatch.context() as mp:
            mp.setattr(transformer, "varlen_kernel", lambda device, dtype: kernel)
            varlen = run(*batch)
        n_layers = m.config.num_hidden_layers
        # full forward, prefill, after the prefix, training forward and its recomputation in the backward
        assert calls == [True] * (5 * n_layers)
        calls.clear()
        real = batch[1].bool()
        for d, v in zip(dense[:3], varlen[:3]):
            assert (d[real] - v[real]).abs().max() <= 1e-5
        assert torch.allclose(dense[3], varlen[3], atol=1e-6)


# Qwen3's chat template, cut to what decides thinking: the empty <think> block after the generation prompt
QWEN3_CHAT = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
              "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
              "{%- endif %}{%- endif %}")


def test_chat_prompts_render_with_thinking_off():
    """By default a Qwen3-style prompt ends with the closed empty think block, so the answer starts at once;
    thinking=True (per call or on the tokenizer) leaves it open; templates without the variable ignore it."""
    from tests.tiny import CHAT_TEMPLATE

    tok = load_tokenizer(STORIES)
    tok.hf.chat_template = QWEN3_CHAT
    msgs = [{"role": "user", "content": "Describe the user."}]
    text = tok.render_chat(msgs)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), text
    assert tok.encode_chat(msgs) == tok.encode(text, add_special_tokens=False)
    assert tok.render_chat(msgs, thinking=True).endswith("<|im_start|>assistant\n")
    tok.thinking = True
    assert tok.render_chat(msgs) == tok.render_chat(msgs, thinking=True)
    assert tok.render_chat(msgs, thinking=False) == text
    tok.hf.chat_template = CHAT_TEMPLATE
    assert tok.render_chat(msgs, thinking=False) == tok.render_chat(msgs, thinking=True) == \
        "<user>\nDescribe the user.\n<assistant>\n"


def test_autocast_dtype_computes_in_bf16_over_fp32_weights(family):
    """autocast_dtype: bf16 matmuls and logits, a bf16 KV cache, fp32 gradients on the fp32 weights; close to
    the fp32 forward."""
    _, path, _ = family
    m = load_model(path)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full = m(ids, attention_mask=mask)
    m.autocast_dtype = torch.bfloat16
    assert m.compute_dtype() == torch.bfloat16
    with torch.no_grad():
        low = m(ids, attention_mask=mask)
        cache = m.new_cache(batch=3, max_len=ids.shape[1])
        m(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)
        step = m(ids[:, 6:7], attention_mask=mask[:, :7], kv_cache=cache)
    assert low.dtype == step.dtype == cache.k[0].dtype == torch.bfloat16
    real = mask.bool()
    assert (low[real].float() - full[real]).abs().max() <= 0.05
    assert (step[:, 0].float() - full[:, 6]).abs().max() <= 0.05
    m(ids, attention_mask=mask).float().logsumexp(-1).sum().backward()
    assert m.lm_head.weight.grad.dtype == torch.float32 and m.lm_head.weight.dtype == torch.float32
