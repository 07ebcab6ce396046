"""rl/ math against hand-computed values (plain python math), brute force and torch's own log_softmax."""

import math

import pytest
import torch

from rl.dpo import dpo_loss, sequence_logprob
from rl.grpo import aggregate, group_advantages, grpo_loss, kl_k3, policy_loss
from rl.logprobs import token_entropy, token_logprobs
from rl.rollout import completion_logprobs, make_batch


def close(a, b, tol=1e-6):
    a, b = (float(v.detach()) if torch.is_tensor(v) else float(v) for v in (a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---------------------------------------------------------------- log-probs


def test_token_logprobs_hand_values():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # (1, 2, 3)
    tokens = torch.tensor([[2, 0]])
    lp = token_logprobs(logits, tokens)
    assert lp.shape == (1, 2) and lp.dtype == torch.float32
    assert close(lp[0, 0], 3.0 - math.log(math.e**1 + math.e**2 + math.e**3))
    assert close(lp[0, 1], -math.log(3.0))
    # temperature 2: softmax(logits / 2)
    lp2 = token_logprobs(logits, tokens, temperature=2.0)
    assert close(lp2[0, 0], 1.5 - math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5)))
    # entropy of uniform over 3 is log 3; of softmax(1,2,3) by hand
    H = token_entropy(logits)
    p = [math.exp(v) / (math.e + math.e**2 + math.e**3) for v in (1, 2, 3)]
    assert close(H[0, 0], -sum(q * math.log(q) for q in p))
    assert close(H[0, 1], math.log(3.0))


def test_token_logprobs_matches_log_softmax_chunked_bf16_and_grad():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (5, 7), generator=g)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    for chunk in (None, 1, 2, 5):
        assert torch.allclose(token_logprobs(logits, tokens, 0.7, chunk_size=chunk), ref, atol=1e-5)
    ent_ref = -(torch.softmax(logits / 0.7, -1) * torch.log_softmax(logits / 0.7, -1)).sum(-1)
    assert torch.allclose(token_entropy(logits, 0.7, chunk_size=2), ent_ref, atol=1e-5)
    # bf16 logits: computed in fp32 from the bf16 values, the caller's tensor is not modified
    lb = logits.bfloat16()
    before = lb.clone()
    out = token_logprobs(lb, tokens, 0.7, chunk_size=2)
    assert out.dtype == torch.float32 and torch.equal(lb, before)
    ref_b = torch.log_softmax(lb.float() / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(out, ref_b, atol=1e-5)
    # gradient equals that of the log_softmax formulation
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    token_logprobs(a, tokens, 0.7, chunk_size=2).sum().backward()
    torch.log_softmax(b / 0.7, -1).gather(-1, tokens[..., None]).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens[:, :3])


def test_make_batch_masks_by_position_pad_equals_eos():
    """The loss mask is built by position from the completion lengths: with pad == EOS the first EOS stays in
    (the model learns to stop) and the padding after it does not."""
    EOS = 2
    batch = make_batch([[7, 8], [9]], [[5, 6, EOS], [5, 6, 7, 8, 9], [EOS], [5, 3]], pad_id=EOS, repeat=2)
    assert batch.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert batch.completion.tolist() == [[5, 6, EOS, EOS, EOS], [5, 6, 7, 8, 9], [EOS, EOS, EOS, EOS, EOS],
                                         [5, 3, EOS, EOS, EOS]]
    # masking by pad id (the pitfall) would have dropped the real EOS of row 0:
    assert (batch.completion[0] != EOS).float().tolist() == [1, 1, 0, 0, 0]
    # prompts are left-padded, completions start at the same column; attention covers prompt + completion
    assert batch.input_ids[2].tolist()[:2] == [EOS, 9] and batch.attention_mask[2].tolist() == [0, 1, 1, 0, 0, 0, 0]


class Bigram(torch.nn.Module):
    """A model whose logits at position t depend only on the token at t: sequence log-probs are known sums."""

    W = torch.tensor([[0.0, 1.0, 2.0, 0.5], [1.0, 0.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0], [2.0, 0.0, 1.0, 0.0]])

    def forward(self, ids, attention_mask=None, num_logits_to_keep=0):
        return self.W[ids][:, -num_logits_to_keep:]  # (B, T, V = 4)

    @classmethod
    def lp(cls, prev, nxt):  # log softmax(W[prev])[nxt] by hand
        return cls.W[prev][nxt].item() - math.log(sum(math.exp(v) for v in cls.W[prev].tolist()))


def test_completion_logprobs_known_answer_bigram():
    """The logits at column t score the token at t + 1: prompt [1, 2] then [3, EOS 0]; prompt [2] then
    [1, 1, EOS]; with left padding, sequence log-probs are the bigram sums."""
    batch = make_batch([[1, 2], [2]], [[3, 0], [1, 1, 0]], pad_id=0)
    logp, _ = completion_logprobs(Bigram(), batch)
    seq = sequence_logprob(logp, batch.mask)
    assert close(seq[0], Bigram.lp(2, 3) + Bigram.lp(3, 0), 1e-5)  # p(3 | 2) p(EOS | 3)
    assert close(seq[1], Bigram.lp(2, 1) + Bigram.lp(1, 1) + Bigram.lp(1, 0), 1e-5)
    # vocab_limit 3: the softmax over ids 0..2 only (a completion of such ids)
    batch = make_batch([[2]], [[1, 1, 0]], pad_id=0)
    lim, _ = completion_logprobs(Bigram(), batch, vocab_limit=3)
    W = Bigram.W[:, :3]
    lp3 = lambda a, b: W[a][b].item() - math.log(sum(math.exp(v) for v in W[a].tolist()))  # noqa: E731
    assert close(sequence_logprob(lim, batch.mask)[0], lp3(2, 1) + lp3(1, 1) + lp3(1, 0), 1e-5)


STORIES = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


@pytest.mark.parametrize("dtype,gradient_checkpointing", [(torch.float64, False), (torch.float64, True),
                                                          (torch.float32, False)])
def test_chunked_head_logprobs_equal_whole_block_with_gradients(dtype, gradient_checkpointing):
    """completion_logprobs(chunk_tokens=k): the lm_head a few positions at a time inside forward, each chunk's logits
    recomputed in the backward. Log-probs, entropies and every parameter's gradient equal the whole-block
    computation's for chunks that split rows, one per position, and one for all: within 1e-6 with float64
    weights (the log-probs are float32 either way); in float32 within 1e-5 of the largest value of each tensor
    (the head's product on fewer rows rounds differently: an ulp of a log-prob of -36 is 4e-6, and a gradient of
    ~50 sums 36 chunks). With chunks, no tensor saved for the backward is as large as the micro-batch's logit
    block."""
    from model import load_model

    torch.manual_seed(0)
    model = load_model(STORIES, dtype=dtype).train()
    model.gradient_checkpointing = gradient_checkpointing
    prompts = [torch.randint(3, 500, (n,)).tolist() for n in (7, 3, 9)]
    comps = [torch.randint(3, 400, (n,)).tolist() for n in (12, 5, 9)]
    batch = make_batch(prompts, comps, pad_id=0)
    R, L = batch.completion.shape
    V = 400  # below the table's 512 rows
    weights = torch.randn(R, L)

    def run(chunk):
        model.zero_grad(set_to_none=True)
        largest = [0]

        def pack(t):
            largest[0] = max(largest[0], t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, ent = completion_logprobs(model, batch, 0.8, with_entropy=True, vocab_limit=V, chunk_tokens=chunk)
        (logp * weights * batch.mask).sum().backward()
        return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()}, largest[0]

    def same(a, b):
        if dtype == torch.float64:
            return float((a - b).abs().max()) <= 1e-6
        return float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))

    logp, ent, grads, largest = run(0)
    assert largest >= R * L * V  # the whole block's fp32 copy is kept for the backward
    for chunk in (5, 1, R * L, 4096):
        c_logp, c_ent, c_grads, c_largest = run(chunk)
        assert not c_ent.requires_grad
        assert same(c_logp, logp) and same(c_ent, ent), chunk
        for name, g in grads.items():
            assert same(c_grads[name], g), (chunk, name)
        if chunk < R * L:
            assert c_largest < R * L * V, chunk
    with torch.no_grad():  # the no-grad path (old and reference log-probs) chunks without recomputation
        no_grad = completion_logprobs(model, batch, 0.8, vocab_limit=V, chunk_tokens=5)[0]
    assert same(no_grad, logp)


@pytest.mark.parametrize("chunk", [0, 7])
def test_shared_prompt_forward_equals_one_forward_per_row(chunk):
    """completion_logprobs(share_prompts=True): each distinct prompt runs once and its keys and values are copied
    to its rows. Log-probs, entropies and every gradient equal the plain per-row forward's (float64 weights,
    1e-6), with prompts of different lengths (left padding), completions of different lengths (right padding),
    groups of different sizes in one batch (a micro-batch may cut a group), LoRA adapters on, activation
    checkpointing on (the cached blocks recomputed in the backward), and under no_grad. Gradients within 1e-6 of
    each tensor's largest entry: the log-softmax runs in fp32 whatever the weights."""
    from model import load_model
    from model.lora import add_lora
    from rl.rollout import shares_prompts

    torch.manual_seed(0)
    model = load_model(STORIES, dtype=torch.float64).train()
    prompts = [torch.randint(3, 500, (n,)).tolist() for n in (7, 3, 9)]
    comps = [torch.randint(3, 400, (n,)).tolist() for n in (12, 5, 9, 1, 4, 6, 8, 2, 3)]
    batch = make_batch(prompts, comps, pad_id=0, repeat=3).rows(slice(1, 9))  # groups of 2, 3 and 3 rows
    assert batch.prompt_of.tolist() == [0, 0, 1, 1, 1, 2, 2, 2] and shares_prompts(batch)
    weights = torch.randn(batch.completion.shape)

    def run(share, checkpointing=False):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        logp, ent = completion_logprobs(model, batch, 0.8, with_entropy=True, vocab_limit=400, chunk_tokens=chunk,
                                        share_prompts=share)
        (logp * weights * batch.mask).sum().backward()
        return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for lora in (False, True):
        if lora:
            add_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"], seed=0)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_()  # B = 0 would hide the adapters
        logp, ent, grads = run(False)
        for checkpointing in (False, True):
            s_logp, s_ent, s_grads = run(True, checkpointing)
            torch.testing.assert_close(s_logp, logp, rtol=0, atol=1e-6)
            torch.testing.assert_close(s_ent, ent, rtol=0, atol=1e-6)
            assert grads.keys() == s_grads.keys() and len(grads) > 0
            for name, g in grads.items():  # the log-softmax is fp32 whatever the weights: 1e-6 of the largest
                assert float((s_grads[name] - g).abs().max()) <= 1e-6 * max(1.0, float(g.abs().max())), name
        model.gradient_checkpointing = False
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(model, batch, 0.8, vocab_limit=400, chunk_tokens=chunk,
                                                       share_prompts=True)[0], logp, rtol=0, atol=1e-6)
    one_each = make_batch(prompts, comps[:3], pad_id=0)  # no prompt shared: the plain path
    assert not shares_prompts(one_each)


# ---------------------------------------------------------------- GRPO


def test_group_advantages_hand_values_and_equal_group():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1])
    adv, m = group_advantages(r, group_size=4, eps=1e-6)
    std = math.sqrt((0.25 + 0.25 + 0 + 0) / 3)  # sample std of [1, 0, .5, .5]
    want = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.0, 0.0, 0, 0, 0, 0]
    assert all(close(a, w) for a, w in zip(adv.tolist(), want))
    assert torch.isfinite(adv).all() and adv[4:].abs().max() == 0  # equal rewards: exactly 0, no NaN
    assert close(m["zero_std_frac"], 0.5)
    assert close(m["reward_mean"], sum(r.tolist()) / 8)
    # Dr. GRPO: no std scaling
    adv2, _ = group_advantages(r, 4, scale_by_std=False)
    assert all(close(a, w, 1e-6) for a, w in zip(adv2.tolist(), [0.5, -0.5, 0, 0, 0, 0, 0, 0]))
    # all groups constant
    a3, m3 = group_advantages(torch.full((6,), 0.3), 3)
    assert torch.equal(a3, torch.zeros(6)) and close(m3["zero_std_frac"], 1.0)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), 4)


def test_group_of_one_is_refused():
    """G = 1 has no baseline: every advantage would be 0 and nothing learnt, silently. It is an error."""
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.tensor([0.2, 0.9]), 1)


def test_policy_loss_hand_values_clip_fractions():
    lr = [0.3, -0.3, 0.1, -0.5, 7.0]  # log-ratios; last token masked
    A = [[1.0, -1.0, -2.0, 1.0, 5.0]]
    old = torch.zeros(1, 5)
    logp = torch.tensor([lr], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    loss, m = policy_loss(logp, old, torch.tensor(A), mask, clip_low=0.2, clip_high=0.2)
    r = [math.exp(x) for x in lr]
    # token 0: A=1, r=1.35 > 1.2 -> -1.2 (clipped high); token 1: A=-1, r=.741 < .8 -> 0.8 (clipped low)
    # token 2: A=-2, r=1.105 -> 2 * 1.105 (unclipped); token 3: A=1, r=.607 -> -.607 (unclipped)
    per = [-1.2, 0.8, 2 * r[2], -r[3]]
    assert close(loss, sum(per) / 4)
    assert close(m["clip_frac_high"], 0.25) and close(m["clip_frac_low"], 0.25)
    assert close(m["ratio_mean"], sum(r[:4]) / 4) and close(m["ratio_max"], r[0])
    loss.backward()
    # d/dlogp: clipped tokens 0; unclipped -A r / n
    want = [0.0, 0.0, 2 * r[2] / 4, -r[3] / 4, 0.0]
    assert all(close(g, w) for g, w in zip(logp.grad[0].tolist(), want))
    # asymmetric clip (DAPO clip-higher): 1.35 < 1.4 no longer clipped
    loss2, m2 = policy_loss(torch.tensor([lr]), old, torch.tensor(A), mask, clip_low=0.2, clip_high=0.4)
    assert close(loss2, (-r[0] + 0.8 + 2 * r[2] - r[3]) / 4) and close(m2["clip_frac_high"], 0.0)


def test_extreme_ratio_is_clamped_finite_loss_and_grad():
    logp = torch.tensor([[0.0, 0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1e4, 1e4, float("nan")]])  # huge ratio, tiny ratio, garbage on a masked position
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([-1.0])  # negative: the unclipped branch -A r is active for the huge ratio
    ref = torch.tensor([[1e4, -1e4, float("-inf")]])
    loss, m = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.1, clip_ratio_c=None, max_kl=None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    k3_hi = math.exp(20) - 20 - 1  # ref - logp = 1e4 clamped to 20
    k3_lo = math.exp(-20) + 20 - 1
    want = (math.exp(20) + 0.8) / 2 + 0.1 * (k3_hi + k3_lo) / 2  # token 1: r = e^-20 < .8 with A<0 -> 0.8
    assert close(loss, want, 1e-5)
    assert close(m["ratio_max"], math.exp(20), 1e-5)
    assert close(m["clip_frac_low"], 0.5)


def test_dual_clip_caps_negative_advantage_loss_as_verl():
    """verl's dual clip (clip_ratio_c = 3): A = -1 and ratio 5 lose 3, not 5, and give no gradient."""
    logp = torch.tensor([[math.log(5.0), math.log(2.0), math.log(5.0)]], requires_grad=True)
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])  # token 1: ratio 2 < 3, untouched; token 2: A > 0, ordinary clip
    loss, m = policy_loss(logp, old, adv, mask)
    assert close(loss, (3.0 + 2.0 - 1.2) / 3)
    assert close(m["clip_frac_dual"], 1 / 3) and close(m["clip_frac_high"], 1 / 3)
    loss.backward()
    assert all(close(g, w) for g, w in zip(logp.grad[0].tolist(), [0.0, 2.0 / 3, 0.0]))
    plain, m0 = policy_loss(logp.detach(), old, adv, mask, clip_ratio_c=None)
    assert close(plain, (5.0 + 2.0 - 1.2) / 3) and close(m0["clip_frac_dual"], 0.0)
    with pytest.raises(ValueError):
        policy_loss(logp.detach(), old, adv, mask, clip_ratio_c=0.5)


def test_kl_cap_as_verl_low_var_kl():
    """verl clamps low_var_kl to [-10, 10]: a log-ratio of 19 gives 10, not exp(19) - 20 = 1.8e8; no gradient."""
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[19.0, 0.5]])
    kl = kl_k3(logp, ref)
    assert close(kl[0, 0], 10.0) and close(kl[0, 1], math.exp(0.5) - 0.5 - 1, 1e-6)
    assert close(kl_k3(logp.detach(), ref, max_kl=None)[0, 0], math.exp(19) - 20, 1e-6)
    kl.sum().backward()
    assert logp.grad[0, 0] == 0 and close(logp.grad[0, 1], 1 - math.exp(0.5), 1e-6)


def test_extreme_ratio_with_verl_defaults():
    """The same extreme tokens with the default dual clip and KL cap: the loss stays O(1)."""
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old, ref = torch.tensor([[-1e4, 1e4]]), torch.tensor([[1e4, -1e4]])
    loss, m = grpo_loss(logp, old, ref, torch.tensor([-1.0]), torch.ones(1, 2), kl_coef=0.1)
    # token 0: A = -1, ratio e^20 -> dual clip 3; token 1: ratio e^-20 -> clip low 0.8; both k3 (e^20 - 21 and
    # e^-20 + 19) capped at 10
    assert close(loss, (3.0 + 0.8) / 2 + 0.1 * (10.0 + 10.0) / 2, 1e-5)
    assert close(m["clip_frac_dual"], 0.5) and close(m["kl"], 10.0)


def test_kl_k3_hand_values():
    logp = torch.tensor([[0.0, 0.0, 0.0, -3.0]])
    ref = torch.tensor([[0.5, -0.5, 0.0, -3.0 + 100.0]])
    kl = kl_k3(logp, ref, max_kl=None)
    want = [math.exp(0.5) - 0.5 - 1, math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(20) - 20 - 1]
    assert all(close(a, w, 1e-6) for a, w in zip(kl[0].tolist(), want))
    g = torch.Generator().manual_seed(1)
    assert (kl_k3(torch.randn(50, generator=g) * 5, torch.randn(50, generator=g) * 5) >= 0).all()


def test_aggregate_modes_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert close(aggregate(x, mask), (1 + 2 + 3 + 4) / 4)  # NaN under the mask is ignored
    assert close(aggregate(x, mask, global_tokens=10), 10 / 10)
    assert close(aggregate(x, mask, "seq-mean-token-mean"), (2.0 + 4.0) / 2)
    assert close(aggregate(x, mask, "seq-mean-token-mean", global_seqs=4), 6.0 / 4)
    assert close(aggregate(x, torch.zeros(2, 3)), 0.0)  # no token: 0, not NaN
    with pytest.raises(ValueError):
        aggregate(x, mask, "sum")


def test_grpo_loss_combines_terms():
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 4, generator=g) - 2
    old = logp + 0.1 * torch.randn(3, 4, generator=g)
    ref = logp + 0.3 * torch.randn(3, 4, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.0])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    pg, _ = policy_loss(logp, old, adv, mask)
    # hand: per-token k3 from plain python, token-mean over 9 tokens
    kls = [math.exp(r - l) - (r - l) - 1 for r, l, mm in zip(ref.flatten().tolist(), logp.flatten().tolist(), mask.flatten().tolist()) if mm]
    loss, m = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.05)
    assert close(loss, pg.item() + 0.05 * sum(kls) / 9, 1e-5)
    assert close(m["kl"], sum(kls) / 9, 1e-5)
    loss0, m0 = grpo_loss(logp, old, None, adv, mask, kl_coef=0.05)
    assert close(loss0, pg) and "kl" not in m0
    loss1, _ = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.0)
    assert close(loss1, pg)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_equals_full_batch(mode):
    """k micro-batches with the GLOBAL token (or sequence) count give the full-batch gradient."""
    torch.manual_seed(0)
    B, T, D, V = 6, 5, 8, 13
    policy = torch.nn.Linear(D, V)
    x = torch.randn(B, T, D)
    tokens = torch.randint(0, V, (B, T))
    lens = torch.tensor([5, 1, 3, 2, 4, 5])
    mask = (torch.arange(T)[None, :] < lens[:, None]).float()  # (B, T) the first lens[b] tokens of each row
    with torch.no_grad():
        old = token_logprobs(policy(x), tokens, 0.9) + 0.2 * torch.randn(B, T)
        ref = old + 0.2 * torch.randn(B, T)
    adv = torch.randn(B)

    def loss_of(sl, **kw):
        logp = token_logprobs(policy(x[sl]), tokens[sl], 0.9)
        return grpo_loss(logp, old[sl], ref[sl], adv[sl], mask[sl], kl_coef=0.1, loss_agg_mode=mode, **kw)[0]

    policy.zero_grad()
    loss_of(slice(0, B)).backward()
    full = [p.grad.clone() for p in policy.parameters()]

    policy.zero_grad()
    splits = [slice(0, 1), slice(1, 4), slice(4, 6)]  # uneven micro-batches
    kw = {"global_tokens": mask.sum()} if mode == "token-mean" else {"global_seqs": B}
    total = sum(loss_of(sl, **kw).item() for sl in splits)
    policy.zero_grad()
    for sl in splits:
        loss_of(sl, **kw).backward()
    acc = [p.grad.clone() for p in policy.parameters()]
    assert close(total, loss_of(slice(0, B)).item(), 1e-6)
    for a, f in zip(acc, full):
        assert torch.allclose(a, f, atol=1e-6, rtol=0)

    # the pitfall: dividing each micro-batch by its own count and averaging does not give the same gradient
    policy.zero_grad()
    for sl in splits:
        (loss_of(sl) / len(splits)).backward()
    if mode == "token-mean":
        assert not torch.allclose(policy.weight.grad, full[0], atol=1e-4)


# ---------------------------------------------------------------- DPO


def test_dpo_loss_hand_values_and_variants():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.8, -2.0])
    h = [(-1 + 2) - (-1.5 + 1.8), (-3 + 1) - (-2 + 2)]  # [0.7, -2.0]
    sp = lambda z: math.log1p(math.exp(-z))  # -log sigmoid(z)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert close(loss, (sp(0.07) + sp(-0.2)) / 2)
    assert close(m["rewards_chosen"], (0.1 * 0.5 + 0.1 * -1.0) / 2)
    assert close(m["rewards_rejected"], (0.1 * -0.2 + 0.1 * 1.0) / 2)
    assert close(m["reward_accuracy"], 0.5)  # pair 0: .05 > -.02 yes; pair 1: -.1 > .1 no
    assert close(m["reward_margin"], (0.07 + -0.2) / 2)
    assert close(m["logps_chosen"], -2.0) and close(m["logps_rejected"], -1.5)
    # conservative DPO
    ls = 0.1
    loss_ls, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=ls)
    want = sum((1 - ls) * sp(0.1 * x) + ls * sp(-0.1 * x) for x in h) / 2
    assert close(loss_ls, want)
    # IPO
    loss_ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert close(loss_ipo, ((0.7 - 5) ** 2 + (-2.0 - 5) ** 2) / 2, 1e-5)
    # gradient of plain DPO wrt pi_chosen: -beta * sigmoid(-beta h) / P
    pcg = pc.clone().requires_grad_(True)
    dpo_loss(pcg, pr, rc, rr, beta=0.1)[0].backward()
    want_g = [-0.1 / (1 + math.exp(0.1 * x)) / 2 for x in h]
    assert all(close(a, w) for a, w in zip(pcg.grad.tolist(), want_g))
    # micro-batches with global_pairs sum to the full loss
    parts = [dpo_loss(pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], global_pairs=2)[0] for i in (0, 1)]
    assert close(sum(p.item() for p in parts), loss)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge-ish")


def test_sequence_logprob_masks_padding():
    tl = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.5, -0.5]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert sequence_logprob(tl, m).tolist() == [-3.0, -1.0]


# ---------------------------------------------------------------- REBEL


def test_rebel_loss_hand_values_equal_rewards_and_clamp():
    from rl.rebel import kl_penalised, rebel_loss, whiten

    old = torch.tensor([[-10.0, -12.0], [-5.0, -5.0]])
    logp = torch.tensor([[-9.0, -12.5], [-5.0, -4.0]], requires_grad=True)
    r = torch.tensor([[1.0, 0.0], [0.3, 0.3]])  # pair 1: equal rewards, the target difference is 0
    loss, m = rebel_loss(logp, old, r, eta=2.0)
    # pair 0: ((1 - -0.5) / 2 - 1)^2 = (0.75 - 1)^2 = 0.0625; pair 1: ((0 - 1) / 2 - 0)^2 = 0.25
    assert close(loss, (0.0625 + 0.25) / 2)
    assert close(m["reward_diff"], 0.5) and close(m["ratio_diff"], (0.75 + 0.5) / 2)
    loss.backward()
    # d/dlogp_y = 2 (pred - target) / eta / P; d/dlogp_y' = -that
    g = logp.grad.tolist()
    assert close(g[0][0], 2 * (0.75 - 1) / 2 / 2) and close(g[0][1], -2 * (0.75 - 1) / 2 / 2)
    assert close(g[1][0], 2 * (-0.5) / 2 / 2) and close(g[1][1], -2 * (-0.5) / 2 / 2)
    # a clamped log-ratio: 100 nats clamped to 20, and no gradient through it
    lp = torch.tensor([[90.0, -1.0]], requires_grad=True)
    loss_c, _ = rebel_loss(lp, torch.tensor([[-10.0, -1.0]]), torch.tensor([[0.0, 0.0]]), eta=1.0)
    assert close(loss_c, 400.0)
    loss_c.backward()
    assert lp.grad[0, 0] == 0 and close(lp.grad[0, 1], -40.0)  # clamped side: none; the other: -2 (20 - 0)
    # micro-batches with global_pairs sum to the full-batch loss
    parts = [rebel_loss(logp[i:i + 1].detach(), old[i:i + 1], r[i:i + 1], eta=2.0, global_pairs=2)[0] for i in (0, 1)]
    assert close(sum(p.item() for p in parts), loss)
    with pytest.raises(ValueError):
        rebel_loss(logp.detach(), old, r, eta=0.0)
    with pytest.raises(ValueError):
        rebel_loss(logp.detach().reshape(-1), old.reshape(-1), r.reshape(-1))
    # whitening and the KL folded into the reward
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert close(w.mean(), 0.0, 1e-6) and close(w.std(correction=0), 1.0, 1e-6)
    assert torch.equal(whiten(torch.full((4,), 0.7)), torch.zeros(4))
    assert torch.allclose(kl_penalised(torch.tensor([1.0]), torch.tensor([-3.0]), torch.tensor([-5.0]), 0.2),
                          torch.tensor([1.0 - 0.2 * 2.0]))
