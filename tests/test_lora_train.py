"""Parameter-efficient training in the trainers: GRPO with LoRA adapters (the reference is the same weights with
the adapters off) and with only the top blocks trainable; checkpoints, resume and two FSDP ranks as for full
fine-tuning; evaluate.py and generate.py apply a saved adapter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from model import load_model
from rl.config import parse_config
from rl.grpo_trainer import PRESETS, GRPOConfig, train
from rl.tracking import read_metrics
from tests.tiny import STORIES, one_thread, tiny_chat_model, tiny_dataset  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--env", "toy", "--model", str(STORIES), "--prompts-per-step", "4", "--mini-batch-prompts", "2",
       "--group-size", "4", "--micro-batch-rows", "4", "--max-new-tokens", "10", "--kl-coef", "0.05",
       "--val-every", "0", "--log-text-every", "0", "--device", "cpu"]


def run_script(args, nproc=1):
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    res = subprocess.run([*pre, str(ROOT / "scripts/train_grpo.py"), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]


def adapter(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step}" / "adapter" / "adapter_model.safetensors"))


def test_grpo_lora_trains_adapters_only_and_reference_is_the_base(tmp_path):
    cfg = parse_config(GRPOConfig, PRESETS, [*TOY, "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2",
                                             "--max-steps", "2", "--save-every", "2",
                                             "--run-dir", str(tmp_path)])[0]
    last = train(cfg)
    assert last["kl"] > 0  # the policy moved away from its adapters-off reference
    ck = tmp_path / "checkpoints/step_2"
    assert (ck / "adapter/adapter_config.json").exists() and not (ck / "model").exists()
    conf = json.loads((ck / "adapter/adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["base_model_name_or_path"] == str(STORIES)
    lora_b = [v for k, v in adapter(tmp_path, 2).items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 0  # B started at zero and was trained
    # the saved adapter on the base model differs from the base; with the adapters off it is the base exactly
    from model.lora import AdaptersOff

    base, tuned = load_model(STORIES), load_model(STORIES, adapter=ck / "adapter")
    ids = torch.tensor([[1, 403, 260, 365, 300]])
    with torch.no_grad():
        assert (tuned(ids) - base(ids)).abs().max() > 1e-4
        assert torch.equal(AdaptersOff(tuned)(ids), base(ids))
    # only A and B are in the optimizer state (names of trainable parameters), not the frozen base
    from rl.checkpoints import Reader

    saved = Reader(ck / "train_state").read_metadata().state_dict_metadata
    exp_avg = [k for k in saved if k.startswith("optimizer.") and k.endswith(".exp_avg")]
    assert len(exp_avg) == 2 * 7 * 5 and all(".lora_" in k for k in exp_avg)  # A and B on 7 projections of 5 blocks
    groups = json.loads((ck / "trainer_state.json").read_text())["optimizer_param_groups"]
    assert sum(len(g["params"]) for g in groups) == 2 * 7 * 5


def test_grpo_lora_two_ranks_and_resume(tmp_path):
    """LoRA under FSDP: two ranks train the same adapter as one process; two ranks stopped and resumed equal two
    ranks uninterrupted (the adapter is read back into each rank's shards, its optimizer state from train_state/;
    one process resuming: tests/test_sft.py)."""
    args = [*TOY, "--lora-rank", "4", "--lr", "1e-2", "--max-steps", "2", "--save-every", "1"]
    run_script([*args, "--run-dir", str(tmp_path / "one")])
    run_script([*args, "--run-dir", str(tmp_path / "two")], nproc=2)
    run_script([*args, "--run-dir", str(tmp_path / "split"), "--stop-after", "1"], nproc=2)
    run_script([*args, "--run-dir", str(tmp_path / "split"), "--resume"], nproc=2)
    one, two, split = (adapter(tmp_path / n, 2) for n in ("one", "two", "split"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-5
    assert all(torch.equal(two[k], split[k]) for k in two)
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5


def test_grpo_trainable_layers_moves_only_the_top(tmp_path):
    cfg = parse_config(GRPOConfig, PRESETS, [*TOY, "--trainable-layers", "2", "--lr", "1e-2", "--max-steps", "1",
                                             "--save-every", "1", "--run-dir", str(tmp_path)])[0]
    train(cfg)
    start = load_file(str(STORIES / "model.safetensors"))
    after = load_file(str(tmp_path / "checkpoints/step_1/model/model.safetensors"))
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert moved and all(k.startswith(("model.layers.3.", "model.layers.4.", "model.norm.")) for k in moved), moved
    assert any(k.startswith("model.layers.3.") for k in moved) and any(k.startswith("model.layers.4.") for k in moved)


def test_evaluate_and_generate_take_an_adapter(tmp_path):
    """A LoRA run's adapter applied by scripts/evaluate.py (its cache keyed by base + adapter) and generate.py."""
    model, data = tiny_chat_model(tmp_path / "m"), tiny_dataset(tmp_path / "d")
    cfg = parse_config(GRPOConfig, PRESETS, [*TOY, "--model", str(model), "--lora-rank", "4", "--lr", "5e-2",
                                             "--max-steps", "1", "--save-every", "1",
                                             "--run-dir", str(tmp_path / "run")])[0]
    train(cfg)
    ad = tmp_path / "run/checkpoints/step_1/adapter"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(ROOT / "scripts/evaluate.py"), "--method", "lg", "--generator", str(model),
              "--recommender", str(model), "--data", str(data), "--split", "test", "--limit", "3",
              "--max-new-tokens", "8", "--profile-history", "3", "--cache", str(tmp_path / "cache")]
    for name, extra in (("base", []), ("tuned", ["--adapter", str(ad)])):
        res = subprocess.run([*common, *extra, "--out", str(tmp_path / name)], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "cache").glob("lg-*.jsonl"))) == 2  # one cache file per (base, adapter)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Once upon a time"}) + "\n")
    res = subprocess.run([sys.executable, str(ROOT / "scripts/generate.py"), "--model", str(model), "--adapter",
                          str(ad), "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                          "--max-new-tokens", "5", "--temperature", "0"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "o.jsonl").read_text())["text"]
    res = subprocess.run([sys.executable, str(ROOT / "scripts/generate.py"), "--model", str(model), "--adapter",
                          str(ad), "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o16.jsonl"),
                          "--max-new-tokens", "5", "--temperature", "0", "--dtype", "bfloat16"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]  # the GPU's compute dtype, on the CPU
    assert json.loads((tmp_path / "o16.jsonl").read_text())["text"]
