"""scripts/gpu_check.sh and its Python driver on the CPU: the random checkpoint with Qwen3's chat template, every
stage of the script on a tiny model of the same family (gloo instead of nccl, no GPU figures), and a clear failure
without CUDA."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.tiny import one_thread, script_function  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(*args, out=None, timeout=300):
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", __import__("sys").executable), "OMP_NUM_THREADS": "1"}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def test_random_checkpoint_loads_with_qwen3_thinking_template(tmp_path):
    from model import load_model, load_tokenizer

    build = script_function("gpu_check", "build")
    info = build(tmp_path / "model", tiny=True)
    model, tok = load_model(tmp_path / "model"), load_tokenizer(tmp_path / "model")
    assert model.config.model_type == "qwen3" and model.config.qk_norm and info["tokenizer_size"] == tok.vocab_size
    msgs = [{"role": "user", "content": "Describe the user."}]
    assert tok.render_chat(msgs).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    assert tok.render_chat(msgs, thinking=True).endswith("<|im_start|>assistant\n")
    assert tok.eos_ids == [tok.hf.convert_tokens_to_ids("<|im_end|>")]
    assert tok.decode(tok.encode("héllo wörld", add_special_tokens=False)) == "héllo wörld"  # bytes round trip
    with torch.no_grad():
        assert model(torch.tensor([tok.encode_chat(msgs)])).shape[-1] == model.config.vocab_size


def test_every_stage_on_a_tiny_cpu_model(tmp_path):
    """The whole script in --cpu-tiny mode: build, kernels, GRPO and DPO steps under torchrun --nproc_per_node=1
    with --fsdp (gloo), the report; seconds, not minutes."""
    start = time.time()
    res = run_script("--cpu-tiny", out=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.time() - start < 240
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and set(report["stages"]) == {"build", "kernels", "grpo", "dpo"}
    k = report["kernels"]
    assert 0 < k["logits_max_abs_diff_bf16_fp32"] < 0.1 and k["decode_tokens_per_s"] > 0
    assert k["chunked_rows_identical"] == k["chunked_rows"]  # one CPU thread: chunks sample the one batch's rows
    assert k["train_plain_mfu"] > 0 and k["train_ckpt_mfu"] > 0
    g, d = report["grpo"], report["dpo"]
    assert g["fsdp"] and d["fsdp"] and g["response_length"] > 0
    assert set(g["memory"]) == {"rollout", "logprobs", "update"} and g["plan_gib"]["update"] > 0
    assert d["loss"] == pytest.approx(d["loss"]) and d["memory"]["update"]["planned_gib"] > 0
    assert (tmp_path / "grpo.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_fails_clearly_without_cuda():
    start = time.time()
    res = run_script(timeout=120)
    assert res.returncode == 3 and "no CUDA device" in res.stderr
    assert time.time() - start < 60
