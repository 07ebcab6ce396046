"""The trainers' math lines up with its definition end to end: gradient accumulation and ranks do not change a
GRPO step, the logged loss is the one back-propagated, sampler and recomputed log-probs share one vocabulary,
DPO's stored reference log-probs are keyed by what they depend on, IPO averages per token, LettinGo candidates
draw from their own streams."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import load_model, load_tokenizer
from model.sampler import generate
from rl.config import parse_config
from rl.dpo import dpo_loss, sequence_logprob
from rl.grpo_trainer import PRESETS, GRPOConfig, train
from rl.rollout import batched_logprobs, make_batch
from rl.tracking import read_metrics
from tests.tiny import STORIES, one_thread, script_function, tiny_chat_model, tiny_dataset  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
# one mini-batch of 4 prompts x G 4 = 16 rows per step; --grad-clip large so clipping never rescales; every row
# whole (2 ranks do so under FSDP): a micro-batch's shared prompts round differently by their number, which Adam
# turns into lr-size steps where a gradient entry is ~0 (the shared path's own parity: tests/test_rl_math.py)
STEP = ["--share-prompt-forward", "false","--env", "toy", "--model", str(STORIES), "--prompts-per-step", "4", "--mini-batch-prompts", "4",
        "--group-size", "4", "--max-new-tokens", "10", "--lr", "1e-3", "--kl-coef", "0.05", "--grad-clip", "1e9",
        "--val-every", "0", "--log-text-every", "0", "--device", "cpu", "--max-steps", "1", "--save-every", "1",
        "--temperature", "1.0"]


def one_step(run_dir, mode, micro_rows, nproc=1, extra=()):
    args = [*STEP, "--loss-agg", mode, "--micro-batch-rows", str(micro_rows), "--run-dir", str(run_dir), *extra]
    if nproc == 1:
        train(parse_config(GRPOConfig, PRESETS, args, default_preset="cpu-demo")[0])
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "scripts/train_grpo.py"), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
    w = load_file(str(Path(run_dir) / "checkpoints/step_1/model/model.safetensors"))
    return w, read_metrics(run_dir)[-1]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_one_step_same_with_micro_batches_and_ranks(tmp_path, mode):
    """Micro-batches of 2 or 8 rows, 1 or 2 ranks: the same gradient (its norm before clipping), the same loss,
    the same weights after the step. Before the global sequence count, seq-mean-token-mean's gradient was
    (micro-batches per mini-batch x ranks) times too large."""
    start = load_file(str(STORIES / "model.safetensors"))
    ref_w, ref_m = one_step(tmp_path / "mb8", mode, 8)
    runs = {"mb2": one_step(tmp_path / "mb2", mode, 2), "2 ranks mb2": one_step(tmp_path / "r2", mode, 2, nproc=2)}
    assert max((ref_w[k] - start[k]).abs().max() for k in ref_w) > 1e-4  # the step moved the weights
    for name, (w, m) in runs.items():
        for k in ("train/grad_norm", "train/loss", "train/pg_loss", "train/kl"):
            assert abs(m[k] - ref_m[k]) <= 1e-5 * max(1.0, abs(ref_m[k])), (name, k, m[k], ref_m[k])
        assert max((w[k] - ref_w[k]).abs().max() for k in w) <= 1e-6, name


def test_logged_loss_is_the_backpropagated_loss(tmp_path):
    """Token-mean, 8 micro-batches, two PPO epochs over the same rows (so the second has ratios != 1 and a KL):
    train/loss = pg_loss + kl_coef * kl, the mean of what the two updates back-propagated (the log used to
    divide it by about the number of micro-batches)."""
    _, m = one_step(tmp_path / "run", "token-mean", 2, extra=["--ppo-epochs", "2", "--lr", "1e-2", "--kl-coef", "0.5"])
    want = m["train/pg_loss"] + 0.5 * m["train/kl"]
    assert m["train/kl"] > 0.1  # the check has something to see
    assert abs(m["train/loss"] - want) <= 1e-5 * abs(want), (m["train/loss"], want)


def test_sampler_and_recomputed_logprobs_share_the_vocabulary():
    """With an embedding table larger than the tokenizer (every Qwen), the sampler's log-probs and the ones the
    loss recomputes are over the same ids: equal at vocab_limit, off by nats without it."""
    model = load_model(STORIES)
    limit, T = 400, 0.9  # stories260K's table has 512 rows: pretend the tokenizer knows 400 ids
    prompts = [[1, 403, 260], [1, 365]]
    out = generate(model, prompts, 8, temperature=T, n=2, vocab_limit=limit, eos_ids=[2], pad_id=0, seed=3)
    comps = out.completions()
    batch = make_batch(prompts, comps, pad_id=0, repeat=2)
    sampled = out.logprobs[:, :batch.completion_len]
    mask = batch.mask > 0
    recomputed = batched_logprobs(model, batch, 4, T, vocab_limit=limit)
    assert torch.allclose(recomputed[mask], sampled[mask], atol=1e-4)
    whole_table = batched_logprobs(model, batch, 4, T)
    assert (whole_table[mask] - sampled[mask]).abs().max() > 1e-2


# ---------------------------------------------------------------- DPO


def test_ipo_on_per_token_average_logps():
    """IPO is computed, as in TRL, on log-probs averaged over each profile's tokens; DPO on sums."""
    tl = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, -2.0, -2.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert sequence_logprob(tl, m, average=True).tolist() == [-2.0, -2.0]
    assert sequence_logprob(tl, m).tolist() == [-4.0, -6.0]
    from rl.dpo_trainer import average_logps

    cfg = parse_config(__import__("rl.dpo_trainer", fromlist=["DPOConfig"]).DPOConfig, {}, ["--loss-type", "ipo"])[0]
    assert average_logps(cfg)
    cfg.ipo_average = False
    assert not average_logps(cfg)
    cfg.loss_type, cfg.ipo_average = "sigmoid", True
    assert not average_logps(cfg)
    # (pi_c - pi_r) - (ref_c - ref_r) on averages: (-2 - -2) - (-1 - -3) = -2; beta 0.1: (-2 - 5)^2
    loss, _ = dpo_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-3.0]),
                       beta=0.1, loss_type="ipo")
    assert abs(float(loss) - 49.0) < 1e-5


def test_reference_logps_keyed_by_what_they_depend_on(tmp_path, capsys):
    from rl.distributed import Dist
    from rl.dpo_trainer import reference_logprobs

    model = load_model(STORIES)
    encoded = [([1, 403, 260], [365, 2], [300, 301, 2]), ([1, 365], [260, 2], [2])]
    d = Dist()
    path = tmp_path / "ref_logps.json"
    key = {"model": "a", "pairs_sha256": "x", "average": False}
    first = reference_logprobs(model, encoded, 2, d, path, key)
    assert json.loads(path.read_text())["key"] == key
    # same key: the stored values are used (a planted value shows it)
    saved = json.loads(path.read_text())
    saved["logps"][0][0] = -123.0
    path.write_text(json.dumps(saved))
    assert reference_logprobs(model, encoded, 2, d, path, key)[0, 0] == -123.0
    # another model (or pairs, style, token limits): recomputed, and said
    again = reference_logprobs(model, encoded, 2, d, path, {**key, "model": "b"})
    assert torch.allclose(again, first) and "computed for another model" in capsys.readouterr().out
    avg = reference_logprobs(model, encoded, 2, d, path, {**key, "average": True}, average=True)
    assert torch.allclose(avg[:, 0], first[:, 0] / 2) and torch.allclose(avg[1, 1], first[1, 1])
    # a file of the old format (a bare list) is recomputed too
    path.write_text(json.dumps(first.tolist()))
    assert torch.allclose(reference_logprobs(model, encoded, 2, d, path, key), first)


def test_lettingo_candidates_draw_from_their_own_streams(tmp_path, monkeypatch):
    """Each (user, style, temperature, sample) has its own random stream, whatever the batch or the job order:
    candidates at two temperatures no longer share their first draws."""
    import model.sampler as sampler
    from data import load_dataset
    from data.history import HistoryIndex
    from rl import lettingo
    from eval.profiles import HistoryOptions

    model_dir, data = tiny_chat_model(tmp_path / "m"), tiny_dataset(tmp_path / "d")
    ds = load_dataset(data)
    hx = HistoryIndex(ds)
    users = lettingo.user_windows(ds, 2, 3, 3)
    seen = []
    real = sampler.generate

    def spy(*a, **kw):
        seen.extend(kw["seeds"])
        return real(*a, **kw)

    monkeypatch.setattr(sampler, "generate", spy)
    m, tok = load_model(model_dir), load_tokenizer(model_dir)
    kw = dict(hist=HistoryOptions(3, 0, 30), max_new_tokens=6, max_prompt_tokens=4096, seed=5, progress=False)
    rows = lettingo.explore(users, ds, hx, "tiny", m, tok, ["lg", "kar"], [0.7, 1.2], 2, batch_prompts=2, **kw)
    assert len(seen) == len(rows) == 3 * 2 * 2 * 2 and len(set(seen)) == len(seen)
    # one user alone, in another batch: the same texts as in the full run
    alone = lettingo.explore(users[2:], ds, hx, "tiny", m, tok, ["kar"], [1.2], 2, batch_prompts=1, **kw)
    full = [r["text"] for r in rows if r["user_id"] == users[2]["user_id"] and r["style"] == "kar"
            and r["temperature"] == 1.2]
    assert [r["text"] for r in alone] == full


# ---------------------------------------------------------------- bad flags

GRPO_BAD = [("--group-size", "1"), ("--group-size", "0"), ("--lr", "-1"), ("--temperature", "0"),
            ("--top-p", "1.5"), ("--clip-low", "1.2"), ("--clip-ratio-c", "0.5"), ("--kl-coef", "-0.1"),
            ("--prompts-per-step", "3"), ("--micro-batch-rows", "0"), ("--loss-agg", "sum"),
            ("--old-logprobs", "cache"), ("--env", "chess"), ("--lr-schedule", "linear"), ("--max-steps", "-2")]
DPO_BAD = [("--beta", "0"), ("--label-smoothing", "0.7"), ("--loss-type", "hinge"), ("--stage", "fly"),
           ("--styles", "haiku"), ("--train-style", "duet"), ("--pair-mode", "some"), ("--temperatures", "-1"),
           ("--pairs-per-step", "0"), ("--max-new-tokens", "1"), ("--lr", "0")]


@pytest.mark.parametrize("script,flag,value", [("train_grpo", f, v) for f, v in GRPO_BAD]
                         + [("train_dpo", f, v) for f, v in DPO_BAD])
def test_bad_flag_exits_2_naming_it(script, flag, value, capsys, tmp_path, monkeypatch):
    """Checked before anything loads: exit status 2 and one line naming the flag; nothing is written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        script_function(script, "main")([flag, value, "--run-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and flag in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,args,says", [
    ("train_grpo", ["--group-size", "1"], "--group-size"),
    ("train_grpo", ["--model", "/no/such/model"], "/no/such/model"),
    ("train_dpo", ["--data", "/no/such/data", "--stage", "pairs"], "/no/such/data"),
])
def test_user_errors_exit_2_without_traceback_within_seconds(tmp_path, script, args, says):
    import time

    t0 = time.time()
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args, "--run-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert says in res.stderr and "error:" in res.stderr and "Traceback" not in res.stderr
    assert time.time() - t0 < 30
