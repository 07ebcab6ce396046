"""The GRPO loop end to end on tiny real models: it learns, two FSDP ranks equal one process, resume equals an
uninterrupted run, a kill during a checkpoint write loses nothing, and the DUET environment runs."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl.config import parse_config
from rl.grpo_trainer import PRESETS, GRPOConfig, train
from rl.tracking import read_metrics
from tests.tiny import STORIES, one_thread, tiny_chat_model, tiny_dataset  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--env", "toy", "--model", str(STORIES), "--prompts-per-step", "4", "--mini-batch-prompts", "2",
       "--group-size", "4", "--micro-batch-rows", "2", "--max-new-tokens", "12", "--lr", "3e-4",
       "--kl-coef", "0.05", "--val-every", "0", "--log-text-every", "1", "--device", "cpu"]


def cfg_from(argv):
    return parse_config(GRPOConfig, PRESETS, argv, default_preset="cpu-demo")[0]


def run_script(args, nproc=1, env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "scripts/train_grpo.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "scripts/train_grpo.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step}" / "model" / "model.safetensors"))


def test_toy_reward_rises(tmp_path):
    """50 steps on the 260K model with the token-share reward: the mean reward climbs far above its start."""
    cfg = cfg_from([*TOY, "--run-dir", str(tmp_path), "--max-steps", "50", "--save-every", "0",
                    "--kl-coef", "0.0", "--lr", "5e-3", "--group-size", "8", "--max-new-tokens", "16"])
    train(cfg)
    rewards = [m["train/reward_mean"] for m in read_metrics(tmp_path)]
    assert len(rewards) == 50
    start, end = rewards[0], sum(rewards[-5:]) / 5  # step 1 is sampled before any update
    assert end > 0.5 and end > 5 * start, (start, end)
    # the logged quantities are there and finite
    last = read_metrics(tmp_path)[-1]
    assert "train/kl" not in last  # --kl-coef 0: no reference forward, no KL to log
    for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "ratio_max", "entropy", "grad_norm", "lr",
              "zero_adv_group_frac", "response_length", "time_rollout", "tokens_per_second"):
        assert torch.isfinite(torch.tensor(last[f"train/{k}"])), k
    # a group's spread is part of the whole batch's: mean within-group std <= the batch's std (total variance)
    assert all(0 <= m["train/reward_group_std"] <= m["train/reward_std"] + 1e-9 for m in read_metrics(tmp_path))
    assert any(m["train/reward_group_std"] > 0 for m in read_metrics(tmp_path))


def test_rollout_in_chunks_equals_one_batch(tmp_path):
    """--rollout-tokens: a rank's prompts are decoded a chunk at a time (here 2 of 4 prompts, G = 8) with the
    samples of one batch: same seeds, tokens, log-probs and lengths, step after step. The chunk size is a function
    of the config alone; a budget below one prompt's group is refused."""
    from rl import distributed as D
    from rl.grpo_trainer import make_env, rollout, rollout_chunk_prompts
    from rl.loop import build_models

    base = [*TOY, "--group-size", "8", "--prompts-per-step", "4", "--mini-batch-prompts", "4",
            "--max-prompt-tokens", "6", "--max-new-tokens", "16", "--run-dir", str(tmp_path)]
    whole, chunked = cfg_from(base), cfg_from([*base, "--rollout-tokens", str(2 * 8 * (6 + 16) + 7)])
    assert rollout_chunk_prompts(whole, 4) == 4 and rollout_chunk_prompts(chunked, 4) == 2
    d = D.Dist()
    models = build_models(whole, None, d)
    env = make_env(whole, models, d)
    for step in (0, 3):
        (eps_a, out_a), (eps_b, out_b) = rollout(step, whole, models, env, d), rollout(step, chunked, models, env, d)
        for name in ("tokens", "logprobs", "lengths", "finished"):
            assert torch.equal(getattr(out_a, name), getattr(out_b, name)), (step, name)
        assert [e.completions for e in eps_a] == [e.completions for e in eps_b]
    with pytest.raises(SystemExit):
        cfg_from([*base, "--rollout-tokens", str(8 * (6 + 16) - 1)])


def test_fsdp_two_ranks_equal_one_process_and_resume(tmp_path):
    """Also the lm_head in chunks of 7 positions under FSDP (log-probs inside forward, recomputed in backward).
    Two ranks stopped after 2 steps and resumed equal two ranks uninterrupted, bit for bit: each rank wrote its
    own shards of the optimizer's state (train_state/, DCP); the same checkpoint resumed by one process
    (resharded) equals them to float rounding."""
    args = [*TOY, "--max-steps", "3", "--save-every", "3", "--logprob-chunk-tokens", "7"]
    run_script([*args, "--run-dir", str(tmp_path / "one")])
    run_script([*args, "--run-dir", str(tmp_path / "two")], nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for k in ("train/loss", "train/reward_mean", "train/kl", "train/pg_loss"):
            assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])
    w1, w2 = weights(tmp_path / "one", 3), weights(tmp_path / "two", 3)
    assert w1.keys() == w2.keys()
    start = load_file(str(STORIES / "model.safetensors"))
    assert max((w1[k] - start[k]).abs().max() for k in w1) > 1e-4  # training moved the weights
    assert max((w1[k] - w2[k]).abs().max() for k in w1) <= 1e-5

    split = tmp_path / "split"
    run_script([*args, "--run-dir", str(split), "--stop-after", "2"], nproc=2)
    state = split / "checkpoints/step_2/train_state"
    assert sorted(f.name for f in state.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from rl.checkpoints import Reader

    meta = Reader(state).read_metadata()
    files = {}
    for index, info in meta.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    exp_avg = {k: v for k, v in files.items() if k.endswith(".exp_avg")}
    assert exp_avg and all(v == {"__0_0.distcp", "__1_0.distcp"} for v in exp_avg.values())  # a shard each
    assert files["rng.rank0.torch"] == {"__0_0.distcp"} and files["rng.rank1.torch"] == {"__1_0.distcp"}
    # Adam's m and v (8 bytes a parameter) and a little framing: no copy of the weights (they are in model/)
    n = sum(t.numel() for t in weights(split, 2).values())
    assert sum(f.stat().st_size for f in state.iterdir()) < 1.3 * 8 * n
    shutil.copytree(split, tmp_path / "resharded")
    run_script([*args, "--run-dir", str(split), "--resume"], nproc=2)
    w3 = weights(split, 3)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    resumed = read_metrics(split)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(two, resumed):
        for k in ("train/loss", "train/reward_mean", "train/kl", "train/pg_loss"):
            assert a[k] == b[k], (k, a[k], b[k])
    run_script([*args, "--run-dir", str(tmp_path / "resharded"), "--resume"])
    w4 = weights(tmp_path / "resharded", 3)
    assert max((w2[k] - w4[k]).abs().max() for k in w2) <= 1e-5


def test_resume_equals_uninterrupted(tmp_path):
    args = [*TOY, "--max-steps", "4", "--save-every", "2", "--lr-schedule", "cosine", "--warmup-steps", "1"]
    run_script([*args, "--run-dir", str(tmp_path / "full")])
    run_script([*args, "--run-dir", str(tmp_path / "split"), "--stop-after", "2"])
    assert not (tmp_path / "split/checkpoints/step_4").exists()
    run_script([*args, "--run-dir", str(tmp_path / "split"), "--resume"])
    a, b = weights(tmp_path / "full", 4), weights(tmp_path / "split", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "split/checkpoints/step_4/trainer_state.json").read_text())
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 8  # 2 updates per step


# the trainer in a child process whose checkpoint writer pauses after the model files of step 2, before the rename
SLOW_SAVE = """
import runpy, sys, time
sys.path.insert(0, {root!r})
import rl.checkpoints as checkpoints
real = checkpoints.save_checkpoint
def slow(out_dir, *a, **k):
    real(out_dir, *a, **k)
    if ".step_2." in str(out_dir):
        time.sleep(60)
checkpoints.save_checkpoint = slow
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_kill_while_writing_checkpoint_keeps_previous(tmp_path):
    run = tmp_path / "run"
    args = [*TOY, "--max-steps", "3", "--save-every", "1", "--run-dir", str(run)]
    script = str(ROOT / "scripts/train_grpo.py")
    child = SLOW_SAVE.format(root=str(ROOT), argv=[script, *args], script=script)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:  # step_1 is complete and the temporary directory of step_2 exists: kill now
        while not ((run / "checkpoints/step_1").exists() and list((run / "checkpoints").glob(".step_2.tmp-*"))):
            assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (run / "checkpoints/step_2").exists()
    from model import load_model
    from rl.checkpoints import latest_checkpoint

    assert latest_checkpoint(run).name == "step_1"
    load_model(run / "checkpoints/step_1/model")  # loadable
    run_script([*args, "--resume"])  # resumes from step 1 and cleans the stale temporary directory
    assert (run / "checkpoints/step_3").exists() and not list((run / "checkpoints").glob(".step_*"))


def test_duet_env_runs_and_checkpoint_loads_in_transformers(tmp_path):
    """The real environment on a tiny chat model and synthetic data: rollout, parse, recommender, validation."""
    model = tiny_chat_model(tmp_path / "tiny")
    data = tiny_dataset(tmp_path / "data")
    cfg = cfg_from(["--model", str(model), "--data", str(data), "--run-dir", str(tmp_path / "run"),
                    "--max-steps", "2", "--save-every", "2", "--val-every", "2", "--val-examples", "4",
                    "--prompts-per-step", "2", "--mini-batch-prompts", "2", "--group-size", "2",
                    "--micro-batch-rows", "2", "--max-new-tokens", "24", "--user-history", "3",
                    "--item-history", "2", "--review-chars", "40", "--max-prompt-tokens", "4096", "--lr", "1e-4"])
    last = train(cfg)
    # a 260K story model writes no DUET tags: every rollout is a format failure with reward -1
    assert last["format_failure_rate"] == 1.0 and last["reward_mean"] == -1.0
    assert last["zero_adv_group_frac"] == 1.0 and abs(last["pg_loss"]) < 1e-6 and last["reward_group_std"] == 0.0
    assert "val_reward" in last and last["val_format_failure_rate"] == 1.0
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert rows[0]["step"] == 0 and "val/reward" in rows[0]  # the curve's starting point, before any update
    # every profile failed: mae_fallback is the frozen recommender's history-only (10H) MAE on the same targets
    from data import load_dataset
    from eval.recommender import Recommender
    from model import load_model, load_tokenizer
    from eval.profiles import HistoryOptions, rec_example
    from rl.duet_env import DuetEnv

    ds, tok, ref = load_dataset(data), load_tokenizer(model), load_model(model)
    env = DuetEnv(ds, tok, Recommender(ref, tok), HistoryOptions(3, 2, 40), 4096, 24, val_examples=4)
    y_hat, _ = env.rec.score([rec_example(env.hx, ds, x, None, None, 40) for x in env.valid])
    mae_10h = sum(abs(x.rating - float(y)) for x, y in zip(env.valid, y_hat)) / len(env.valid)
    assert abs(last["val_mae_fallback"] - mae_10h) < 1e-4 and abs(rows[0]["val/mae_fallback"] - mae_10h) < 1e-4
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run/checkpoints/step_2/model")
    # --max-steps 0 validates a checkpoint against the frozen base recommender, and trains nothing
    cfg0 = cfg_from(["--model", str(tmp_path / "run/checkpoints/step_2/model"), "--recommender", str(model),
                     "--data", str(data), "--run-dir", str(tmp_path / "val"), "--max-steps", "0",
                     "--val-every", "1", "--val-examples", "4", "--max-new-tokens", "24", "--user-history", "3",
                     "--item-history", "2", "--review-chars", "40", "--max-prompt-tokens", "4096"])
    val = train(cfg0)
    assert abs(val["val_mae_fallback"] - mae_10h) < 1e-4 and val["val_format_failure_rate"] == 1.0
    assert not (tmp_path / "val/checkpoints").exists()


def score_texts(env, episode, texts):
    """env.score on one episode whose G completions are the token ids of `texts` -> (rewards, failed)."""
    episode.completions = [env.tok.encode(t, add_special_tokens=False) for t in texts]
    env.score([episode])
    return episode.rewards, episode.failed


def test_duet_env_rewards_parsed_profiles(tmp_path):
    """score(): a well-formed completion is rated by the recommender from its two profiles; a malformed one fails."""
    from data import load_dataset
    from eval.profiles import HistoryOptions, profile_messages, rec_example
    from eval.recommender import Recommender
    from model import load_model, load_tokenizer
    from rl.duet_env import DuetEnv

    path = tiny_chat_model(tmp_path / "tiny")
    ds = load_dataset(tiny_dataset(tmp_path / "data"))
    model, tok = load_model(path), load_tokenizer(path)
    rec = Recommender(model, tok, batch_size=2)
    env = DuetEnv(ds, tok, rec, HistoryOptions(3, 2, 40), 4096, 16, val_examples=2)
    ep = env.episode(0)
    x = ep.meta["target"]
    good = ("<user_profile><cue>likes rock</cue><constructed_prompt>Describe the user.</constructed_prompt>"
            "<profile>Loves loud rock.</profile></user_profile>\n<item_profile><cue>rock</cue><constructed_prompt>"
            "Describe the item.</constructed_prompt><profile>A loud rock album.</profile></item_profile>")
    bad = good.replace("</item_profile>", "")
    rewards, failed = score_texts(env, ep, [good, bad])
    assert failed.tolist() == [False, True]
    y_hat, _ = rec.score([rec_example(env.hx, ds, x, "Loves loud rock.", "A loud rock album.", 40)])
    assert abs(float(rewards[0]) - (1 - abs(x.rating - float(y_hat[0])) / 4)) < 1e-5
    assert ep.prompt_ids == tok.encode_chat(profile_messages("duet", env.hx, ds, x, env.hist))
    assert "Describe" in ep.texts[0] and ep.texts[0] == good  # what the environment read
    # a rollout stopped at "</item_profile>" whose last token carries more characters parses up to the stop
    # text; without a stop text the same characters are trailing text, a failure
    stopped = DuetEnv(ds, tok, rec, HistoryOptions(3, 2, 40), 4096, 16, val_examples=2,
                      stop_text="</item_profile>")
    assert stopped.stop_texts == ("</item_profile>",) and env.stop_texts == ()
    r_stop, f_stop = score_texts(stopped, ep, [good + "></", good + "\nProduct"])
    assert f_stop.tolist() == [False, False] and r_stop.tolist() == pytest.approx([float(rewards[0])] * 2, abs=1e-5)
    assert score_texts(env, ep, [good + "></", good])[1].tolist() == [True, False]
    from data.prompts import cut_after

    assert cut_after("a</x>b</x>c", ["</x>"]) == "a</x>" and cut_after("abc", ["</x>"]) == "abc"
    assert cut_after("a<y>b</x>", ["</x>", "<y>"]) == "a<y>"


def test_format_progress_and_graded_failure_reward(tmp_path):
    from data import load_dataset
    from eval.recommender import Recommender
    from model import load_model, load_tokenizer
    from eval.profiles import HistoryOptions, format_progress
    from rl.duet_env import DuetEnv

    side = "<{0}><cue>a</cue><constructed_prompt>b</constructed_prompt><profile>c</profile></{0}>"
    assert format_progress(side.format("user_profile") + side.format("item_profile")) == 1.0
    assert format_progress(side.format("user_profile")) == 0.5
    assert format_progress("<user_profile><cue>x</cue> and then nothing") == 1 / 8
    assert format_progress("<user_profile><cue> </cue>") == 0.0  # an empty field does not count
    path = tiny_chat_model(tmp_path / "tiny")
    ds = load_dataset(tiny_dataset(tmp_path / "data"))
    model, tok = load_model(path), load_tokenizer(path)
    env = DuetEnv(ds, tok, Recommender(model, tok), HistoryOptions(3, 2, 40), 4096, 16, 2,
                  response_prefix="<user_profile><cue>", format_reward="graded")
    ep = env.episode(0)
    assert ep.prompt_ids[-len(tok.encode("<user_profile><cue>", add_special_tokens=False)):] == \
        tok.encode("<user_profile><cue>", add_special_tokens=False)
    # the completion continues the prefix: 'x</cue>' completes 1 of 8 pairs -> -1 * (1 - 1/8)
    rewards, failed = score_texts(env, ep, ["x</cue> nothing else", "no tags"])
    assert failed.tolist() == [True, True]
    assert rewards.tolist() == pytest.approx([-7 / 8, -1.0])


def test_undefined_metrics_stay_strict_json(tmp_path):
    """A NaN metric (undefined at that step) is left out of metrics.jsonl and is null in the final summary line,
    so both parse with a strict JSON reader."""
    from rl.tracking import Tracker, summary_line

    t = Tracker(tmp_path, enabled=True)
    t.scalars({"pred_mae": float("nan"), "reward_mean": 0.25}, step=1, prefix="train/")
    t.close()
    strict = dict(parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    rows = [json.loads(line, **strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0].pop("time/elapsed_s") >= 0
    assert rows == [{"step": 1, "train/reward_mean": 0.25}]
    assert json.loads(summary_line({"step": 3, "mae": float("nan"), "reward": 1 / 3}), **strict) == \
        {"step": 3, "mae": None, "reward": 0.333333}


def test_wall_time_sums_over_resumes(tmp_path):
    """Every metrics.jsonl row has the run's wall time; a resumed run's clock goes on from the last one logged (a
    torn last line passed over), a fresh run in the same folder starts again from 0."""
    from rl.tracking import Tracker

    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "time/elapsed_s": 100.0}\n{"step": 3, "time/ela\n')
    t = Tracker(tmp_path, enabled=True, resumed=True)
    t.scalars({"kl": 0.5}, step=2, prefix="train/")
    t.close()
    t = Tracker(tmp_path, enabled=True)
    t.scalars({"kl": 0.5}, step=0, prefix="train/")
    t.close()
    resumed, fresh = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[-2:]]
    assert 100.0 <= resumed["time/elapsed_s"] < 110.0 and 0.0 <= fresh["time/elapsed_s"] < 10.0


@pytest.mark.parametrize("nproc", [1, 2])
def test_bfloat16_compute_path_on_cpu(tmp_path, nproc):
    """--dtype bfloat16 runs the GPU's dtype path on the CPU: over fp32 master weights the policy computes in
    bf16 (under autocast in one process, through FSDP's param_dtype on two ranks), the frozen reference holds bf16
    weights; rollout, log-probs, update and checkpoint (fp32) end to end."""
    model = tiny_chat_model(tmp_path / "tiny")
    args = [a if a != str(STORIES) else str(model) for a in TOY]
    res = run_script([*args, "--dtype", "bfloat16", "--max-steps", "1", "--save-every", "1",
                      "--run-dir", str(tmp_path / "run")], nproc=nproc)
    final = json.loads(res.stdout.strip().splitlines()[-1])
    for k in ("loss", "kl", "reward_mean", "grad_norm", "ratio_mean"):
        assert math.isfinite(final[k]), (k, final[k])
    saved = weights(tmp_path / "run", 1)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    start = load_file(str(STORIES / "model.safetensors"))
    assert max((saved[k] - start[k]).abs().max() for k in saved) > 0  # the update reached the master weights


def test_build_models_compute_dtype():
    """--dtype: empty is the device's default; bfloat16 without FSDP keeps the policy's weights fp32 and turns on
    its autocast, the frozen reference is loaded in bf16."""
    from rl.distributed import Dist
    from rl.loop import build_models, resolve_dtype

    assert resolve_dtype("", "cpu") == torch.float32 and resolve_dtype("", "cuda") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="--dtype 'bf16'"):
        resolve_dtype("bf16", "cpu")
    m = build_models(cfg_from(["--model", str(STORIES), "--dtype", "bfloat16"]), None, Dist())
    assert m.policy.lm_head.weight.dtype == torch.float32 and m.policy.autocast_dtype == torch.bfloat16
    assert m.reference.lm_head.weight.dtype == torch.bfloat16 and m.rec_model is m.reference
    ids = torch.tensor([[1, 5, 9, 12]])
    assert m.policy(ids).dtype == m.reference(ids).dtype == torch.bfloat16
    assert build_models(cfg_from(["--model", str(STORIES)]), None, Dist()).policy.autocast_dtype is None
