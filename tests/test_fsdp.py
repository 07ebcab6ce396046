"""FSDP2 on one gloo rank on the CPU: generation under a bf16 mixed-precision policy, and what `gathered()`
leaves behind. One rank shards nothing, but the code paths (DTensor masters, gathered bf16 copies, reshard
settings) are those of a multi-GPU run."""
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
