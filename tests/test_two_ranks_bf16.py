"""The GPU configuration on the CPU: GRPO and LettinGo/DPO under torchrun with two ranks (gloo), bf16 compute
through FSDP's param_dtype, on a tiny random Qwen3 (q/k norms, Qwen3's chat template with its thinking switch,
scripts/gpu_check.py builds it). Each run records the prompts it renders: the writer's (what the sampler is
given) and the recommender's (what it scores) open the assistant turn with Qwen3's empty think block."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl.tracking import read_metrics
from tests.tiny import one_thread, script_function, tiny_dataset  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
ASSISTANT = "<|im_start|>assistant\n"
THINK_OFF = "<think>\n\n</think>\n\n"  # Qwen3's template with enable_thinking false (model/tokenizer.py's default)

# runs a script as torchrun would, recording every prompt the sampler and the recommender get, one file a rank
RECORDING = """
import json, os, runpy, sys
sys.path.insert(0, {root!r})
import model.sampler
from eval.recommender import Recommender

def record(kind, prompts):
    with open(os.path.join({out!r}, "prompts.%s.jsonl" % os.environ.get("RANK", "0")), "a") as f:
        f.writelines(json.dumps({{"kind": kind, "prompt": p}}) + "\\n" for p in prompts)

generate, score_prompts = model.sampler.generate, Recommender.score_prompts

def recorded_generate(model, prompts, *args, **kwargs):
    record("writer", prompts)
    return generate(model, prompts, *args, **kwargs)

def recorded_score_prompts(self, texts):
    record("recommender", texts)
    return score_prompts(self, texts)

model.sampler.generate, Recommender.score_prompts = recorded_generate, recorded_score_prompts
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    base = tmp_path_factory.mktemp("qwen3")
    script_function("gpu_check", "build")(base / "model", tiny=True)
    return base / "model", tiny_dataset(base / "data")


def run_two_ranks(script: str, args: list[str], run_dir: Path, timeout: int = 180) -> list[dict]:
    """scripts/<script>.py under torchrun with two ranks -> the prompts both ranks recorded. A run past `timeout`
    fails the test (a rank waiting in a collective the other never runs): torchrun is stopped with SIGTERM, which
    it passes on to its workers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    wrapper = run_dir / "recording.py"
    wrapper.write_text(RECORDING.format(root=str(ROOT), out=str(run_dir),
                                        script=str(ROOT / "scripts" / f"{script}.py")))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(wrapper), *args, "--run-dir", str(run_dir), "--dtype", "bfloat16", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"{script} on two ranks did not end within {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for rank in (0, 1)
            for line in (run_dir / f"prompts.{rank}.jsonl").read_text().splitlines()]


def check_prompts(prompts: list[dict], tokenizer, writer_prefix: str = ""):
    """Every writer prompt ends with the opened assistant turn, the empty think block and the answer's opener;
    every recommender prompt opens its assistant turn with the think block, then asks for the rating."""
    writer = [tokenizer.decode(p["prompt"], skip_special_tokens=False) for p in prompts if p["kind"] == "writer"]
    rec = [p["prompt"] for p in prompts if p["kind"] == "recommender"]
    assert writer and rec
    for text in writer:
        assert text.endswith(ASSISTANT + THINK_OFF + writer_prefix), text[-80:]
    for text in rec:
        assert text.rsplit(ASSISTANT, 1)[1].startswith(THINK_OFF) and text.endswith(" - rated "), text[-200:]


def steps_and_validations(run_dir: Path) -> tuple[list[int], list[int]]:
    rows = read_metrics(run_dir)
    return ([r["step"] for r in rows if any(k.startswith("train/") for k in r)],
            [r["step"] for r in rows if "val/format_failure_rate" in r])


def test_grpo_duet(qwen3, tmp_path):
    """Two GRPO steps of the DUET environment (cpu-demo's answer opener) with validation before and after them:
    rollout, recommender scoring and validation with a sharded policy and reference; 3 validation targets over
    2 ranks (one rank scores a padding row) and a checkpoint of the fp32 masters."""
    from model import load_tokenizer

    model, data = qwen3
    run = tmp_path / "grpo"
    prompts = run_two_ranks("train_grpo", [
        "--model", str(model), "--data", str(data), "--max-steps", "2", "--save-every", "2", "--val-every", "2",
        "--val-examples", "3", "--prompts-per-step", "2", "--mini-batch-prompts", "2", "--group-size", "2",
        "--micro-batch-rows", "2", "--max-new-tokens", "8", "--user-history", "2", "--item-history", "2",
        "--review-chars", "20", "--max-prompt-tokens", "4096", "--log-text-every", "1"], run)
    assert steps_and_validations(run) == ([1, 2], [0, 2])
    rows = read_metrics(run)
    assert rows[-1]["val/format_failures"] == 3  # random weights write no DUET tags
    assert [r["train/format_failure_rate"] for r in rows if "train/loss" in r] == [1.0, 1.0]
    assert (run / "checkpoints/step_2/model/model.safetensors").exists()
    check_prompts(prompts, load_tokenizer(model), writer_prefix="<user_profile><cue>")


def test_lettingo_all_stages(qwen3, tmp_path):
    """explore -> score -> pairs -> two DPO steps with validation, three users over two ranks (uneven shares of
    the exploration), the explorer and the recommender full bf16 copies on each rank."""
    from model import load_tokenizer
    from rl.lettingo import read_jsonl

    model, data = qwen3
    run = tmp_path / "dpo"
    prompts = run_two_ranks("train_dpo", [
        "--model", str(model), "--explorers", str(model), "--data", str(data), "--users", "3", "--heldout", "2",
        "--min-history", "3", "--styles", "lg", "--temperatures", "0.8", "1.2", "--samples", "1",
        "--user-history", "2", "--review-chars", "20", "--max-new-tokens", "8", "--max-prompt-tokens", "4096",
        "--pair-margin", "0", "--pairs-per-step", "2", "--micro-batch-pairs", "1", "--max-steps", "2",
        "--save-every", "0", "--val-every", "2", "--val-examples", "2", "--log-text-every", "1"], run)
    assert len(read_jsonl(run / "candidates.jsonl", "explore")) == 3 * 2
    assert read_jsonl(run / "scores.jsonl", "score") and read_jsonl(run / "pairs.jsonl", "pairs")
    assert steps_and_validations(run) == ([1, 2], [0, 2])
    check_prompts(prompts, load_tokenizer(model))
