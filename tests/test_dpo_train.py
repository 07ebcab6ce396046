"""LettinGo / DPO end to end on a tiny chat model: masks with a known answer, learning on toy pairs, FSDP two
ranks equal one process, resume equals an uninterrupted run, and the explore -> score -> pairs stages."""
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import load_model, load_tokenizer
from rl.config import parse_config
from rl.dpo_trainer import PRESETS, DPOConfig, encode_pairs, pair_logprobs, train
from rl.lettingo import read_jsonl, select_pairs, write_jsonl
from rl.tracking import read_metrics
from tests.tiny import one_thread, script_function, tiny_chat_model, tiny_dataset  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
run_stages = script_function("train_dpo", "run_stages")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return tiny_chat_model(base / "model"), tiny_dataset(base / "data")


def toy_pairs(data_dir, n_users=6):
    """Each user: chosen = a fixed happy sentence, rejected = a fixed sad one (the policy must learn to prefer)."""
    from data import load_dataset

    ds = load_dataset(data_dir)
    users = sorted({x.user_id for x in ds.split("train")})[:n_users]
    t = {u: max(x.timestamp for x in ds.split("train") if x.user_id == u) for u in users}
    return [{"user_id": u, "t_cut": t[u], "chosen": "Lily was happy and she smiled.",
             "rejected": "Tom was sad and he cried.", "chosen_score": 0.9, "rejected_score": 0.4,
             "chosen_from": "toy", "rejected_from": "toy"} for u in users]


def args_for(model, data, run_dir, *extra):
    return ["--model", str(model), "--data", str(data), "--run-dir", str(run_dir), "--stage", "train",
            "--pairs-per-step", "4", "--micro-batch-pairs", "2", "--user-history", "3", "--review-chars", "30",
            "--max-new-tokens", "32", "--max-prompt-tokens", "4096", "--val-every", "0", "--device", "cpu",
            "--lr", "1e-3", *extra]


def write_pairs(run_dir, data):
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(run_dir) / "pairs.jsonl", toy_pairs(data))


def run_script(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    res = subprocess.run([*pre, str(ROOT / "scripts/train_dpo.py"), *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_pair_logprobs_known_answer(tiny):
    """Summed log-probs of chosen/rejected in a padded batch == an unpadded single-sequence computation, with each
    pair's prompt run once for both (share_prompts) or once per row."""
    model, _ = tiny
    m = load_model(model)
    tok = load_tokenizer(model)
    prompts = [tok.encode("Once upon a time"), tok.encode("The dog")]
    chosen = [tok.encode("there was a cat", add_special_tokens=False) + [2], tok.encode("ran", add_special_tokens=False) + [2]]
    rejected = [tok.encode("big", add_special_tokens=False) + [2], tok.encode("was very very sad", add_special_tokens=False) + [2]]
    encoded = list(zip(prompts, chosen, rejected))
    with torch.no_grad():
        for share in (False, True):
            pc, pr = pair_logprobs(m, encoded, [0, 1], share_prompts=share)
            for i in range(2):
                for comp, got in ((chosen[i], pc[i]), (rejected[i], pr[i])):
                    seq = torch.tensor([prompts[i] + comp])
                    logp = torch.log_softmax(m(seq)[0].float(), -1)  # (T, V)
                    P = len(prompts[i])
                    # token at position P + j is predicted by the logits at P + j - 1
                    want = sum(logp[P + j - 1, t] for j, t in enumerate(comp))
                    assert abs(float(got) - float(want)) < 1e-4


def test_dpo_learns_toy_pairs(tiny, tmp_path):
    model, data = tiny
    write_pairs(tmp_path, data)
    cfg = parse_config(DPOConfig, PRESETS, args_for(model, data, tmp_path, "--max-steps", "12", "--save-every", "0"))[0]
    train(cfg)
    ms = read_metrics(tmp_path)
    assert len(ms) == 12
    assert ms[0]["train/reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert ms[-1]["train/reward_accuracy"] == 1.0 and ms[-1]["train/reward_margin"] > 1.0
    assert ms[-1]["train/loss"] < 0.5 * ms[0]["train/loss"]


def test_dpo_fsdp_and_resume(tiny, tmp_path):
    model, data = tiny
    for name in ("one", "two", "split"):
        write_pairs(tmp_path / name, data)
    common = ["--max-steps", "4", "--save-every", "2", "--lr-schedule", "cosine"]
    run_script(args_for(model, data, tmp_path / "one", *common))
    run_script(args_for(model, data, tmp_path / "two", *common), nproc=2)
    run_script(args_for(model, data, tmp_path / "split", *common, "--stop-after", "2"))
    run_script(args_for(model, data, tmp_path / "split", *common, "--resume"))
    w = {n: load_file(str(tmp_path / n / "checkpoints/step_4/model/model.safetensors")) for n in ("one", "two", "split")}
    assert max((w["one"][k] - w["two"][k]).abs().max() for k in w["one"]) <= 1e-5
    assert all(torch.equal(w["one"][k], w["split"][k]) for k in w["one"])
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(one, two):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5


def test_select_pairs_modes():
    rows = [{"user_id": "u", "candidate": i, "reward": r, "profile": f"p{i}", "explorer": "m", "style": "lg",
             "temperature": 1.0} for i, r in enumerate([0.5, 0.9, 0.7])]
    rows.append({**rows[0], "user_id": "v", "candidate": 9})  # a single candidate: no pair
    bw = select_pairs(rows, "best-worst", 0.0)
    assert [(p["chosen"], p["rejected"]) for p in bw] == [("p1", "p0")]
    allp = select_pairs(rows, "all", 0.15)
    assert sorted((p["chosen"], p["rejected"]) for p in allp) == [("p1", "p0"), ("p1", "p2"), ("p2", "p0")]
    assert select_pairs(rows, "best-worst", 0.5) == []


def test_encode_pairs_style_prefix_ends_the_prompt(tiny):
    """lg-rating: the prompt ends with "Usually rates " as in exploration and validation; chosen and rejected are
    the tokens written after it (+ EOS), so prompt + completion re-reads as the explored answer."""
    from data import load_dataset
    from data.history import HistoryIndex

    model, data = tiny
    tok = load_tokenizer(model)
    ds = load_dataset(data)
    pairs = toy_pairs(data, n_users=2)
    pairs[0].update(chosen="Usually rates 4/5. Likes calm songs.", rejected="Usually rates 2/5.")
    pairs[1].update(chosen="Usually rates", rejected="Usually rates 1/5 and hates noise.")
    cfg = parse_config(DPOConfig, PRESETS, ["--train-style", "lg-rating", "--user-history", "3",
                                            "--review-chars", "30", "--max-prompt-tokens", "4096"])[0]
    enc = encode_pairs(pairs, tok, ds, HistoryIndex(ds), cfg)
    eos = tok.eos_token_id
    opener = tok.encode("Usually rates ", add_special_tokens=False)
    for (prompt, c, r), p in zip(enc, pairs):
        assert prompt[-len(opener):] == opener
        for ids, text in ((c, p["chosen"]), (r, p["rejected"])):
            assert ids[-1] == eos
            # (the tiny sentencepiece tokenizer adds a space when it encodes a text alone; byte-level BPE does not)
            assert " ".join(tok.decode(prompt[-len(opener):] + ids[:-1]).split()) == text
    assert enc[0][1][:-1] == tok.encode("4/5. Likes calm songs.", add_special_tokens=False)
    assert enc[0][2][:-1] == tok.encode("2/5.", add_special_tokens=False)
    assert enc[1][1] == [eos]  # nothing written after the prefix
    # a profile from another style has no prefix to continue: the error names the pair and the side
    pairs[1]["rejected"] = "Likes rock."
    with pytest.raises(ValueError, match="pair 2: the rejected profile"):
        encode_pairs(pairs, tok, ds, HistoryIndex(ds), cfg)


def test_stages_explore_score_pairs(tiny, tmp_path):
    """The data stages on the tiny model; each writes its file, and a stage alone resumes from the previous one."""
    model, data = tiny
    base = ["--model", str(model), "--explorers", str(model), "--data", str(data), "--run-dir", str(tmp_path),
            "--users", "4", "--heldout", "2", "--min-history", "3", "--styles", "lg", "lg-rating",
            "--temperatures", "0.8", "1.5", "--samples", "2", "--user-history", "3", "--review-chars", "30",
            "--max-new-tokens", "16", "--max-prompt-tokens", "4096", "--device", "cpu", "--pair-margin", "0"]
    cfg = parse_config(DPOConfig, PRESETS, base + ["--stage", "explore"])[0]
    run_stages(cfg)
    cands = read_jsonl(tmp_path / "candidates.jsonl", "explore")
    assert len(cands) == 4 * 2 * 2 * 2  # users x styles x temperatures x samples
    assert {c["style"] for c in cands} == {"lg", "lg-rating"} and all(c["explorer"] == str(model) for c in cands)
    # lg-rating's answer opens with its prefix, which stays part of the candidate profile
    rated = [c for c in cands if c["style"] == "lg-rating"]
    assert all(c["text"].startswith("Usually rates ") and c["profile"].startswith("Usually rates ") for c in rated)
    assert not any(c["text"].startswith("Usually rates ") for c in cands if c["style"] == "lg")
    run_stages(parse_config(DPOConfig, PRESETS, base + ["--stage", "score"])[0])
    scores = read_jsonl(tmp_path / "scores.jsonl", "score")
    assert scores and all(0 <= s["mae"] <= 4 and s["n_heldout"] == 2 for s in scores)
    run_stages(parse_config(DPOConfig, PRESETS, base + ["--stage", "pairs"])[0])
    pairs = read_jsonl(tmp_path / "pairs.jsonl", "pairs")
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    # a stage whose input is missing names the file and the stage to run
    (tmp_path / "scores.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="scores.jsonl.*score"):
        run_stages(parse_config(DPOConfig, PRESETS, base + ["--stage", "pairs"])[0])


def _data_stages_worker(rank, world, init_file, argv):
    """One rank of the explore and score stages, as scripts/train_dpo.py runs them (a barrier after each)."""
    import torch.distributed as tdist

    from rl import lettingo
    from rl.distributed import Dist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=60))
    cfg = parse_config(DPOConfig, PRESETS, argv)[0]
    d = Dist(rank=rank, world=world, local_rank=rank)
    ds, hx = lettingo.dataset(cfg)
    for stage in (lettingo.stage_explore, lettingo.stage_score):
        stage(cfg, d, ds, hx)
        tdist.barrier()
    tdist.destroy_process_group()


def test_data_stages_two_ranks_with_uneven_shares(tiny, tmp_path):
    """One user and one candidate over two ranks: rank 1 has nothing to explore and nothing to score. Each rank
    holds a full copy of the explorer and the recommender, so neither may wait in a collective the other never
    runs (sampler steps, the recommender's shared prefix); the candidate and its score are one process's."""
    import torch.multiprocessing as mp

    from rl import lettingo
    from rl.distributed import Dist

    model, data = tiny
    argv = ["--model", str(model), "--explorers", str(model), "--data", str(data), "--users", "1",
            "--heldout", "2", "--min-history", "3", "--styles", "lg", "--temperatures", "0.8", "--samples", "1",
            "--user-history", "3", "--review-chars", "30", "--max-new-tokens", "16", "--max-prompt-tokens",
            "4096", "--device", "cpu"]
    two = tmp_path / "two"
    ctx = mp.start_processes(_data_stages_worker, args=(2, str(tmp_path / "init"), [*argv, "--run-dir", str(two)]),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the data stages hung on two ranks")
    cfg = parse_config(DPOConfig, PRESETS, [*argv, "--run-dir", str(tmp_path / "one")])[0]
    ds, hx = lettingo.dataset(cfg)
    lettingo.stage_explore(cfg, Dist(), ds, hx)
    lettingo.stage_score(cfg, Dist(), ds, hx)
    (c1, s1), (c2, s2) = ((read_jsonl(run / "candidates.jsonl", "explore"), read_jsonl(run / "scores.jsonl", "score"))
                          for run in (tmp_path / "one", two))
    assert len(c1) == len(c2) == len(s1) == len(s2) == 1 and c1[0]["text"] == c2[0]["text"]
    assert s2[0]["reward"] == pytest.approx(s1[0]["reward"], abs=1e-5)


def test_validate_pairs_profiles_against_no_profile(tiny):
    """validate(): mae_none is the history-only (10H) recommender on every target; with every profile parsed,
    mae_vs_none is MAE(with profiles) - MAE(none) over the same rows; generating a few prompts at a time gives
    the figures of one batch."""
    from data import load_dataset
    from data.history import HistoryIndex
    from eval.recommender import Recommender
    from eval.profiles import HistoryOptions, rec_example
    from rl.distributed import Dist
    from rl.validation import validate

    model_dir, data_dir = tiny
    ds = load_dataset(data_dir)
    hx = HistoryIndex(ds)
    tok = load_tokenizer(model_dir)
    policy, rec = load_model(model_dir), Recommender(load_model(model_dir), tok, batch_size=4)
    targets = sorted(ds.split("valid"), key=lambda x: (x.timestamp, x.user_id))[:6]
    hist = HistoryOptions(3, 2, 40)
    run = lambda gen_batch: validate(policy, tok, rec, ds, hx, targets, "lg", hist, Dist(), 12, 4096,  # noqa: E731
                                     gen_batch=gen_batch)
    m = run(32)
    assert m["format_failures"] == 0 and m["n"] == len(targets)  # the free-text parser takes any non-empty answer
    y_none, _ = rec.score([rec_example(hx, ds, x, None, None, hist.review_chars) for x in targets])
    mae_none = sum(abs(x.rating - float(y)) for x, y in zip(targets, y_none)) / len(targets)
    assert abs(m["mae_none"] - mae_none) < 1e-5
    assert abs(m["mae_vs_none"] - (m["mae"] - m["mae_none"])) < 1e-5 and m["mae_vs_none_se"] >= 0
    chunked = run(4)  # two generate calls (4 + 2 prompts)
    assert all(abs(chunked[k] - m[k]) < 1e-4 for k in ("mae", "mae_none", "mae_vs_none", "reward"))


@pytest.mark.parametrize("style", ["lg", "duet"])
def test_validation_and_evaluate_give_the_same_numbers(tiny, style):
    """Training's validation and scripts/evaluate.py's pipeline write, parse and score profiles on the same path:
    the same examples give the same metrics (duet: every profile fails on the tiny model, so the fallback too)."""
    from data import load_dataset
    from data.history import HistoryIndex
    from eval.evaluate import build_examples, evaluate_method
    from eval.profiles import HistoryOptions
    from eval.recommender import Recommender
    from rl.distributed import Dist
    from rl.validation import validate

    model_dir, data_dir = tiny
    ds = load_dataset(data_dir)
    hx = HistoryIndex(ds)
    tok = load_tokenizer(model_dir)
    policy, rec = load_model(model_dir), Recommender(load_model(model_dir), tok, batch_size=4)
    examples = build_examples(ds, "valid", limit=6)
    stop = ("</item_profile>",) if style == "duet" else ()
    val = validate(policy, tok, rec, ds, hx, examples, style, HistoryOptions(3, 2, 40), Dist(), 12, 4096,
                   stop_texts=stop)
    ev, _ = evaluate_method(style, examples, ds, recommender=rec, generator=policy, gen_tok=tok, hist=hx,
                            profile_history=3, item_history=2, review_chars=40, max_new_tokens=12)
    keys = ("n", "format_failures", "mae_fallback") + (("mae", "rmse", "acc", "f1_macro_5") if style == "lg" else ())
    assert val["n"] + val["format_failures"] == len(examples)
    for k in keys:
        assert ev[k] == pytest.approx(val[k], abs=1e-6), k
