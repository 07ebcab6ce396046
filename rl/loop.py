"""What the trainers share, as plain functions: the flags, the data order, the models, the optimizer and its
schedule, resume, and the three questions of the loop (log, validate, save?). Each trainer writes its own loop
in view: for step in range(start, end): step -> log -> validate -> save."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from model import ModelConfig, default_dtype, load_model, load_tokenizer, resolve_model
from model.checkpoint import build_model
from model.freeze import freeze_all_but_top
from model.lora import PROJECTIONS, AdaptersOff, add_lora, add_lora_as, adapter_weights, initial_adapter_weights

from . import checkpoints
from . import distributed as dist
from .config import ConfigError, must, one_of, save_config
from .memory import return_freed_memory_to_os
from .optim import make_optimizer, make_scheduler
from .tracking import Tracker


@dataclass
class RunConfig:
    """Flags every trainer shares: optimisation schedule, run length, checkpoints, validation, logging."""
    lr: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: str = field(default="constant", metadata={"help": "constant | cosine (after the warmup)"})
    grad_clip: float = 1.0
    max_steps: int = 30
    seed: int = 0
    save_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint of --run-dir"})
    stop_after: int = field(default=0, metadata={"help": "stop this run after N steps (the schedule still "
                                                         "spans max_steps); continue later with --resume"})
    val_every: int = 10
    val_examples: int = 32
    log_text_every: int = 5
    activation_checkpointing: bool = False
    logprob_chunk_tokens: int = field(default=1024, metadata={
        "help": "log-probs and entropies of a micro-batch are computed this many positions at a time from the final "
                "hidden states (lm_head per chunk, recomputed in the backward), so its whole (rows, length, vocab) "
                "logit block never exists; 0: the whole block at once"})
    share_prompt_forward: bool = field(default=True, metadata={
        "help": "rows that share a prompt (GRPO's G samples, DPO's chosen and rejected) run it once per micro-batch, "
                "their completions on its copied keys/values (rl/rollout.shared_prompt_logprobs): the same "
                "log-probs, fewer tokens"})
    device: str = field(default="", metadata={"help": "cpu | cuda; empty: cuda when available"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun with one process, still join the process group (nccl on CUDA) and shard with "
                "FSDP: the multi-GPU code path on one device, for checks; several processes always shard"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA adapters of this rank on the policy; 0: full weights"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale alpha (the update is alpha / rank * BA)"})
    lora_dropout: float = 0.0
    init_adapter: str = field(default="", metadata={
        "help": "with --lora-rank: train this LoRA adapter (PEFT layout, e.g. an SFT run's checkpoints/step_N/adapter) "
                "on, not fresh adapters; its own rank, alpha and targets apply. The reference stays --model"})
    lora_targets: list = field(default_factory=lambda: list(PROJECTIONS), metadata={
        "help": "projections that get adapters (default: every attention and MLP projection)"})
    trainable_layers: int = field(default=0, metadata={
        "help": "train only the top N blocks, the final norm and the head (the rest runs without autograd); 0: all"})
    dtype: str = field(default="", metadata={
        "help": "compute dtype: bfloat16 | float32; empty: bfloat16 on CUDA, float32 on CPU (bfloat16 on a CPU "
                "is slow, for tests of the GPU path). The policy's master weights stay float32"})

    def check(self):
        """The flags every trainer shares, each in its range (rl/config.py reports a failure as exit 2)."""
        must(self.lr > 0, "lr", "must be > 0", self.lr)
        must(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        must(self.grad_clip > 0, "grad_clip", "must be > 0", self.grad_clip)
        one_of("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        for name in ("warmup_steps", "max_steps", "save_every", "stop_after", "val_every", "val_examples",
                     "log_text_every", "logprob_chunk_tokens"):
            must(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        must(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        must(self.device in ("", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             "must be cpu, cuda, cuda:N or empty", self.device)
        one_of("dtype", self.dtype, ("",) + tuple(DTYPES))
        must(self.lora_rank >= 0, "lora_rank", "must be >= 0 (0: full weights)", self.lora_rank)
        must(self.lora_alpha > 0, "lora_alpha", "must be > 0", self.lora_alpha)
        must(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)", self.lora_dropout)
        for t in self.lora_targets:
            one_of("lora_targets", t, PROJECTIONS)
        must(self.trainable_layers >= 0, "trainable_layers", "must be >= 0 (0: all)", self.trainable_layers)
        must(not self.init_adapter or self.lora_rank > 0, "init_adapter", "needs --lora-rank (any value > 0)",
             self.init_adapter)
        must(not (self.lora_rank and self.trainable_layers), "trainable_layers",
             "cannot be combined with --lora-rank (use one or the other)", self.trainable_layers)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_indices(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """Pool indices of a step's global batch: consecutive slices of one seeded permutation per epoch, so the
    order depends only on (seed, step): a resumed run sees exactly the batches it would have seen."""
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        e = pos // n
        if e not in orders:
            orders[e] = epoch_order(n, e, seed)
        out.append(orders[e][pos % n])
    return out


def rank_share(n_global: int, mini: int, d: dist.Dist) -> list[int]:
    """Positions in the global batch that this rank handles: its slice of every mini-batch, so that a global
    mini-batch is the same set of examples whatever the number of ranks."""
    if n_global % mini or mini % d.world:
        raise ConfigError(f"the batch ({n_global}) must be a multiple of the mini-batch ({mini}), itself a multiple "
                          f"of the number of ranks ({d.world}): check --prompts-per-step / --mini-batch-prompts "
                          f"(GRPO) or --pairs-per-step (DPO) against --nproc_per_node")
    per = mini // d.world
    return [mb + d.rank * per + i for mb in range(0, n_global, mini) for i in range(per)]


@dataclass
class Models:
    policy: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: object
    rec_model: torch.nn.Module
    rec_tokenizer: object


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(name: str, device) -> torch.dtype:
    """The --dtype flag: bfloat16 | float32; empty: bfloat16 on CUDA, float32 on CPU."""
    if not name:
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)} (or empty for the device's default)")
    return DTYPES[name]


def build_models(cfg, resume_from: Path | None, d: dist.Dist) -> Models:
    """Policy, frozen reference, recommender, from the run's flags (--model, --recommender, --dtype, LoRA, ...).

    The policy keeps fp32 master weights (what AdamW updates) and computes in --dtype: through FSDP's param_dtype
    when sharded, else under torch.autocast (`Transformer.autocast_dtype`). With --lora-rank the policy is the
    base model with trainable adapters, and the reference is the same model with its adapters switched off (no
    second copy); else the reference is the starting model, loaded again in the compute dtype and frozen.
    --trainable-layers N leaves only the top N blocks (and the norm and head) trainable. --recommender
    reference makes the reference the recommender too. A resumed run loads the policy (or its adapter) from
    the checkpoint `resume_from`. Under FSDP each model is sharded before its weights are read (`load_on_ranks`).
    """
    compute = resolve_dtype(cfg.dtype, d.device)
    if d.device.type == "cpu":
        return_freed_memory_to_os()  # a step's freed activations leave the resident set (rl/memory.py)
    with dist.local_main_first(d):  # each source is converted or downloaded once per node
        for source in dict.fromkeys(s for s in (cfg.model, cfg.recommender) if s != "reference"):
            resolve_model(source)
    tokenizer = load_tokenizer(cfg.model)
    lora = bool(cfg.lora_rank)
    start_from = cfg.model if lora or not resume_from else str(resume_from / "model")
    adapter = (resume_from / "adapter" if resume_from else cfg.init_adapter) if lora else None  # "": fresh

    def trainable(model) -> dict[str, torch.Tensor]:
        """Adapters or frozen layers, as the flags say; returns the adapters' values (see load_on_ranks)."""
        if adapter:
            add_lora_as(model, adapter)
            return adapter_weights(model, adapter)
        if lora:
            add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
            return initial_adapter_weights(model, cfg.seed)
        if cfg.trainable_layers:
            freeze_all_but_top(model, cfg.trainable_layers)
        return {}

    def frozen(model) -> dict:
        model.requires_grad_(False)
        return {}

    policy = load_on_ranks(start_from, torch.float32, d, compute, trainable)
    if not d.enabled and compute != torch.float32:
        policy.autocast_dtype = compute
    policy.gradient_checkpointing = cfg.activation_checkpointing
    reference = AdaptersOff(policy) if lora else load_on_ranks(cfg.model, compute, d, compute, frozen)
    if cfg.recommender == "reference":
        return Models(policy, reference, tokenizer, reference, tokenizer)
    rec = load_on_ranks(cfg.recommender, compute, d, compute, frozen)
    return Models(policy, reference, tokenizer, rec, load_tokenizer(cfg.recommender))


def load_on_ranks(source, dtype: torch.dtype, d: dist.Dist, compute: torch.dtype, prepare=None):
    """The model of `source` with weights in `dtype`; `prepare(model)` adds adapters or freezes layers and returns
    the whole values of any parameter it added (which the checkpoint lacks).

    Under FSDP (d.enabled) no rank ever holds the whole model: it is built on the meta device, prepared there,
    sharded (`dist.shard`, FSDP's param_dtype `compute`), given storage on the rank's device, then each rank reads
    its rows of each tensor (`dist.load_shards`). Every source is an HF directory by then (GGUF files and hub ids
    are converted once, `resolve_model`). One process: `load_model`, then `prepare`."""
    prepare = prepare or (lambda model: {})
    if not d.enabled:
        model = load_model(source, dtype=dtype, device=d.device)
        values = prepare(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in values.items():
                params[name].copy_(t)
        return model
    path = resolve_model(source)
    model = build_model(ModelConfig.from_file(path / "config.json")).to(dtype)
    model.source = str(path)
    extra = prepare(model)
    model = dist.shard(model, d, compute)
    model.to_empty(device=d.device)
    return dist.load_shards(model, path, extra).eval()


def begin(cfg, n_global: int, mini: int) -> tuple[dist.Dist, Path | None, Models]:
    """A run's first lines: the flags checked, the process group, the batch's split over the ranks checked (n_global
    rows in mini-batches of mini), the seed, the checkpoint to resume from (or None), the models."""
    cfg.check()
    d = dist.setup(cfg.device or None, cfg.fsdp)
    rank_share(n_global, mini, d)
    torch.manual_seed(cfg.seed)
    resume_from = resume_point(cfg)
    return d, resume_from, build_models(cfg, resume_from, d)


@dataclass
class Run:
    """A training run's state outside the model: optimizer, schedule, logger, and the steps this process runs."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    tracker: Tracker
    start: int  # the first step to run (0, or the resumed checkpoint's step)
    end: int  # one past the last step this process runs (max_steps, or start + stop_after)


def start_run(cfg, d: dist.Dist, models: Models, resume_from: Path | None, updates_per_step: int,
              preset: str | None = None) -> Run:
    """Write the resolved config, build AdamW and its schedule (counted in optimizer updates), restore them and
    the RNG from `resume_from`, open the logger on rank 0."""
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    optimizer = make_optimizer(models.policy, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps * updates_per_step, cfg.max_steps * updates_per_step,
                               cfg.lr_schedule)
    start = 0
    if resume_from:
        start = checkpoints.load_training_state(resume_from, models.policy, optimizer, scheduler, d)["step"]
    tracker = Tracker(run_dir, enabled=d.is_main, resumed=resume_from is not None)
    if preset:
        tracker.text("config", f"preset: {preset}\n\n{dataclasses.asdict(cfg)}", start)
    end = min(cfg.max_steps, start + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    return Run(optimizer, scheduler, tracker, start, end)


def progress_bar(run: Run, cfg, d: dist.Dist, desc: str):
    return tqdm(range(run.start, run.end), initial=run.start, total=cfg.max_steps, disable=not d.is_main,
                desc=desc, dynamic_ncols=True)


def validate_first(cfg, run: Run) -> bool:
    """Validate before the first step (the start of the curve); --max-steps 0 only validates."""
    return bool(cfg.val_every) and run.start == 0 and (run.end > 0 or cfg.max_steps == 0)


def validate_now(cfg, done: int) -> bool:
    return bool(cfg.val_every) and (done % cfg.val_every == 0 or done == cfg.max_steps)


def save_now(cfg, run: Run, done: int) -> bool:
    return bool(cfg.save_every) and (done % cfg.save_every == 0 or done in (cfg.max_steps, run.end))


def save(cfg, run: Run, models: Models, done: int, d: dist.Dist):
    checkpoints.save(cfg.run_dir, done, models.policy, models.tokenizer, run.optimizer, run.scheduler,
                     {"config": dataclasses.asdict(cfg)}, d, keep=cfg.keep_checkpoints)


def log_validation(run: Run, val: dict, step: int) -> dict:
    """Validation metrics to tensorboard under val/; returned as val_<name> for the run's summary line."""
    run.tracker.scalars(val, step, prefix="val/")
    return {f"val_{k}": v for k, v in val.items()}


def show(bar, metrics: dict, keys: dict[str, str]):
    """A few of the step's metrics on the progress bar, under short names."""
    bar.set_postfix({short: f"{metrics[k]:.4g}" for k, short in keys.items() if k in metrics})


def resume_point(cfg) -> Path | None:
    if not cfg.resume:
        return None
    ckpt = checkpoints.latest_checkpoint(cfg.run_dir)
    if ckpt is None:
        print(f"--resume: no checkpoint under {cfg.run_dir}/checkpoints, starting from step 0")
    return ckpt
