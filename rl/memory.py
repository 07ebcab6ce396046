"""Memory per device: what each phase of a training step holds (a plan from the model's config and the trainer's
flags, before any GPU is touched), and what it did hold (peaks measured per phase).

    plan = grpo_plan(cfg, model_shapes(model_config("Qwen/Qwen3-8B")), gpus=8)   # {phase: {part: bytes}}
    peaks = PhasePeaks(device); ...; peaks.end("rollout"); ...; peaks.metrics()  # measured, where measurable

The plan counts the tensors our code makes, part by part, in bytes per rank:
  - weights: the policy's fp32 masters (what AdamW updates), its fp32 gradients and Adam's m and v, each sharded over
    the ranks by FSDP (16 bytes a trainable parameter / gpus); the frozen reference (and a separate recommender) in
    the compute dtype, sharded; under FSDP the gathered compute-dtype copies: every block at once during a rollout
    (rl/distributed.gathered), else two blocks at a time (the one running, the one prefetched) and the root
    (embeddings and head), which stays gathered once it ran; one process without FSDP holds whole models and,
    computing in bf16 under autocast, a bf16 copy of the policy's weights (autocast's cast cache);
  - the rollout: the KV cache in the compute dtype, layers x 2 x kv_heads x head_dim per slot: the prefill's
    prompts x P slots, and a chunk's prompts x G x (P + new) slots (--rollout-tokens); the prefill's activations
    and attention mask; the decode step's (rows, vocab) float32 temporaries;
  - log-probs: a micro-batch's forward, its logits as chunks of --logprob-chunk-tokens positions (or the whole
    (rows, length, vocab) block) with their float32 copies;
  - the update: the activations a micro-batch keeps for the backward, per token and layer from the shapes of the
    block (see `block_saved_bytes`), or with activation checkpointing each block's input and one
    block recomputed at a time; the head's logits as above; gradient and reduce-scatter buffers under FSDP.
Not counted: the CUDA context, NCCL's buffers and the caching allocator's fragmentation (--reserve-gib of
scripts/plan_memory.py), the data, and the kernels' own workspaces. The CPU test (tests/test_plan_memory.py)
measures the same parts with `LiveBytes` on a small model and holds the plan to them.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024 ** 3


# ---- shapes ---------------------------------------------------------------------------------------------------------
@dataclass
class Shapes:
    """What the plan needs of a model: parameter counts and the sizes of its tensors."""
    params: int  # every parameter, a tied head counted once
    block: int  # one transformer block
    root: int  # embeddings, final norm and (untied) head: FSDP's root module
    layers: int
    hidden: int  # D
    intermediate: int  # F
    heads: int  # H
    kv_heads: int
    head_dim: int
    vocab: int  # rows of the output layer
    qk_norm: bool

    def kv_bytes_per_slot(self, c: int) -> int:
        """KV-cache bytes of one token slot: keys and values of every layer, in c-byte floats."""
        return self.layers * 2 * self.kv_heads * self.head_dim * c


def model_shapes(cfg) -> Shapes:
    """Shapes of a ModelConfig, its parameters counted on the meta device (no memory)."""
    from model.checkpoint import build_model

    m = build_model(cfg, "meta")
    block = sum(p.numel() for p in m.model.layers[0].parameters())
    total = sum(p.numel() for p in m.parameters())
    return Shapes(params=total, block=block, root=total - block * cfg.num_hidden_layers,
                  layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                  heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  vocab=cfg.vocab_size, qk_norm=cfg.qk_norm)


def trainable_params(s: Shapes, cfg) -> int:
    """Parameters AdamW updates under the run's flags: all, the top --trainable-layers (with the final norm and an
    untied head), or the LoRA adapters (rank x (in + out) for each targeted projection of each block)."""
    if getattr(cfg, "lora_rank", 0):
        D, F, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim
        sizes = {"q_proj": D + q, "k_proj": D + kv, "v_proj": D + kv, "o_proj": q + D,
                 "gate_proj": D + F, "up_proj": D + F, "down_proj": F + D}
        return s.layers * cfg.lora_rank * sum(sizes[t] for t in cfg.lora_targets)
    if getattr(cfg, "trainable_layers", 0):
        head = s.root - s.vocab * s.hidden - s.hidden  # 0 when tied, else the head
        return cfg.trainable_layers * s.block + s.hidden + max(0, head)
    return s.params


# ---- activations ----------------------------------------------------------------------------------------------------
def block_saved_bytes(s: Shapes, c: int) -> int:
    """Bytes one block keeps for the backward per token, computing in c-byte floats (2: bf16 through FSDP's
    param_dtype, 4: fp32), as model/transformer.py makes them (checked tensor by tensor with saved-tensor hooks):
      two RMSNorms: the input in fp32 (a copy when c = 2), its fp32 rsqrt, the normalised input and the scaled
      output (2c per element);
      Qwen3's q/k norms: the fp32 input and rsqrt and the normalised input per head (RoPE keeps nothing);
      attention: q, k, v after RoPE and the output (SDPA; o_proj reads the output as a view), the log-sum-exp
      per head (fp32);
      the MLP: gate, silu(gate), up, and their product (down_proj's input).
    The attention mask is per micro-batch, not per token: see `mask_bytes`."""
    D, F, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim
    norms = 2 * ((4 + 2 * c) * D + 4)
    qk = (4 + c) * (q + kv) + 4 * (s.heads + s.kv_heads) if s.qk_norm else 0
    attention = c * (2 * q + 2 * kv) + 4 * s.heads
    mlp = 4 * c * F
    return norms + qk + attention + mlp


def forward_working_bytes(s: Shapes, c: int) -> int:
    """Bytes per token alive at once inside one block's forward without autograd (prefill, old and reference
    log-probs): the residual and the normalised input, and the MLP's three intermediates, or attention's q, k, v
    and output, whichever is larger, plus the norm's fp32 copy."""
    D, F, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim
    return c * (2 * D + max(3 * F, 2 * q + 2 * kv)) + 4 * D


def backward_working_bytes(s: Shapes, c: int) -> int:
    """Gradient temporaries per token while one block runs its backward (an estimate: the MLP's three and the
    residual stream's)."""
    return c * (3 * s.intermediate + 3 * s.hidden)


def mask_bytes(rows: int, T: int, c: int) -> int:
    """An attention call's mask over a padded micro-batch: SDPA turns the (rows, 1, T, T) bool mask into an
    additive one of the query's dtype, which it keeps for the backward."""
    return rows * T * T * c


def logits_bytes(rows: int, L: int, vocab: int, chunk: int, c: int, training: bool, entropy: bool,
                 temperature: float = 1.0) -> int:
    """The head's working set for `rows` completions of L tokens (rl/logprobs.py), per logit: the logits (c bytes),
    their float32 copy (none for fp32 logits at temperature 1), logsumexp's temporary, the entropy's softmax and
    product, and in the backward the gradient of the float32 logits, logsumexp's and the gather's temporaries and
    the gradient of the logits (recomputed a chunk at a time when chunk > 0, else with the float32 copy kept)."""
    positions = rows * L if not chunk else min(chunk, rows * L)
    copy = 4 if c < 4 or temperature != 1.0 else 0
    forward = c + copy + 4 + ((copy + 8) if entropy else 0)
    if not training:
        return positions * vocab * forward
    backward = (copy or c) + 12 + c
    return positions * vocab * max(forward, backward if chunk else backward + c)


# ---- the plans ------------------------------------------------------------------------------------------------------
def _weights(s: Shapes, trainable: int, gpus: int, c: int, with_grads: bool, reference: Shapes | None,
             others: list[Shapes]) -> dict[str, int]:
    """The weights a rank holds between phases: the policy's fp32 masters, Adam's m and v (and the gradients during
    an update) sharded over the ranks; the reference and other frozen models in the compute dtype, sharded."""
    parts = {"policy fp32 masters": 4 * s.params // gpus, "Adam m, v (fp32)": 8 * trainable // gpus}
    if with_grads:
        parts["gradients (fp32)"] = 4 * trainable // gpus
    if reference is not None:
        parts["reference weights"] = c * reference.params // gpus
    for i, o in enumerate(others):
        parts[f"frozen model {i + 1} weights"] = c * o.params // gpus
    return parts


def _gathered(s: Shapes, sharded: bool, c: int, whole: bool, reference: Shapes | None) -> dict[str, int]:
    """Compute-dtype copies of sharded weights: FSDP's gathered blocks and roots (a root keeps its parameters
    gathered once it ran), or autocast's bf16 copy in one process (none when one process computes in fp32)."""
    if not sharded:
        return {"autocast bf16 copy of the policy": c * s.params} if c < 4 else {}
    if whole:
        parts = {"policy gathered (all blocks)": c * s.params}
    else:
        parts = {"policy root gathered (embeddings, head)": c * s.root, "two blocks gathered": 2 * c * s.block}
    if reference is not None:
        parts["reference root gathered"] = c * reference.root
    return parts


def rollout_parts(s: Shapes, prompts: int, G: int, P: int, L: int, chunk: int, c: int, top_p: float) -> dict[str, int]:
    """The sampler's own tensors (model/sampler.generate) at their peak: during the prefill, or during the first
    chunk's decode, whichever is larger (the prefill's cache lives until the last chunk copies its rows)."""
    slot = s.kv_bytes_per_slot(c)
    chunks = -(-prompts // chunk)
    direct = G == 1 and chunks == 1  # the decode writes into the prefill's own cache
    prefill_cache = prompts * (P + (L if direct else 0)) * slot
    prefill = {"KV cache (prefill: prompts x P)": prefill_cache,
               "prefill activations": prompts * P * forward_working_bytes(s, c),
               "prefill attention mask": prompts * P * P * (1 + c)}
    rows = chunk * G
    decode = {"KV cache (prefill: prompts x P)": 0 if direct else prefill_cache,
              "KV cache (a chunk's rows x (P + new))": 0 if direct else rows * (P + L) * slot,
              "decode step logits and sampling temporaries": rows * s.vocab * (c + 20 + (21 if top_p < 1 else 0))}
    return prefill if sum(prefill.values()) > sum(decode.values()) else decode


def logprob_parts(s: Shapes, rows: int, P: int, L: int, chunk: int, c: int, temperature: float = 1.0,
                  shared: bool = False) -> dict[str, int]:
    """One micro-batch's no-grad forward for old or reference log-probs: a block's working set, or the head's
    once the blocks are done, whichever is larger; with shared prompts (rl/rollout.shared_prompt_logprobs) also
    the rows' KV cache of P + L slots, held through the forward (planned per row: an upper bound)."""
    T = P + L
    blocks = rows * T * forward_working_bytes(s, c) + rows * T * T * (1 + c)  # the bool mask and SDPA's float one
    head = logits_bytes(rows, L, s.vocab, chunk, c, training=False, entropy=False, temperature=temperature)
    cache = {"rows' KV cache (shared prompts)": rows * T * s.kv_bytes_per_slot(c)} if shared else {}
    if blocks >= head:
        return {"forward activations and attention mask (one block)": blocks, **cache}
    return {"logits": head, "hidden states": rows * (L + 1) * s.hidden * (c + 4), **cache}


def update_parts(s: Shapes, rows: int, P: int, L: int, chunk: int, c: int, checkpointing: bool, sharded: bool,
                 trainable: int, entropy: bool = True, temperature: float = 1.0) -> dict[str, int]:
    """One micro-batch's forward and backward at its peak: at the head's backward (every activation kept), or
    during the first block's backward (checkpointing: inputs kept, one block recomputed), whichever is larger."""
    T = P + L
    tokens = rows * T
    saved_mask = rows * T * T  # the bool mask, shared by the layers
    head = logits_bytes(rows, L, s.vocab, chunk, c, training=True, entropy=entropy, temperature=temperature)
    final = rows * (L + 1) * (4 + 2 * c) * s.hidden  # the final norm over the kept positions
    if checkpointing:
        kept = {"block inputs (activation checkpointing)": tokens * s.layers * c * s.hidden + saved_mask + final}
        at_head = {**kept, "logits (forward and backward)": head}
        at_block = {**kept, "one block recomputed": tokens * block_saved_bytes(s, c) + mask_bytes(rows, T, c),
                    "block backward temporaries": tokens * backward_working_bytes(s, c)}
    else:
        kept = {"activations kept for the backward": tokens * s.layers * block_saved_bytes(s, c)
                + s.layers * mask_bytes(rows, T, c) + saved_mask + final}
        at_head = {**kept, "logits (forward and backward)": head}
        at_block = {**kept, "block backward temporaries": tokens * backward_working_bytes(s, c)}
    parts = at_head if sum(at_head.values()) >= sum(at_block.values()) else at_block
    if sharded:  # a block's gradients in the compute dtype, cast to fp32 for the reduce-scatter
        block_trainable = s.block if trainable == s.params else min(s.block, trainable)
        parts["block gradients and reduce-scatter buffer"] = (c + 4) * block_trainable
        if trainable == s.params:  # the head's gradient, from the first step of the backward to the root's reduce
            parts["head gradient (until the root's reduce-scatter)"] = c * s.vocab * s.hidden
    return parts


@dataclass
class Phases:
    """{phase: {part: bytes}} per rank, and the figures it was made from."""
    phases: dict
    info: dict

    def totals(self) -> dict[str, int]:
        return {k: sum(v.values()) for k, v in self.phases.items()}


def load_parts(s: Shapes, gpus: int, sharded: bool, c: int, reference: Shapes | None,
               others: list[Shapes]) -> dict[str, int]:
    """rl/loop.build_models: one process loads the fp32 policy whole, then the reference (and a recommender) whole
    in the compute dtype. Under FSDP each model is sharded on the meta device before its weights are read and each
    rank reads only its rows of each tensor (rl/loop.load_on_ranks): a rank holds its shards, and in passing one
    tensor's rows (a few MB, not counted)."""
    frozen = [reference] * (reference is not None) + others
    if not sharded:
        parts = {"policy fp32": 4 * s.params}
        if reference is not None:
            parts["reference weights"] = c * reference.params
        for i, o in enumerate(others):
            parts[f"frozen model {i + 1} weights"] = c * o.params
        return parts
    parts = {"policy fp32 shards": 4 * s.params // gpus}
    if frozen:
        parts["frozen shards"] = sum(c * m.params // gpus for m in frozen)
    return parts


def grpo_plan(cfg, s: Shapes, gpus: int, c: int = 2, recommender: Shapes | None = None,
              fsdp: bool | None = None, cpu: bool = False) -> Phases:
    """Per-rank memory of each phase of a GRPO step (rl/grpo_trainer.grpo_step) under cfg's flags. c: bytes of the
    compute dtype (2: bf16, 4: fp32); recommender: the shapes of a separate --recommender (None: the reference);
    fsdp: whether the models are sharded (default: with several GPUs; --fsdp shards on one); cpu: a CPU process,
    whose fp32 sampler holds a packed copy of the policy's weights while it decodes (model/linear.py)."""
    sharded = gpus > 1 if fsdp is None else fsdp
    from .distributed import Dist
    from .grpo_trainer import rollout_chunk_prompts
    from .loop import rank_share

    prompts = len(rank_share(cfg.prompts_per_step, cfg.mini_batch_prompts, Dist(world=gpus)))  # checks the split
    G, P, L = cfg.group_size, cfg.max_prompt_tokens, cfg.max_new_tokens
    chunk = rollout_chunk_prompts(cfg, prompts)
    trainable = trainable_params(s, cfg)
    reference = None if cfg.lora_rank else s  # a LoRA reference is the policy with its adapters off
    others = [recommender] if recommender is not None else []
    held = _weights(s, trainable, gpus, c, False, reference, others)
    rows = cfg.micro_batch_rows
    phases = {
        "load": load_parts(s, gpus, sharded, c, reference, others),
        "rollout": {**held, **_gathered(s, sharded, c, True, reference),
                    **rollout_parts(s, prompts, G, P, L, chunk, c, cfg.top_p),
                    **({"packed decode weights": s.params * 4} if cpu and c == 4 and not sharded else {})},
        "old/ref log-probs": {**held, **_gathered(s, sharded, c, False, reference),
                              **logprob_parts(s, rows, P, L, cfg.logprob_chunk_tokens, c, cfg.temperature,
                                              cfg.share_prompt_forward and G > 1)},
        "update": {**_weights(s, trainable, gpus, c, True, reference, others),
                   **_gathered(s, sharded, c, False, reference),
                   **update_parts(s, rows, P, L, cfg.logprob_chunk_tokens, c, cfg.activation_checkpointing,
                                  sharded, trainable, temperature=cfg.temperature)},
    }
    info = dict(trainer="grpo", params=s.params, trainable=trainable, gpus=gpus, fsdp=sharded, compute_bytes=c,
                prompts_per_rank=prompts, group_size=G, prompt_tokens=P, new_tokens=L, rollout_chunk_prompts=chunk,
                rollout_chunks=-(-prompts // chunk), micro_batch_rows=rows,
                logprob_chunk_tokens=cfg.logprob_chunk_tokens, activation_checkpointing=cfg.activation_checkpointing)
    return Phases(phases, info)


def dpo_plan(cfg, s: Shapes, gpus: int, c: int = 2, explorers: list[Shapes] | None = None,
             recommender: Shapes | None = None, fsdp: bool | None = None) -> Phases:
    """Per-rank memory of LettinGo's stages (rl/lettingo.py: each explorer whole in the compute dtype sampling 8
    prompts x --samples at a time) and of a DPO step (rl/dpo_trainer.dpo_step: chosen and rejected rows of
    --micro-batch-pairs pairs, prompt + --max-new-tokens positions)."""
    from .distributed import Dist
    from .loop import rank_share

    sharded = gpus > 1 if fsdp is None else fsdp
    rank_share(cfg.pairs_per_step, cfg.pairs_per_step, Dist(world=gpus))  # the pairs split over the ranks
    P, L = cfg.max_prompt_tokens, cfg.max_new_tokens
    trainable = trainable_params(s, cfg)
    reference = None if cfg.lora_rank else s
    others = [recommender] if recommender is not None else []
    rows = 2 * cfg.micro_batch_pairs
    phases = {}
    for i, e in enumerate(explorers or []):
        phases[f"explore ({cfg.explorers[i]})"] = {
            "explorer weights (whole)": c * e.params,
            **rollout_parts(e, 8, max(int(cfg.samples), 1), P, L, 8, c, 1.0)}
    phases["load"] = load_parts(s, gpus, sharded, c, reference, others)
    # computed once, before the optimizer exists and before the policy's first forward
    before_training = {k: v for k, v in _weights(s, trainable, gpus, c, False, reference, others).items()
                       if not k.startswith("Adam")}
    phases["reference log-probs"] = {**before_training,
                                     **{k: v for k, v in _gathered(s, sharded, c, False, reference).items()
                                        if not k.startswith("policy")},
                                     **logprob_parts(s, rows, P, L, cfg.logprob_chunk_tokens, c,
                                                     shared=cfg.share_prompt_forward)}
    phases["update"] = {**_weights(s, trainable, gpus, c, True, reference, others),
                        **_gathered(s, sharded, c, False, reference),
                        **update_parts(s, rows, P, L, cfg.logprob_chunk_tokens, c, cfg.activation_checkpointing,
                                       sharded, trainable, entropy=False)}
    info = dict(trainer="dpo", params=s.params, trainable=trainable, gpus=gpus, fsdp=sharded, compute_bytes=c,
                micro_batch_rows=rows, prompt_tokens=P, new_tokens=L, logprob_chunk_tokens=cfg.logprob_chunk_tokens,
                activation_checkpointing=cfg.activation_checkpointing)
    return Phases(phases, info)


# ---- measured -------------------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, counted by intercepting every operator while active (any
    device; used on the CPU, where torch keeps no allocator statistics). A storage counts from the operator that
    made it to its release; storages made before (weights) are added with `track`. Views share their storage
    and count once.

        with LiveBytes() as live:
            live.track(model.parameters())
            loss = model(x).sum(); loss.backward()
        live.peak
    """

    current: "LiveBytes | None" = None

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __enter__(self):
        LiveBytes.current = self
        return super().__enter__()

    def __exit__(self, *exc):
        LiveBytes.current = None
        return super().__exit__(*exc)

    def track(self, tensors):
        for t in tensors:
            self._add(t)

    def reset_peak(self):
        self.peak = self.live

    def _add(self, t: torch.Tensor):
        if t.is_mkldnn:  # oneDNN's opaque layout (the sampler's packed weights, model/linear.py): no storage
            owner, key, size = t, id(t), t.numel() * t.element_size()
        else:
            owner = t.untyped_storage()
            key, size = owner.data_ptr(), owner.nbytes()
        if size == 0 or key in self._sizes:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(owner, self._release, key)

    def _release(self, key: int):
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t)
        return out


def return_freed_memory_to_os(threshold: int = 128 * 1024) -> bool:
    """Serve every allocation of `threshold` bytes or more by its own mmap, returned to the OS when freed (glibc's
    mallopt(M_MMAP_THRESHOLD)). glibc otherwise raises that threshold as large blocks are freed, and the freed
    activations of one step stay in the heap, resident, under the next step's: a CPU GRPO step of SmolLM2-135M
    peaked ~0.7 GB higher (bench/bench_grpo.py). The cost is a page fault per fresh page of a large tensor.
    Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


_rss_peak_before_reset = 0  # the process's peak resident set before the last reset_rss_high_water()


def rss_high_water() -> int | None:
    """The peak resident set size in bytes since the process started or reset_rss_high_water() (Linux: VmHWM of
    /proc/self/status), None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def reset_rss_high_water():
    """Start the high-water mark again from the current resident set (Linux: 5 to /proc/self/clear_refs); the
    peak so far is kept for process_peak_rss."""
    global _rss_peak_before_reset
    _rss_peak_before_reset = max(_rss_peak_before_reset, rss_high_water() or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def process_peak_rss() -> int | None:
    """The process's peak resident set size in bytes over its whole life, resets included (getrusage's ru_maxrss
    forgets what a reset cleared)."""
    now = rss_high_water()
    return None if now is None else max(now, _rss_peak_before_reset)


class PhasePeaks:
    """The peak memory of each phase of a step: allocated memory from torch.cuda's statistics on CUDA; elsewhere
    the bytes of an active `LiveBytes` when there is one, else the process's resident set (Linux), which also
    counts the allocator's slack and everything outside torch. end(name) closes a phase and starts the next."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peaks: dict[str, int] = {}
        self._reset()

    def _reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif LiveBytes.current is not None:
            LiveBytes.current.reset_peak()
        else:
            reset_rss_high_water()

    def end(self, name: str):
        if self.device.type == "cuda":
            self.peaks[name] = torch.cuda.max_memory_allocated(self.device)
        elif LiveBytes.current is not None:
            self.peaks[name] = LiveBytes.current.peak
        elif (rss := rss_high_water()) is not None:
            self.peaks[name] = rss
        self._reset()

    def metrics(self) -> dict[str, float]:
        """mem_peak_gib_<phase> of each measured phase."""
        return {f"mem_peak_gib_{k}": v / GIB for k, v in self.peaks.items()}
