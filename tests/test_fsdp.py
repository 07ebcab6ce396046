"""FSDP2 on one gloo rank on the CPU: generation under a bf16 mixed-precision policy, and what `gathered()`
leaves behind. One rank shards nothing, but the code paths (DTensor masters, gathered bf16 copies, reshard
settings) are those of a multi-GPU run. On two gloo ranks: a model sharded on the meta device, then filled with
each rank's rows, equals the whole model loaded then sharded."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import Qwen3Config

from model import is_sharded as model_is_sharded
from model.config import ModelConfig
from model.sampler import generate
from model.transformer import Transformer
from rl import distributed as D
from tests.tiny import one_thread  # noqa: F401 (autouse fixture)

# a tiny Qwen3 (q/k norms, free head_dim) with grouped-query attention, random weights
QWEN3 = Qwen3Config(vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=10, tie_word_embeddings=False, max_position_embeddings=256)


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """A world of one gloo rank for this module's tests, torn down after them."""
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_qwen3(seed: int = 0) -> Transformer:
    return Transformer(ModelConfig.from_dict(QWEN3.to_dict())).init_weights(seed=seed).eval()


def shard_bf16(model: Transformer) -> Transformer:
    """fully_shard each block, then the root, with bf16 compute over fp32 master weights."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def test_generate_under_bf16_mixed_precision():
    """The KV cache takes the compute dtype (bf16), not that of the fp32 sharded masters: SDPA gets one dtype."""
    model = shard_bf16(tiny_qwen3())
    assert isinstance(model.model.embed_tokens.weight, DTensor)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    out = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=4, temperature=1.0, n=2, seed=0)
    assert out.tokens.shape == (4, 4) and torch.isfinite(out.logprobs).all()
    cache = model.new_cache(batch=2, max_len=8)
    assert cache.k[0].dtype == cache.v[0].dtype == torch.bfloat16
    assert model.compute_dtype() == torch.bfloat16
    plain = tiny_qwen3()
    assert plain.compute_dtype() == torch.float32 and plain.new_cache(1, 4).k[0].dtype == torch.float32


def is_sharded(p) -> bool:
    return isinstance(p, DTensor)


def test_gathered_gives_back_each_modules_reshard_setting():
    """After a rollout under gathered() (here the model's first forward, as in a GRPO step) the blocks reshard
    after forward and the root keeps its parameters (embeddings, head) gathered, as before: a training forward
    does not all-gather them anew. A setting changed by hand is given back too."""
    model = D.fully_shard_model(tiny_qwen3())
    block, head = model.model.layers[0].mlp.up_proj, model.lm_head
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), D.gathered(model):
        model(ids)
        assert not is_sharded(block.weight) and not is_sharded(head.weight)
    assert is_sharded(block.weight) and is_sharded(head.weight)  # resharded on leaving
    with torch.no_grad():
        model(ids)
    assert is_sharded(block.weight) and not is_sharded(head.weight)
    assert [D.reshards_after_forward(m) for m in D.fsdp_modules(model)] == [False, True, True]
    model.set_reshard_after_forward(True, recurse=False)
    with torch.no_grad(), D.gathered(model):
        model(ids)
    assert [D.reshards_after_forward(m) for m in D.fsdp_modules(model)] == [True, True, True]


def test_is_sharded_tells_fsdp_from_a_full_copy():
    """What the sampler's default sync_ranks and the recommender's shared prefix go by: a full copy of the model
    on a rank of a process group is not sharded, so it runs no collective; the reference view of a sharded LoRA
    policy (also the recommender) is."""
    from model.lora import AdaptersOff, add_lora

    assert not model_is_sharded(tiny_qwen3())
    assert model_is_sharded(D.fully_shard_model(tiny_qwen3()))
    assert model_is_sharded(AdaptersOff(D.fully_shard_model(add_lora(tiny_qwen3(), 2, 4.0))))

# ---- building a sharded model without a whole copy on any rank --------------------------------------------------
# a Qwen3 whose row counts do not divide by two ranks (vocab 509, MLP 81): FSDP's last shard is the shorter one
ODD_QWEN3 = Qwen3Config(vocab_size=509, hidden_size=48, intermediate_size=81, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=10, tie_word_embeddings=False,
                        max_position_embeddings=256)


def _build_worker(rank, world, init_file, out_dir, sources):
    """On each rank: every source and way of preparing it, built the old way (whole model loaded, then sharded)
    and by loop.load_on_ranks (meta device, sharded, then each rank's rows read); logits, full state dicts and
    requires_grad compared. load_on_ranks is instrumented: fully_shard must see only meta tensors, load_model
    must not run, and the rows read from the files are counted."""
    import json
    from datetime import timedelta
    from pathlib import Path

    from model import load_model
    from model.lora import add_lora, initial_adapter_weights
    from rl import loop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    d = D.Dist(rank=rank, world=world)
    on_meta, read = [], []
    real_shard, real_fill = D.fully_shard_model, D._fill_rows

    def shard_spy(model, mp_policy=None):
        on_meta.append(all(t.is_meta for t in [*model.parameters(), *model.buffers()]))
        return real_shard(model, mp_policy)

    def fill_spy(param, name, read_rows):
        def counted(a, b):
            rows = read_rows(a, b)
            read.append(rows.numel())
            return rows

        real_fill(param, name, counted)

    def no_whole_load(*a, **k):
        raise AssertionError("load_model under FSDP")

    D.fully_shard_model, D._fill_rows, loop.load_model = shard_spy, fill_spy, no_whole_load
    def fresh(m):  # LoRA adapters; their values drawn again for the model on the meta device
        add_lora(m, 4, 8.0, seed=3)
        return initial_adapter_weights(m, 3)

    def top(m):  # the last block trainable
        m.requires_grad_(False)
        m.model.layers[-1].requires_grad_(True)
        return {}

    def frozen(m):  # a reference: bf16 weights, bf16 compute
        m.requires_grad_(False)
        return {}

    ids = torch.tensor([[1, 403, 260, 365, 300, 7], [1, 9, 8, 7, 6, 5]])
    res = {}
    for source in sources:
        for how, dtype, prepare in (("plain", torch.float32, None), ("lora", torch.float32, fresh),
                                    ("top", torch.float32, top), ("frozen-bf16", torch.bfloat16, frozen)):
            del on_meta[:], read[:]
            new = loop.load_on_ranks(source, dtype, d, dtype, prepare)
            old = load_model(source, dtype)
            if prepare:
                values = prepare(old)
                old_params = dict(old.named_parameters())
                with torch.no_grad():
                    for k, v in values.items():
                        assert torch.equal(old_params[k], v)  # the values drawn again are add_lora's own
            mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
            old = real_shard(old, mp)
            with torch.no_grad():
                same_logits = torch.equal(new(ids), old(ids))
            a, b = D.full_state_dict(new), D.full_state_dict(old)
            n_params = sum(p.numel() for p in new.parameters())  # counts the tied embedding once
            res[f"{Path(source).name}/{how}"] = dict(
                on_meta=on_meta, same_logits=same_logits, keys=sorted(a) == sorted(b),
                same_state=all(torch.equal(a[k], b[k]) for k in a),
                same_grad=[(k, p.requires_grad) for k, p in new.named_parameters()]
                == [(k, p.requires_grad) for k, p in old.named_parameters()],
                tied=new.lm_head.weight is new.model.embed_tokens.weight,
                read_share=sum(read) / n_params)
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def test_sharded_build_equals_whole_load_then_shard(tmp_path):
    """Two gloo ranks: the model built on the meta device, sharded, then filled with each rank's rows (stories260K:
    Llama, tied embeddings; a Qwen3 with uneven shards), plain, with fresh LoRA adapters, with only the top block
    trainable, and frozen in bf16 (a reference), gives the same logits, full state dict and trainable parameters
    as the whole model loaded on each rank then sharded; no rank held the whole model (fully_shard saw only meta
    tensors, the whole-model loader never ran) and each rank read about half of the weights."""
    import json
    import time

    import torch.multiprocessing as mp

    from model import save_model
    from tests.tiny import STORIES

    odd = save_model(Transformer(ModelConfig.from_dict(ODD_QWEN3.to_dict())).init_weights(seed=1), None,
                     tmp_path / "odd-qwen3")
    ctx = mp.start_processes(_build_worker, args=(2, str(tmp_path / "init"), str(tmp_path), [str(STORIES), str(odd)]),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 300
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("sharded build hung")
    for rank in (0, 1):
        res = json.loads((tmp_path / f"{rank}.json").read_text())
        assert len(res) == 8
        for case, r in res.items():
            assert r["on_meta"] == [True], case
            assert r["same_logits"] and r["keys"] and r["same_state"] and r["same_grad"], (case, r)
            assert r["tied"] == case.startswith("stories"), case
            assert 0.4 < r["read_share"] < 0.6, (case, r["read_share"])
