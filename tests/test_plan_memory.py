"""scripts/plan_memory.py and rl/memory.py: the plan of the presets on 8 x 80 GiB, --check, and the plan held to
memory measured on the CPU during a GRPO step of stories260K (toy environment).

What is measured and what is estimated: `LiveBytes` counts every tensor storage alive while a GRPO step runs in one
process (weights, gradients, Adam's state, the KV cache, activations, logits; not the allocator's slack), and
grpo_step reports its peak per phase. The CPU step runs in fp32 without FSDP, so it checks the parts a single
process has: weights and optimizer state, the sampler's caches, activations with and without checkpointing, the
chunked or whole logits. FSDP's gathered copies and gradient buffers and the bf16 byte counts are estimates
(only a GPU run, scripts/gpu_check.sh, measures them)."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.tiny import STORIES, one_thread, script_function  # noqa: F401 (autouse fixture)


@pytest.fixture
def plan_memory(capsys):
    """Run scripts/plan_memory.py's main in this process: (returncode, stdout, stderr)."""
    main = script_function("plan_memory", "main")

    def run(*args):
        code = 0
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_presets_on_eight_80_gib_gpus(plan_memory):
    res = plan_memory("--preset", "duet-paper", "--gpus", "8", "--gpu-mem-gib", "80", "--check")
    assert res.returncode == 0, res.stderr
    plan = last_json(res.stdout)
    assert plan["trainer"] == "grpo" and plan["params"] == 8_190_735_360 and plan["fits"]
    assert set(plan["phases_gib"]) == {"load", "rollout", "old/ref log-probs", "update"}
    assert plan["rollout_chunks"] == 2  # the preset's --rollout-tokens: 4 of 8 prompts at a time
    kv = plan["parts_gib"]["rollout"]["KV cache (a chunk's rows x (P + new))"]
    assert abs(kv - 4 * 8 * (4096 + 896) * 36 * 2 * 8 * 128 * 2 / 2**30) < 1e-3  # Qwen3-8B: 144 KiB a slot
    assert abs(plan["parts_gib"]["update"]["Adam m, v (fp32)"] - 8 * 8_190_735_360 / 8 / 2**30) < 1e-3
    assert "rollout" in res.stdout and "GiB" in res.stdout
    # the whole batch at once does not fit beside the gathered policy
    res = plan_memory("--preset", "duet-paper", "--gpus", "8", "--gpu-mem-gib", "80", "--rollout-tokens", "0",
                      "--check")
    assert res.returncode == 2 and "phase 'rollout'" in res.stderr and "--rollout-tokens" in res.stderr
    res = plan_memory("--preset", "lettingo-paper", "--gpus", "8", "--gpu-mem-gib", "80")
    plan = last_json(res.stdout)
    assert plan["trainer"] == "dpo" and "explore (meta-llama/Llama-3.1-8B-Instruct)" in plan["phases_gib"]


def test_model_config_flag_and_unknown_model(plan_memory, tmp_path):
    res = plan_memory("--preset", "cpu-demo", "--gpus", "1", "--dtype", "float32", "--model-config", str(STORIES))
    assert res.returncode == 0, res.stderr
    assert last_json(res.stdout)["params"] == 260_032
    res = plan_memory("--preset", "cpu-demo", "--gpus", "2", "--model-config", "qwen3-0.6b", "--micro-batch-rows", "2")
    assert res.returncode == 0 and last_json(res.stdout)["params"] == 596_049_920
    res = plan_memory("--model", str(tmp_path / "nowhere"), "--gpus", "1")
    assert res.returncode == 2 and "--model-config" in res.stderr
    res = plan_memory("--preset", "cpu-demo", "--gpus", "8")  # 2 prompts a step cannot split over 8 ranks
    assert res.returncode == 2 and "multiple of the number of ranks" in res.stderr


def measured_and_planned(tmp_path, extra):
    """One GRPO step (the second: Adam's state exists) of stories260K on the toy task under LiveBytes, and the plan
    of the same config on one fp32 process."""
    from model.known_configs import model_config
    from rl import distributed as D
    from rl import loop
    from rl.config import parse_config
    from rl.grpo_trainer import PRESETS, GRPOConfig, grpo_step, make_env
    from rl.memory import LiveBytes, grpo_plan, model_shapes

    argv = ["--env", "toy", "--model", str(STORIES), "--prompts-per-step", "2", "--mini-batch-prompts", "2",
            "--group-size", "8", "--micro-batch-rows", "8", "--max-prompt-tokens", "6", "--max-new-tokens", "48",
            "--kl-coef", "0.05", "--val-every", "0", "--log-text-every", "0", "--save-every", "0", "--device", "cpu",
            "--run-dir", str(tmp_path), *extra]
    cfg = parse_config(GRPOConfig, PRESETS, argv)[0]
    d = D.Dist()
    torch.manual_seed(0)
    models = loop.build_models(cfg, None, d)
    env = make_env(cfg, models, d)
    run = loop.start_run(cfg, d, models, None, 1)
    with LiveBytes() as live:
        live.track([*models.policy.parameters(), *models.policy.buffers(), *models.reference.parameters(),
                    *models.reference.buffers()])
        grpo_step(0, cfg, models, env, run, d)
        metrics = grpo_step(1, cfg, models, env, run, d)
    adam = sum(t.untyped_storage().nbytes() for s in run.optimizer.state.values() for t in s.values())
    assert metrics["response_length"] > 40  # the micro-batch is as long as planned (48 new tokens)
    plan = grpo_plan(cfg, model_shapes(model_config(STORIES)), gpus=1, c=4, cpu=True)
    return metrics, adam, plan


@pytest.mark.parametrize("extra", [[], ["--activation-checkpointing", "--logprob-chunk-tokens", "64"],
                                   ["--logprob-chunk-tokens", "0"]])
def test_plan_against_measured_cpu_step(tmp_path, extra):
    """Per phase, the measured peak lies between 80% and 105% of the plan (the plan errs on the high side: it adds
    up temporaries that do not all live at once), and Adam's state is the planned 8 bytes a parameter."""
    metrics, adam, plan = measured_and_planned(tmp_path, extra)
    assert abs(adam - plan.phases["update"]["Adam m, v (fp32)"]) <= 0.01 * adam
    totals = plan.totals()
    for phase, key in (("rollout", "rollout"), ("old/ref log-probs", "logprobs"), ("update", "update")):
        measured = metrics[f"mem_peak_gib_{key}"] * 2**30
        assert 0.8 * totals[phase] <= measured <= 1.05 * totals[phase], (phase, measured, totals[phase])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_phase_peaks_on_the_cpu_are_resident_set_peaks():
    """Without a LiveBytes, PhasePeaks on the CPU reports each phase's peak resident set: a phase that touched
    256 MiB shows it, the next (smaller) phase does not, and the process's peak keeps the larger."""
    from rl.memory import PhasePeaks, process_peak_rss

    peaks = PhasePeaks("cpu")
    x = torch.ones(64 * 2**20)  # 256 MiB, written
    del x
    peaks.end("big")
    y = torch.ones(2**20)  # 4 MiB
    del y
    peaks.end("small")
    assert peaks.peaks["big"] - peaks.peaks["small"] > 200 * 2**20
    assert process_peak_rss() >= peaks.peaks["big"]
    assert set(peaks.metrics()) == {"mem_peak_gib_big", "mem_peak_gib_small"}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_freed_memory_returns_to_the_os():
    """After return_freed_memory_to_os, 100 of 200 1 MiB tensors, freed between live ones, leave the resident set;
    without it glibc (its mmap threshold raised by a freed 16 MiB block) keeps them in the heap. Fresh processes."""
    import subprocess
    import sys

    code = """
import sys, torch
sys.path.insert(0, {root!r})
from rl.memory import return_freed_memory_to_os
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) * 1024
if {apply}:
    assert return_freed_memory_to_os()
big = torch.ones(4 * 2**20); del big  # 16 MiB freed: glibc's dynamic threshold rises to it
before = rss()
xs = [torch.ones(2**18) for _ in range(200)]  # 200 x 1 MiB, written
del xs[::2]  # every other one freed: holes below live blocks, which no heap trim can give back
print(rss() - before)
"""
    kept = {}
    for apply in (False, True):
        out = subprocess.run([sys.executable, "-c", code.format(root=str(Path(__file__).parents[1]), apply=apply)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        kept[apply] = int(out.stdout.split()[-1])
    assert kept[True] < 120 * 2**20 < 180 * 2**20 < kept[False], kept
