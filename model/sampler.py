"""Batched sampling with a preallocated KV cache: one prefill over the prompts, then one forward call per token.

    out = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=64, temperature=1.0, top_p=0.9, n=8,
                   eos_ids=tok.eos_ids, pad_id=tok.pad_token_id, vocab_limit=tok.vocab_size, seed=0)
    out.tokens      # (R, L) R = prompts * n, row b*n + j is sample j of prompt b, pad_id after the row ended
    out.logprobs    # (R, L) log p(token) under softmax(logits / temperature), before top-k / top-p
    out.lengths     # (R,) tokens up to and including the first EOS (L when the row did not finish)
    out.finished    # (R,) whether the row produced an EOS (or completed a stop text)

Design
- Left padding. All rows share one cache slot per step (a single write pointer, one slice assignment per layer
  and step) and the forward pass takes the attention mask over every key slot; each row's positions are
  cumsum(mask) - 1, i.e. 0, 1, 2, ... from its own first real token, so a row sees exactly the positions and keys
  it would see alone. Per-row write pointers (no padding) would save the padded slots but need a scatter per
  layer and a ragged mask anyway; with prompts sorted by length the padding is small. Without padding (all
  prompts of one length) no padding mask is built (a decode step still hides the slots not written yet).
- Group sampling: the B distinct prompts are prefilled once, computing logits at the last position only, and
  the cache is then copied to B * n rows (`KVCache.repeat_interleave`).
- Randomness: row r owns a torch.Generator seeded from (seed, prompt index, sample index) (see `row_seed`) and
  draws its uniforms u_r[0..L) up front, on the CPU; step t samples by inverting the row's CDF at u_r[t]. A
  row's tokens therefore depend only on its own prompt and its own stream: sampled alone with the same seed it
  gives the same tokens (up to float rounding of the logits in a different batch), on any device.
- Under FSDP every rank must run the same number of forward calls (each gathers the sharded weights
  collectively): each look at the host (below) all-reduces the number of steps the rows need, and a rank whose
  rows have all ended keeps stepping on padding until every rank is done. A full copy of the model on each rank
  needs none of this: its ranks may sample different numbers of prompts, or none.
- Host syncs. The decode loop keeps its flags (finished, lengths) on the device and samples with device ops
  (uniforms drawn up front, the inverse CDF by searchsorted, EOS ids held back by a device tensor). It looks at the
  host only every `check_every` steps (every step on the CPU, where a sync is free; every 8 on CUDA): the stop
  texts are matched there on the decoded windows of the steps since the last look, each step as if alone, rows
  that completed one are cut back to it, and one number, the step at which the last row ended, says whether to
  stop. The outputs are those of looking every step.
- Static decode steps. With `compile_decode=True` each step's forward is `decode_step`: the same shapes every
  step (all P + L cache slots under a mask, the write slot and the positions as tensors), compiled whole
  (fullgraph, no recompile per step) and on CUDA replayed as a CUDA graph (mode "reduce-overhead"). Eager steps
  attend to the P + t + 1 slots written so far (less work; no sync either).
- Chunks (`chunk_prompts`): the KV cache of B * n rows of P + L slots is the rollout's largest tensor. The B
  prompts are prefilled together once; then a few prompts at a time get their rows' cache (copied from the
  prefill), decode until their rows end and free it. Each chunk keeps the whole batch's layout (P, the mask,
  each row's uniforms), so a row's samples are those of one batch.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .kv_cache import KVCache
from .linear import packed_weights


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (R, L) long, pad_id after a row's end
    logprobs: torch.Tensor  # (R, L) float32, 0 after a row's end
    lengths: torch.Tensor  # (R,) long, number of tokens up to and including the first EOS
    finished: torch.Tensor  # (R,) bool, the row ended with an EOS before max_new_tokens ran out
    prompt_lens: torch.Tensor  # (R,) long, prompt length of each row

    def completions(self) -> list[list[int]]:
        """Each row's generated ids up to and including its EOS."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


# ---- pure functions ---------------------------------------------------------------------------------------------
def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for the stream of (seed, prompt, sample): splitmix64 finaliser over the three numbers."""
    x = 0
    for v in (seed, prompt_index, sample_index):
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 30
        x = x * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 27
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


def truncate_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Zero the probabilities outside the top-k, then outside the nucleus (Holtzman et al. 2019). (R, V) -> (R, V)

    top-k keeps every token whose probability reaches the k-th largest (ties kept). top-p then keeps the smallest
    set of most likely tokens whose mass, renormalised after top-k, reaches top_p: a token is dropped when the
    mass of the tokens ranked above it already reaches top_p (the most likely token always stays). This is the
    order and rule of transformers' TopKLogitsWarper and TopPLogitsWarper. The result is not renormalised.
    """
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (R, V)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        drop = mass_before >= top_p * sorted_p.sum(-1, keepdim=True)
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one id per row from unnormalised probabilities (R, V) with uniforms u (R,) in [0, 1): the first id
    whose cumulative mass exceeds u * total. Never returns an id of zero probability. -> (R,) long"""
    cdf = probs.cumsum(-1)  # (R, V)
    total = cdf[:, -1:].contiguous()  # (R, 1)
    idx = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * total, right=True)  # (R, 1)
    # u * total can round up to total: then take the last id of positive mass (where the cdf reaches total)
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(idx, last).squeeze(1)


def pick_tokens(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, u: torch.Tensor | None,
                banned: list[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of decoding for a batch. scores (R, V) fp32 logits -> ids (R,), logprobs (R,).

    The log-probability is that of the chosen id under softmax(scores / temperature), before top-k / top-p and
    before `banned` (EOS ids held back by min_new_tokens): the policy's own distribution, the one the GRPO
    ratio is computed against. Greedy (temperature 0) takes the argmax and reports its log-probability under
    softmax(scores), the temperature-1 distribution. banned: a list, or a long tensor on scores' device (no copy to
    the device, which on CUDA waits for the stream).
    """
    if banned is not None and len(banned) > 0:
        banned = torch.as_tensor(banned, dtype=torch.long, device=scores.device)
    else:
        banned = None
    if temperature == 0:
        s = scores
        pick_from = s if banned is None else s.index_fill(-1, banned, float("-inf"))
        ids = pick_from.argmax(-1)
    else:
        s = scores / temperature
        probs = torch.softmax(s, dim=-1)
        if banned is not None:
            probs = probs.index_fill(-1, banned, 0.0)
        ids = sample_inverse_cdf(truncate_probs(probs, top_k, top_p), u)
    logp = s.gather(-1, ids[:, None]).squeeze(1) - torch.logsumexp(s, dim=-1)
    return ids, logp


def stop_text_hits(windows: list[list[int]], active: list[bool], decode, stop_texts) -> list[bool]:
    """Which active rows' last tokens contain a stop text. windows: each row's most recent ids (at least as many
    as the longest stop text has characters, since every token holds at least one); decode: ids -> str.

    Matched on the decoded text, not on token ids: the same text tokenizes differently after different
    characters (SmolLM2: "</item_profile>" alone starts with the token "</", after "</profile>" with "></")."""
    return [a and any(t in decode(w) for t in stop_texts) for w, a in zip(windows, active)]


def stop_text_ends(tokens: torch.Tensor, done: torch.Tensor, lengths: torch.Tensor, a: int, b: int, decode,
                   stop_texts) -> dict[int, int]:
    """Rows whose text first contains a stop text at a step s in [a, b), before the row ended: {row: s + 1}.

    tokens (R, >= b), done and lengths (R,) as the decode loop keeps them (ends by EOS, and by stop texts found
    before step a). One copy to the host, of steps [a + 1 - longest stop text, b) and the flags; each step is then
    matched as if it were checked alone (stop_text_hits on the window ending there), so the answer does not depend
    on how many steps are checked at once."""
    m = max(map(len, stop_texts))
    lo = max(0, a + 1 - m)
    block = torch.cat([tokens[:, lo:b], lengths[:, None], done[:, None].long()], 1).tolist()  # rows: ids, end, done
    ends: dict[int, int] = {}
    for s in range(a, b):
        windows = [row[max(0, s + 1 - m) - lo:s + 1 - lo] for row in block]
        active = [r not in ends and not (row[-1] and row[-2] <= s) for r, row in enumerate(block)]
        for r, hit in enumerate(stop_text_hits(windows, active, decode, stop_texts)):
            if hit:
                ends[r] = s + 1
    return ends


def end_rows(tokens: torch.Tensor, logprobs: torch.Tensor, done: torch.Tensor, lengths: torch.Tensor,
             ends: dict[int, int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """End rows at the steps `ends` ({row: length}) found after the decode loop went on: their tokens after that
    become pad_id and their log-probs 0 (in place), as if the rows had stopped there. -> done, lengths"""
    dev = tokens.device
    rows = torch.tensor(list(ends), dtype=torch.long, device=dev)
    n = torch.tensor(list(ends.values()), dtype=torch.long, device=dev)
    after = torch.arange(tokens.shape[1], device=dev)[None, :] >= n[:, None]  # (h, L)
    tokens[rows] = tokens[rows].masked_fill(after, pad_id)
    logprobs[rows] = logprobs[rows].masked_fill(after, 0.0)
    return done.index_fill(0, rows, True), lengths.index_put((rows,), n)


# ---- the decode step --------------------------------------------------------------------------------------------
def decode_step(model, cache: KVCache, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """One decode step in static shapes: tok (R,) each row's newest id, pos (R,) its position, slot () the cache
    slot it goes to, mask (R, S_max) over every slot of the cache or None -> logits (R, V_model) of the next token;
    writes the cache in place. Each step has the same shapes and takes its changing values as tensors (no Python
    int for torch.compile to specialise on), with no host sync and no branch on a tensor's value, so
    torch.compile(fullgraph=True, dynamic=False) captures it whole and mode="reduce-overhead" replays it as a CUDA
    graph."""
    return model(tok[:, None], position_ids=pos[:, None], attention_mask=mask, kv_cache=cache, cache_index=slot,
                 num_logits_to_keep=1)[:, -1]


@functools.cache
def compiled_decode_step(mode: str) -> Callable:
    """decode_step under torch.compile(fullgraph=True, dynamic=False, mode=mode), one per mode, so that every call of
    generate shares its graphs: one per shape (rows, cache slots), up to torch._dynamo.config.recompile_limit."""
    return torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)


# ---- the sampler ------------------------------------------------------------------------------------------------
def steps_needed(done: torch.Tensor, lengths: torch.Tensor, L: int, sync: bool) -> int:
    """The number of steps the output needs: the step at which the last row here (or, with sync, on any rank)
    ended, L + 1 while some row has not. One host sync."""
    need = torch.where(done, lengths, L + 1).max()
    if sync:
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
    return int(need)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, n: int = 1, eos_ids=(), pad_id: int = 0, vocab_limit: int | None = None,
             seed: int = 0, seeds: list[int] | None = None, min_new_tokens: int = 0,
             sync_ranks: bool | None = None, stop_texts=(), decode=None, chunk_prompts: int = 0,
             check_every: int = 0, compile_decode: bool | str = False) -> SampleOutput:
    """Sample `n` continuations of each prompt (lists of token ids) with a KV cache; see the module docstring.

    temperature: 0 is greedy. top_k 0 / top_p 1.0 turn the truncations off.
    eos_ids: ids that end a row (the tokenizer's eos_ids and any stop ids); the EOS is kept in the row.
    stop_texts / decode: strings that end a row once its generated text contains one (e.g. "</item_profile>",
        several tokens long), checked on `decode(ids)` of the row's latest tokens; the tokens that complete the
        text are kept and the row counts as finished. One decode per unfinished row and step (host side).
    vocab_limit: only ids below it are ever sampled (pass len(tokenizer): Qwen's embedding table is larger than
        its vocabulary); None = every row of the output layer. Log-probabilities are over these ids only.
    seed / seeds: row b*n + j draws from the stream row_seed(seed, b, j), or from seeds[b*n + j] when given.
    min_new_tokens: EOS ids cannot be chosen before this many tokens (as transformers' min_new_tokens); with
        min_new_tokens = max_new_tokens every row has exactly max_new_tokens tokens (benchmarks).
    sync_ranks: all-reduce the steps needed across ranks at each look (check_every); None = when the model is
        sharded (FSDP, see model.is_sharded). Every rank must then call with the same max_new_tokens, check_every
        and number of chunks.
    chunk_prompts: decode at most this many prompts (x n rows) at a time, 0 = all at once. The prompts are
        prefilled together once (a cache of B x P slots, kept until the last chunk starts); each chunk then
        copies its rows into a cache of its own, chunk x n x (P + max_new_tokens) slots, freed before the next.
        The output is the one batch's: same prefill, same seeds, and decode steps whose numbers do not depend on
        the rows beside them (bitwise on one CPU thread, see model/linear.py and the test; with several threads
        and on CUDA, up to the rounding of kernels chosen for another batch size).
    check_every: look at the rows on the host (stop texts; have all rows ended?) every this many decode steps: the
        loop's only host syncs (one a look, two with stop texts); 0 = every step on the CPU (a sync costs nothing
        there, a step much more) and every 8 on CUDA. The outputs do not depend on it; up to check_every - 1 steps
        may run after the last row ended, and a row that completes a stop text keeps sampling until the next look,
        then is cut back.
    compile_decode: run the decode steps through compiled_decode_step: True for mode "reduce-overhead" (CUDA
        graphs) on CUDA and "default" elsewhere, or a mode's name. One compile per shape (rows, P + L cache slots):
        worth it for long decodes of a fixed shape. Off by default: eager steps attend to the slots written so far
        only, and attention over all P + L slots rounds differently (log-probs within ~1e-5 on stories260K).
    Returns SampleOutput with L = number of decode steps run (<= max_new_tokens; fewer when all rows ended).
    """
    B, R = len(prompts), len(prompts) * n
    if B == 0 or n < 1 or max_new_tokens < 1:
        raise ValueError(f"need prompts, n >= 1 and max_new_tokens >= 1 (got {B} prompts, n={n}, "
                         f"max_new_tokens={max_new_tokens})")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompt {next(i for i, p in enumerate(prompts) if not p)} is empty")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling parameters temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if chunk_prompts < 0:
        raise ValueError(f"chunk_prompts must be >= 0 (0: every prompt at once), got {chunk_prompts}")
    if check_every < 0:
        raise ValueError(f"check_every must be >= 0 (0: by device), got {check_every}")
    stop_texts = [t for t in stop_texts if t]
    if stop_texts and decode is None:
        raise ValueError("stop_texts need decode (ids -> text), e.g. tokenizer.decode")
    if seeds is not None and len(seeds) != R:
        raise ValueError(f"seeds has {len(seeds)} entries, expected one per row ({R})")
    if sync_ranks is None:  # a full copy on each rank runs its own forwards: nothing to agree on
        from model import is_sharded

        sync_ranks = is_sharded(model)
    dev = model.model.embed_tokens.weight.device
    L = max_new_tokens

    # ---- left-padded prompt batch and the mask over all key slots: P prompt slots, then L generated ones
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # (B,)
    P = int(lens.max())
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
    mask = None
    if bool((lens != P).any()):  # (B, P + L) bool: real prompt tokens, then every generated slot
        mask = torch.ones(B, P + L, dtype=torch.bool)
        mask[:, :P] = torch.arange(P)[None, :] >= (P - lens)[:, None]
        mask = mask.to(dev)
    ids = ids.to(dev)

    # ---- uniforms of every row's stream, drawn up front (CPU generators: the same numbers on any device)
    u = None
    if temperature > 0:
        if seeds is None:
            seeds = [row_seed(seed, b, j) for b in range(B) for j in range(n)]
        u = torch.stack([torch.rand(L, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                         for s in seeds]).to(dev)  # (R, L)

    # ---- prefill the B distinct prompts once (last position's logits only); one prefill serves every chunk
    step = min(chunk_prompts or B, B)
    direct = n == 1 and step == B  # the decode writes straight into the prefill's cache
    cache = model.new_cache(B, P + (L if direct else 0))
    logits = model(ids, attention_mask=None if mask is None else mask[:, :P], kv_cache=cache,
                   num_logits_to_keep=1)[:, -1]  # (B, V_model)

    step_fn = None
    if compile_decode:
        mode = compile_decode if isinstance(compile_decode, str) else \
            "reduce-overhead" if dev.type == "cuda" else "default"
        step_fn = compiled_decode_step(mode)
    decoder = _Decoder(model, L, temperature, top_k, top_p, sorted(set(eos_ids)), pad_id,
                       vocab_limit or model.config.vocab_size, min_new_tokens, sync_ranks, stop_texts, decode,
                       check_every or (1 if dev.type == "cpu" else 8), step_fn)
    parts = []
    with contextlib.nullcontext() if compile_decode else packed_weights(model):  # eager CPU decode: see linear.py
        for a in range(0, B, step):
            rows = slice(a, min(a + step, B))
            # rows b*n + j of this chunk: a copy of prompt b's cache each (group sampling: one prefill, n samples)
            chunk_cache = cache if direct else cache.repeat_interleave(n, max_len=P + L, rows=rows)
            if rows.stop == B:
                cache = None  # the prefill's cache is not needed once the last chunk has its copy
            parts.append(decoder(chunk_cache, logits[rows].repeat_interleave(n, dim=0), lens[rows],
                                 None if mask is None else mask[rows].repeat_interleave(n, dim=0),
                                 None if u is None else u[rows.start * n:rows.stop * n], n))
            del chunk_cache
    return parts[0] if len(parts) == 1 else _concat(parts, pad_id)


@dataclass
class _Decoder:
    """The decode loop of `generate` over one chunk of rows, under the call's sampling settings."""
    model: object
    L: int  # max_new_tokens
    temperature: float
    top_k: int
    top_p: float
    eos_ids: list[int]
    pad_id: int
    V: int  # vocab_limit
    min_new_tokens: int
    sync_ranks: bool
    stop_texts: list[str]
    decode: object
    check_every: int  # look at the host every this many steps
    step: Callable | None  # compile_decode's compiled decode_step; None: the eager cached forward

    def __call__(self, cache: KVCache, logits: torch.Tensor, lens: torch.Tensor, mask: torch.Tensor | None,
                 u: torch.Tensor | None, n: int) -> SampleOutput:
        """cache: the rows' prefilled KV cache of P + L slots; logits (R, V_model) of each row's last prompt
        position; lens (R / n,) prompt lengths; mask (R, P + L) or None; u (R, L) the rows' uniforms.

        The loop keeps every flag on the device and syncs with the host only every check_every steps (stop texts,
        then the number of steps needed). Each step's forward is the cached forward over the P + t + 1 slots
        written so far or, with compile_decode, the compiled decode_step over all P + L."""
        model, L, pad_id = self.model, self.L, self.pad_id
        R, dev = logits.shape[0], logits.device
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        banned = eos if self.min_new_tokens > 0 and self.eos_ids else None  # on the device once, not every step
        pos = lens.repeat_interleave(n).to(dev)  # (R,) position of the next token of each row
        P = cache.pos
        slot = torch.full((), P, dtype=torch.long, device=dev)  # cache slot of step 0's token
        if self.step is not None and dev.type == "cuda":
            for buf in cache.k + cache.v:  # CUDA graphs may write them in place; a new cache re-records, no recompile
                torch._dynamo.mark_static_address(buf)

        tokens = torch.full((R, L), pad_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(R, L, dtype=torch.float32, device=dev)
        done = torch.zeros(R, dtype=torch.bool, device=dev)
        lengths = torch.full((R,), L, dtype=torch.long, device=dev)
        checked, steps = 0, L  # steps [0, checked) were looked at on the host
        for t in range(L):
            scores = logits[:, :self.V].float()  # (R, V) never an id >= vocab_limit
            tok, lp = pick_tokens(scores, self.temperature, self.top_k, self.top_p, None if u is None else u[:, t],
                                  banned if t < self.min_new_tokens else None)
            tok = tok.masked_fill(done, pad_id)
            tokens[:, t] = tok
            logprobs[:, t] = lp.masked_fill(done, 0.0)
            ended = torch.isin(tok, eos) & ~done  # (R,) rows whose first EOS is this token
            lengths = torch.where(ended, t + 1, lengths)
            done = done | ended
            if t + 1 == L or (t + 1) % self.check_every == 0:
                if self.stop_texts:  # rows whose text contains a stop text since the last look
                    ends = stop_text_ends(tokens, done, lengths, checked, t + 1, self.decode, self.stop_texts)
                    if ends:
                        done, lengths = end_rows(tokens, logprobs, done, lengths, ends, pad_id)
                checked = t + 1
                needed = steps_needed(done, lengths, L, self.sync_ranks)
                if needed <= t + 1:  # every row (on every rank) has ended, maybe a few steps ago
                    steps = needed
                    break
            if t + 1 == L:
                break
            if self.step is not None:  # the compiled static-shape step
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs (logits) are consumed
                logits = self.step(model, cache, tok, pos + t, slot + t, mask)
            else:  # eager: attend to the P + t + 1 slots written so far
                logits = model(tok[:, None], position_ids=(pos + t)[:, None],
                               attention_mask=None if mask is None else mask[:, :P + t + 1],
                               kv_cache=cache, num_logits_to_keep=1)[:, -1]
        lengths = torch.where(done, lengths, steps)
        return SampleOutput(tokens[:, :steps], logprobs[:, :steps], lengths, done, pos.clone())


def _concat(parts: list[SampleOutput], pad_id: int) -> SampleOutput:
    """The chunks' outputs as one, in row order; each chunk's tokens (log-probs) padded with pad_id (0) up to the
    longest chunk's number of steps, as a row of one batch is after it ends."""
    L = max(p.tokens.shape[1] for p in parts)

    def right_pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, L - t.shape[1]), value=value)

    return SampleOutput(torch.cat([right_pad(p.tokens, pad_id) for p in parts]),
                        torch.cat([right_pad(p.logprobs, 0.0) for p in parts]),
                        torch.cat([p.lengths for p in parts]), torch.cat([p.finished for p in parts]),
                        torch.cat([p.prompt_lens for p in parts]))


# ---- text in, text out ------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Each prompt is raw text (encoded with the tokenizer's special tokens, e.g. BOS) or a list of chat messages
    [{"role", "content"}] rendered with the model's chat template."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(tokenizer.encode(p))
        elif isinstance(p, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            out.append(tokenizer.encode_chat(p))
        else:
            raise ValueError(f"prompt {i}: expected a string or a list of {{'role', 'content'}} messages, "
                             f"got {type(p).__name__}")
    return out
