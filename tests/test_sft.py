"""SFT warm start: the NLL against torch's cross-entropy, best-of-N selection, the toy task learnt from the policy's
own best samples, a teacher's JSONL pairs learnt (bad lines named), resume equal to an uninterrupted run, and an
SFT LoRA adapter continued by GRPO."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import load_model, load_tokenizer
from rl.config import parse_config
from rl.envs import TokenShareEnv, token_share
from rl.rollout import completion_logprobs, make_batch
from rl.sft import best_of_n, sft_loss
from rl.sft_trainer import PAIRS_FILE, PRESETS, SFTConfig, load_pairs, train
from rl.tracking import read_metrics
from tests.tiny import STORIES, one_thread, script_function, tiny_chat_model  # noqa: F401 (autouse fixture)

TOY = ["--env", "toy", "--model", str(STORIES), "--max-new-tokens", "12", "--val-every", "0", "--save-every", "0",
       "--device", "cpu", "--micro-batch-rows", "2"]


def cfg_from(argv):
    return parse_config(SFTConfig, PRESETS, argv, default_preset="cpu-demo")[0]


def test_sft_loss_is_token_mean_cross_entropy():
    """sft_loss over completion_logprobs == F.cross_entropy of the model's logits on the completion tokens (an
    independent path: full logits, shifted by hand), with ragged prompts and completions."""
    torch.manual_seed(0)
    model = load_model(str(STORIES), dtype=torch.float32)
    prompts = [[5, 6, 7, 8], [9, 10]]
    comps = [[20, 21, 22], [30, 31, 32, 33, 34]]
    batch = make_batch(prompts, comps, pad_id=0)
    logp, _ = completion_logprobs(model, batch, 1.0)
    ours = sft_loss(logp, batch.mask, batch.mask.sum())
    nll, count = 0.0, 0
    for p, c in zip(prompts, comps):
        ids = torch.tensor([p + c])
        logits = model(ids)[0]  # (T, V)
        nll += F.cross_entropy(logits[len(p) - 1:-1], torch.tensor(c), reduction="sum")
        count += len(c)
    assert torch.allclose(ours, nll / count, atol=1e-5), (float(ours), float(nll / count))


def test_best_of_n_keeps_the_best_sample_above_the_floor():
    rewards = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3], [0.95, -1.0, 0.1], [-0.5, -0.2, -0.9]])
    failed = torch.tensor([[False, False, False], [True, False, False], [True, True, True], [False, False, False]])
    assert best_of_n(rewards, 0.0, failed) == [1, 2, -1, -1]
    assert best_of_n(rewards, -1.0, failed) == [1, 2, -1, 1]
    assert best_of_n(rewards, -1.0) == [1, 0, 0, 1]  # failures may be kept: the best reward wins
    assert best_of_n(torch.tensor([[0.5, 0.5]]), 0.0, torch.tensor([[False, False]])) == [0]


def toy_env_reward(model_dir_or_model, env: TokenShareEnv, tok, n=8, tokens=12):
    from model.sampler import generate

    model = model_dir_or_model
    out = generate(model, [env.episode(i).prompt_ids for i in range(env.num_prompts())], tokens, temperature=1.0,
                   n=n, eos_ids=tok.eos_ids, pad_id=tok.pad_token_id, seed=123)
    return sum(token_share(c, env.target) for c in out.completions()) / (env.num_prompts() * n)


def test_best_of_n_sft_raises_the_toy_reward(tmp_path):
    """The policy's best of 16 samples by token share, fitted for 30 steps: its own samples' reward rises to
    about the best-of-16 level, several times the base model's. The pairs file holds what was kept, each with its reward."""
    cfg = cfg_from([*TOY, "--run-dir", str(tmp_path), "--prompts", "16", "--samples", "16", "--min-reward", "0.05",
                    "--batch-pairs", "8", "--max-steps", "30", "--lr", "3e-3"])
    tok = load_tokenizer(str(STORIES))
    env = TokenShareEnv(tok, target_token=int(tok.encode("the", add_special_tokens=False)[0]))
    base = load_model(str(STORIES), dtype=torch.float32)
    before = toy_env_reward(base, env, tok)

    from rl import loop

    captured = {}
    real_build = loop.build_models

    def keep(*a, **k):
        captured["models"] = real_build(*a, **k)
        return captured["models"]

    loop.build_models = keep
    try:
        train(cfg, env=env)
    finally:
        loop.build_models = real_build
    pairs = load_pairs(tmp_path / PAIRS_FILE)
    assert 1 <= len(pairs) <= 16
    assert all(p.reward >= 0.05 and p.completion_ids[-1] == tok.eos_ids[0] for p in pairs)
    m = read_metrics(tmp_path)
    data = [r for r in m if "sft_data/kept_prompts" in r][0]
    assert data["sft_data/best_reward_mean"] > data["sft_data/sample_reward_mean"]
    losses = [r["train/loss"] for r in m if "train/loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    after = toy_env_reward(captured["models"].policy.eval(), env, tok)
    # one round of rejection sampling lifts the policy to about its best-of-16 level (0.10 here), 5x its start
    assert after > 3 * before and after > 0.7 * data["sft_data/best_reward_mean"], (before, after)


def test_jsonl_pairs_are_learnt_and_bad_lines_named(tmp_path):
    model = tiny_chat_model(tmp_path / "m")
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"story {i}", "completion": "Once upon a time"} for i in range(4)]
    rows.append({"messages": [{"role": "user", "content": "a tale"}], "completion": "Once upon a time"})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    train(cfg_from([*TOY, "--model", str(model), "--source", "jsonl", "--pairs", str(pairs), "--run-dir", str(run),
                    "--batch-pairs", "4", "--max-steps", "15", "--lr", "3e-3", "--max-new-tokens", "16"]))
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    assert losses[-1] < 0.25 * losses[0], losses
    assert len(load_pairs(run / PAIRS_FILE)) == 5
    # the same run directory started again from step 0 (no checkpoint to resume) with other pairs: those are fitted,
    # not the ones the earlier run left there
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    train(cfg_from([*TOY, "--model", str(model), "--source", "jsonl", "--pairs", str(pairs), "--run-dir", str(run),
                    "--batch-pairs", "3", "--max-steps", "1", "--resume"]))
    assert len(load_pairs(run / PAIRS_FILE)) == 3

    from data.io import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: needs a non-empty string \"completion\""):
        train(cfg_from([*TOY, "--model", str(model), "--source", "jsonl", "--pairs", str(bad),
                        "--run-dir", str(tmp_path / "run2"), "--max-steps", "1"]))
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not JSON"):
        train(cfg_from([*TOY, "--model", str(model), "--source", "jsonl", "--pairs", str(bad),
                        "--run-dir", str(tmp_path / "run3"), "--max-steps", "1"]))


def adapter_tensors(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step}" / "adapter" / "adapter_model.safetensors"))


def test_resume_equals_uninterrupted_and_grpo_continues_the_adapter(tmp_path):
    """LoRA SFT: 4 steps at once == 2 steps, then --resume to 4 (pairs read back, same adapter weights). Then
    GRPO --init-adapter trains that adapter on: its first step starts from the SFT weights."""
    args = [*TOY, "--prompts", "8", "--samples", "4", "--min-reward", "0.0", "--batch-pairs", "4", "--max-steps", "4",
            "--lr", "1e-2", "--lora-rank", "4", "--save-every", "2"]
    train(cfg_from([*args, "--run-dir", str(tmp_path / "a")]))
    train(cfg_from([*args, "--run-dir", str(tmp_path / "b"), "--stop-after", "2"]))
    train(cfg_from([*args, "--run-dir", str(tmp_path / "b"), "--resume"]))
    a, b = adapter_tensors(tmp_path / "a", 4), adapter_tensors(tmp_path / "b", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], adapter_tensors(tmp_path / "a", 2)[k]) for k in a)

    from rl.grpo_trainer import PRESETS as GP, GRPOConfig, train as grpo_train

    g = parse_config(GRPOConfig, GP, ["--env", "toy", "--model", str(STORIES), "--prompts-per-step", "2",
                                      "--mini-batch-prompts", "2", "--group-size", "4", "--max-new-tokens", "8",
                                      "--val-every", "0", "--device", "cpu", "--lora-rank", "4", "--lr", "1e-9",
                                      "--init-adapter", str(tmp_path / "a/checkpoints/step_4/adapter"),
                                      "--max-steps", "1", "--save-every", "1", "--run-dir", str(tmp_path / "g")],
                     default_preset="cpu-demo")[0]
    grpo_train(g)
    c = adapter_tensors(tmp_path / "g", 1)
    assert c.keys() == a.keys() and all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # lr 1e-9: unmoved


def test_teacher_pairs_are_the_env_prompts_with_a_parsable_answer(tmp_path, capsys):
    """scripts/make_sft_pairs.py: each pair's messages are the DUET environment's prompt for a training target (in
    the trainers' seeded order), and prefix + completion parses, stating the user's rounded average before the
    target (never the target's rating)."""
    from data import load_dataset
    from data.history import HistoryIndex
    from data.prompts import parse_duet
    from eval.profiles import HistoryOptions, profile_messages
    from rl.loop import step_indices
    from tests.tiny import script_function, tiny_dataset

    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "pairs.jsonl"
    script_function("make_sft_pairs", "main")(["--data", str(data), "--out", str(out), "--targets", "5",
                                               "--user-history", "6", "--item-history", "2", "--review-chars", "40"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    ds = load_dataset(data)
    hx = HistoryIndex(ds)
    train = [x for x in ds.split("train") if len(hx.user_history(x.user_id, x.timestamp, 5)) >= 5]
    targets = [train[i] for i in step_indices(0, 5, len(train), 0)]
    assert len(rows) == 5
    for r, x in zip(rows, targets):
        assert r["messages"] == profile_messages("duet", hx, ds, x, HistoryOptions(6, 2, 40))
        parsed, reason = parse_duet("<user_profile><cue>" + r["completion"])
        assert reason == "ok", reason
        assert parsed.user_profile == f"Usually rates {round(hx.user_average(x.user_id, x.timestamp))}/5."

    # --teacher attributes: the target's rating read off exactly the 6 ratings the prompt shows
    from eval.baselines import attribute_estimate

    script_function("make_sft_pairs", "main")(["--data", str(data), "--out", str(out), "--targets", "5",
                                               "--user-history", "6", "--item-history", "2", "--review-chars", "40",
                                               "--teacher", "attributes"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for r, x in zip(rows, targets):
        assert r["messages"] == profile_messages("duet", hx, ds, x, HistoryOptions(6, 2, 40))
        parsed, reason = parse_duet("<user_profile><cue>" + r["completion"])
        assert reason == "ok", reason
        est = attribute_estimate(hx.user_history(x.user_id, x.timestamp, 6), ds.items[x.item_id].title)
        n = min(5, max(1, round(est)))
        assert parsed.user_profile == f"Would rate this album about {n}/5."


def test_probe_teacher_rating_reads_the_digit_after_the_teacher_text():
    """scripts/probe_teacher_rating.py: the pick is the most likely of the digits 1-5 at the last position of
    prompt + completion up to its first "N/5" (a fake model whose last position favours "3", an earlier one "5"),
    and each pair counts under its teacher's N."""
    from eval.profiles import encode_prompt
    from model.hub import resolve_model

    probe = script_function("probe_teacher_rating", "probe")
    split = script_function("probe_teacher_rating", "split_at_rating")
    tok = load_tokenizer(resolve_model("default"))
    assert split("<cue>would rate this album 2/5</cue>...about 2/5.") == ("<cue>would rate this album ", 2)
    assert split("no rating") is None
    three = tok.encode("rates 3", add_special_tokens=False)[-1]
    five = tok.encode("rates 5", add_special_tokens=False)[-1]
    assert tok.decode([three]).strip() == "3" and tok.decode([five]).strip() == "5"
    seen = []

    def fake(ids):  # (1, T) -> (1, T, V)
        seen.append(ids[0].tolist())
        logits = torch.zeros(1, ids.shape[1], tok.vocab_size)
        logits[0, -1, three], logits[0, -2, five] = 1.0, 2.0
        return logits

    msgs = [{"role": "user", "content": "Write the profiles."}]
    rows = [(msgs, "usually rates 3/5</cue>"), (msgs, "would rate this album 5/5</cue>"),
            (msgs, "x</cue><profile>Usually rates 3/5.</profile>"), (msgs, "no rating here")]
    out = probe(fake, tok, rows, "<user_profile><cue>")
    assert out == {"n": 3, "right": 2, "by_teacher_rating": {"3": "2/2", "5": "0/1"}, "picked": {"3": 3}}
    assert seen[1] == encode_prompt(tok, msgs, 4096, "<user_profile><cue>") + tok.encode(
        "would rate this album ", add_special_tokens=False)
