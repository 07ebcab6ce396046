"""LoRA adapters (model/lora.py) and top-N-layer training (model/freeze.py) on tiny models."""
import copy
import json

import pytest
import torch

from model import load_model, save_model
from model.checkpoint import CheckpointError
from model.freeze import freeze_all_but_top
from model.lora import (PEFT_PREFIX, add_lora, lora_enabled, lora_layers, lora_state_dict, merge_lora,
                        save_adapter)
from model.sampler import generate
from tests.test_model import FAMILIES, left_padded_batch, make_checkpoint
from tests.tiny import STORIES, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module", params=["stories260K", *sorted(FAMILIES)])
def base_dir(request, tmp_path_factory):
    """An HF model directory: the real 260K TinyStories model, or a random tiny model of each family."""
    if request.param == "stories260K":
        return STORIES
    path = tmp_path_factory.mktemp(request.param)
    make_checkpoint(FAMILIES[request.param](), path)
    return path


def randomize_B(model, seed=0, std=0.1):
    """Non-zero B everywhere, so every adapter changes its projection."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)
    return model


def adapted(path, rank=4, alpha=8.0, std=0.1, **kw):
    return randomize_B(add_lora(load_model(path), rank, alpha, **kw), std=std)


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def test_zero_B_gives_exactly_the_base_logits(base_dir):
    base, lora = load_model(base_dir), add_lora(load_model(base_dir), rank=4, alpha=8)
    assert len(lora_layers(lora)) == 7 * base.config.num_hidden_layers
    ids, mask = left_padded_batch()
    assert torch.equal(logits(lora, ids, mask), logits(base, ids, mask))
    one = ids[:, -1:]  # a decode-shaped call (B, 1): Linear's CPU path, in the adapters too
    assert torch.equal(logits(lora, one), logits(base, one))


def test_only_A_and_B_carry_gradients(base_dir):
    ids, mask = left_padded_batch()
    grads = []
    for ckpt in (False, True):
        m = adapted(base_dir).train()
        m.gradient_checkpointing = ckpt
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
        m(ids, attention_mask=mask).pow(2).mean().backward()
        assert {n for n, p in m.named_parameters() if p.grad is not None} == trainable
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)  # activation checkpointing: the same gradients


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_adapter_equals_merged_model(base_dir, dtype, atol):
    """W x + s B(A x) against (W + s B A) x: the same function. In float32 the two orders of the products round
    differently by a few 1e-5 on logits of size ~10, hence the float64 check of the arithmetic at 1e-5."""
    lora = randomize_B(add_lora(load_model(base_dir, dtype=dtype), rank=4, alpha=8.0))
    merged = merge_lora(copy.deepcopy(lora))
    assert not lora_layers(merged) and set(merged.state_dict()) == set(load_model(base_dir).state_dict())
    ids, mask = left_padded_batch()
    want = logits(merged, ids, mask)
    assert (logits(lora, ids, mask) - want).abs().max() <= atol
    base = logits(load_model(base_dir, dtype=dtype), ids, mask)
    assert (want - base).abs().max() > 1e-2  # the adapter does something


def test_adapter_switched_off_is_the_base_model(base_dir):
    base, lora = load_model(base_dir), adapted(base_dir)
    ids, mask = left_padded_batch()
    on = logits(lora, ids, mask)
    with lora_enabled(lora, False):
        assert torch.equal(logits(lora, ids, mask), logits(base, ids, mask))
    assert torch.equal(logits(lora, ids, mask), on)  # restored on exit


def test_sampler_greedy_with_adapter_equals_merged():
    lora = adapted(STORIES, std=0.2)
    merged = merge_lora(copy.deepcopy(lora))
    prompts = [[1, 403, 407, 261], [1, 88], [1, 300, 41, 17, 350, 9]]  # padded rows too
    kw = dict(max_new_tokens=24, temperature=0.0, eos_ids=[2], pad_id=0)
    got = generate(lora, prompts, **kw)
    assert torch.equal(got.tokens, generate(merged, prompts, **kw).tokens)
    assert not torch.equal(got.tokens, generate(load_model(STORIES), prompts, **kw).tokens)
    sampled = generate(lora, prompts, max_new_tokens=8, temperature=1.0, n=2, seed=3)  # group sampling runs
    assert sampled.tokens.shape[0] == 6 and torch.isfinite(sampled.logprobs).all()


def test_save_adapter_then_load_model_with_it(base_dir, tmp_path):
    lora = adapted(base_dir, rank=3, alpha=5.0, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    out = save_adapter(lora, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 3, "lora_alpha": 5.0, "lora_dropout": 0.1, "bias": "none"}
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert cfg["base_model_name_or_path"] == str(base_dir)
    keys = set(lora_state_dict(lora))  # A and B of 3 projections per block
    assert PEFT_PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 6 * len(lora.model.layers)

    again = load_model(base_dir, adapter=out)
    ids, mask = left_padded_batch()
    assert torch.equal(logits(again, ids, mask), logits(lora.eval(), ids, mask))
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n, p in again.named_parameters() if p.requires_grad)
    assert not list(tmp_path.glob(".adapter.tmp-*"))


def test_adapter_model_cannot_be_saved_as_a_plain_checkpoint(tmp_path):
    lora = adapted(STORIES)
    with pytest.raises(CheckpointError, match="save_adapter"):
        save_model(lora, None, tmp_path / "m")
    save_model(merge_lora(lora), None, tmp_path / "m")  # merged: an ordinary model directory
    assert not (tmp_path / "m" / "adapter_config.json").exists()


@pytest.mark.parametrize("change", [{"use_dora": True}, {"peft_type": "IA3"}, {"target_modules": ["lm_head"]},
                                    {"target_modules": "q_proj|v_proj"}, {"modules_to_save": ["lm_head"]}])
def test_unsupported_adapter_config_is_a_clear_error(tmp_path, change):
    out = save_adapter(adapted(STORIES), tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(change)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=next(iter(change)) if "peft_type" not in change else "LORA"):
        load_model(STORIES, adapter=out)


# ---- interoperability with PEFT on transformers' model ----------------------------------------------------------
def test_adapter_round_trips_with_peft(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ids, mask = left_padded_batch()
    real = mask.bool()  # padding positions carry no meaning in either implementation
    # ours -> PEFT on the transformers model of the same base checkpoint
    lora = adapted(base_dir, rank=4, alpha=16.0, targets=("q_proj", "k_proj", "o_proj", "up_proj"))
    out = save_adapter(lora, tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        assert (theirs(ids, attention_mask=mask).logits[real] - logits(lora, ids, mask)[real]).abs().max() <= 1e-4

    # PEFT (random A and B) -> load_model(adapter=...)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "gate_proj", "down_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
    made = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), cfg).eval()
    made.save_pretrained(tmp_path / "peft")
    ours = load_model(base_dir, adapter=tmp_path / "peft")
    with torch.no_grad():
        assert (made(ids, attention_mask=mask).logits[real] - logits(ours, ids, mask)[real]).abs().max() <= 1e-4


# ---- top-N-layer training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, n", [("stories260K", 2), ("llama3", 1), ("llama3", 0)])
def test_freeze_all_but_top(name, n, tmp_path):
    path = STORIES if name == "stories260K" else tmp_path
    if name != "stories260K":
        make_checkpoint(FAMILIES[name](), path)
    m = freeze_all_but_top(load_model(path).train(), n)
    L, tied = m.config.num_hidden_layers, m.config.tie_word_embeddings
    want = {f"model.layers.{i}." for i in range(L - n, L)} | {"model.norm."} | (set() if tied else {"lm_head."})
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trainable == {k for k, _ in m.named_parameters() if k.startswith(tuple(want))}
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for k, p in m.named_parameters() if k in trainable}
    assert "model.embed_tokens.weight" not in trainable  # also the tied head's weight: stays frozen

    # which block is running when autograd saves a tensor for the backward
    current, saved, grad_on = [None], {i: 0 for i in range(L)}, {}

    def enter(i):
        def hook(module, args):
            current[0], grad_on[i] = i, torch.is_grad_enabled()
        return hook

    def leave(module, args, out):
        current[0] = None

    for i, block in enumerate(m.model.layers):
        block.register_forward_pre_hook(enter(i))
        block.register_forward_hook(leave)

    def pack(t):
        if current[0] is not None:
            saved[current[0]] += 1
        return t

    ids, mask = left_padded_batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(ids, attention_mask=mask).pow(2).mean()
    loss.backward()
    assert {k for k, p in m.named_parameters() if p.grad is not None} == trainable
    assert all(not grad_on[i] and saved[i] == 0 for i in range(L - n))  # bottom: no autograd, nothing kept
    assert all(grad_on[i] and saved[i] > 0 for i in range(L - n, L))


def test_freeze_all_but_top_rejects_bad_input():
    m = load_model(STORIES)
    with pytest.raises(ValueError, match="between 0 and 5"):
        freeze_all_but_top(m, 6)
    with pytest.raises(ValueError, match="LoRA"):
        freeze_all_but_top(add_lora(m, 2, 4), 1)


def test_adapters_added_on_the_meta_device_get_their_values_drawn_again():
    """A model built on the meta device (to be sharded before its weights are read) gets adapters without values;
    initial_adapter_weights draws add_lora's values again, in its order, and they are those of a real model."""
    from model.checkpoint import build_model
    from model.config import ModelConfig
    from model.lora import initial_adapter_weights

    real = add_lora(load_model(STORIES), 4, 8.0, targets=("q_proj", "down_proj"), seed=7)
    meta = add_lora(build_model(ModelConfig.from_file(STORIES / "config.json")), 4, 8.0,
                    targets=("q_proj", "down_proj"), seed=7)
    assert all(p.is_meta for p in meta.parameters())
    drawn = initial_adapter_weights(meta, seed=7)
    adapters = {k: p for k, p in real.named_parameters() if ".lora_" in k}
    assert drawn.keys() == adapters.keys() and len(drawn) == 2 * 2 * 5
    assert all(torch.equal(drawn[k], adapters[k]) for k in drawn)
    assert not torch.equal(drawn["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           initial_adapter_weights(meta, seed=8)["model.layers.0.self_attn.q_proj.lora_A.weight"])
