"""Every benchmark in bench/ runs at tiny size (the 260K-parameter model, a few tokens, one timed step or round), as
`python bench/<name>.py` from the repository root, and ends with one JSON line holding both sides' figures: a change
elsewhere that breaks a benchmark fails here. TRL is optional (requirements-bench.txt): without it bench_grpo and
bench_dpo run our side alone and say so. The figures themselves mean nothing at this size."""
import importlib.util
import json
import os
import subprocess
import sys
from numbers import Number
from pathlib import Path

import pytest

from tests.tiny import one_thread, tiny_chat_model  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("bench") / "stories260K-chat")


def run_bench(name: str, *args) -> dict:
    """python bench/NAME.py ARGS from the repository root -> the JSON object on the last line of its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, f"bench/{name}.py", *map(str, args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{name} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert isinstance(out, dict), out
    return out


def has_keys(out: dict, keys: str):
    missing = set(keys.split()) - out.keys()
    assert not missing, (missing, out)


def positive(*xs):
    assert all(isinstance(x, Number) and x > 0 for x in xs), xs


def check_trl_side(out: dict, trl_keys: str):
    """With TRL: its figures and the ratio are there. Without: only TRL's side is skipped, and the JSON says so."""
    if HAS_TRL:
        assert out["trl"] != "not installed"
        positive(out["trl_s_per_step"], out["ratio"])
        assert isinstance(out["ok"], bool)
    else:
        assert out["trl"] == "not installed"
        assert out["ratio"] is None and out["ok"] is None
        assert all(out[k] is None for k in trl_keys.split()), out


def test_bench_grpo(model):
    out = run_bench("bench_grpo", "--model", model, "--prompts", 1, "--prompt-tokens", 32, "--new-tokens", 4,
                    "--steps", 1, "--threads", 1, "--variants", "lora:2", "top:1")
    trl_keys = ("trl_s_per_step trl_phases trl_peak_rss_mb trl_steps_s trl_prompt_tokens trl_response_length "
                "rss_ratio")
    has_keys(out, "ours_s_per_step ratio target_ratio target_rss_ratio share_prompts ok trl ours_phases ours_peak_rss_mb ours_steps_s prompt_tokens "
                  "response_length old_logprobs new_tokens steps threads model prompts " + trl_keys)
    positive(out["ours_s_per_step"], *out["ours_steps_s"], out["ours_peak_rss_mb"])
    assert len(out["ours_steps_s"]) == 1 and set(out["ours_phases"]) == {"rollout", "scoring", "update"}
    assert len(out["prompt_tokens"]) == 1 and out["response_length"] == 4  # EOS held back: every row 4 tokens
    assert set(out["variants"]) == {"lora:2", "top:1"}  # our step with LoRA and with the top block only
    for v in out["variants"].values():
        positive(v["s_per_step"], v["peak_rss_mb"], v["speedup_vs_full"], v["rss_vs_full"])
    lora = out["variants"]["lora:2"]  # TRL's GRPOTrainer with a PEFT LoRA of the same rank, when TRL is there
    if HAS_TRL:
        positive(lora["trl_s_per_step"], lora["trl_peak_rss_mb"], lora["ratio"], lora["rss_vs_trl"])
    else:
        assert "trl_s_per_step" not in lora
    check_trl_side(out, trl_keys)


def test_bench_dpo(model):
    out = run_bench("bench_dpo", "--model", model, "--pairs", 2, "--prompt-tokens", 32, "--profile-tokens", 8,
                    "--steps", 1, "--threads", 1)
    trl_keys = "trl_s_per_step trl_peak_rss_mb trl_steps_s tokens_trl"
    has_keys(out, "ours_s_per_step ratio target_ratio ok trl ours_peak_rss_mb ours_steps_s tokens_ours "
                  "reference_in_step pairs micro_batch_pairs steps threads model " + trl_keys)
    positive(out["ours_s_per_step"], *out["ours_steps_s"], out["ours_peak_rss_mb"])
    assert len(out["ours_steps_s"]) == 1 and out["pairs"] == 2
    assert out["tokens_ours"][1:] == [8, 8]  # 7 tokens of profile text + EOS, chosen and rejected
    check_trl_side(out, trl_keys)


def test_bench_data():
    out = run_bench("bench_data", "--reviews", 2000, "--items", 100)
    has_keys(out, "reviews process_s peak_rss_mb reviews_per_s generate_s generate_peak_rss_mb target_s "
                  "target_rss_mb ok")
    assert out["reviews"] >= 2000
    positive(out["reviews_per_s"], out["peak_rss_mb"], out["generate_peak_rss_mb"])  # generated, then processed


def test_bench_load(model):
    out = run_bench("bench_load", "--model", model)
    has_keys(out, "model weights_mb ours_peak_mb transformers_peak_mb ours_copies transformers_copies ratio ours_s "
                  "transformers_s")
    assert 0.5 < out["weights_mb"] < 2  # 260K fp32 parameters, ~1 MiB
    for side in ("ours", "transformers"):  # each side loaded in its own process and reported
        assert isinstance(out[f"{side}_peak_mb"], Number) and isinstance(out[f"{side}_s"], Number)


def test_bench_recommender(model):
    out = run_bench("bench_recommender", "--model", model, "--n", 4, "--batch-sizes", 4, "--repeats", 1)
    has_keys(out, "ours_ex_per_s hf_ex_per_s ratio ours_no_prefix_ex_per_s shared_prefix_tokens batch_size n "
                  "max_abs_diff per_batch_size_ex_per_s")
    positive(out["ours_ex_per_s"], out["hf_ex_per_s"], out["ours_no_prefix_ex_per_s"], out["ratio"])
    assert out["n"] == 4 and out["batch_size"] == 4
    assert out["max_abs_diff"] < 1e-3  # both sides computed the same expected ratings


def test_bench_sampler(model):
    out = run_bench("bench_sampler", "--model", model, "--new-tokens", 4, "--prompt-tokens", 128, "--repeats", 1,
                    "--repeats-b", 1, "--threads", 1)
    has_keys(out, "model threads bandwidth_gb_s weight_mb load_avg compiled a_batch16_greedy b_group8_sampled")
    for case in ("a_batch16_greedy", "b_group8_sampled"):
        has_keys(out[case], "ours_tok_s hf_tok_s ratio round_ratios ours_warmup_s bound_tok_s bound_share")
        positive(out[case]["ours_tok_s"], out[case]["hf_tok_s"], out[case]["ratio"])
    assert out["a_batch16_greedy"]["same_tokens"] is True  # greedy: both sides agree token for token
    assert len(out["b_group8_sampled"]["prompt_lens"]) == 4
