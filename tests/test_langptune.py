"""The LangPTune loop on a tiny chat model and the tiny synthetic catalogue: it runs end to end (profiles ->
recommender -> writer -> validation), a resumed run equals an uninterrupted one, bad flags are refused."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl.config import parse_config
from rl.langptune_trainer import PRESETS, LangPTuneConfig, train
from rl.tracking import read_metrics
from tests.tiny import one_thread, tiny_chat_model, tiny_dataset  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("lpt")
    return tiny_chat_model(base / "model"), tiny_dataset(base / "data")


def args(model, data, run_dir, *extra):
    return ["--model", str(model), "--data", str(data), "--run-dir", str(run_dir), "--device", "cpu",
            "--targets", "6", "--val-examples", "4", "--rec-steps", "3", "--writer-steps", "2", "--rec-batch", "3",
            "--prompts-per-step", "2", "--max-new-tokens", "8", "--user-history", "3", "--review-chars", "30",
            "--embed-tokens", "64", "--min-history", "3", "--lr", "1e-3", "--rec-lr", "1e-3", *extra]


def weights(run_dir, it, name):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{it}" / name / "model.safetensors"))


def test_one_iteration_runs_and_logs(tiny, tmp_path):
    model, data = tiny
    last = train(parse_config(LangPTuneConfig, PRESETS, args(model, data, tmp_path, "--iterations", "1"))[0])
    for k in ("val_ndcg@10", "val_mrr", "val_recall@10", "rec_loss_last", "writer_loss", "reward_mean"):
        assert k in last and last[k] == last[k], k  # present and not NaN
    assert 0 < last["val_mrr"] <= 1 and 0 <= last["val_ndcg@10"] <= 1
    assert (tmp_path / "checkpoints/step_1/recommender/model.safetensors").exists()
    assert (tmp_path / "checkpoints/step_1/model/model.safetensors").exists()
    profiles = json.loads((tmp_path / "profiles/iteration_0.json").read_text())
    assert len(profiles) == 6
    rows = read_metrics(tmp_path)
    assert any("writer/reward_mean" in r for r in rows) and any("iteration/val_mrr" in r for r in rows)


def test_resume_equals_uninterrupted(tiny, tmp_path):
    model, data = tiny
    train(parse_config(LangPTuneConfig, PRESETS, args(model, data, tmp_path / "full", "--iterations", "2"))[0])
    split = args(model, data, tmp_path / "split", "--iterations", "2")
    train(parse_config(LangPTuneConfig, PRESETS, split + ["--stop-after", "1"])[0])
    assert not (tmp_path / "split/checkpoints/step_2").exists()
    train(parse_config(LangPTuneConfig, PRESETS, split + ["--resume"])[0])
    for name in ("model", "recommender"):
        a, b = weights(tmp_path / "full", 2, name), weights(tmp_path / "split", 2, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    start = load_file(str(Path(model) / "model.safetensors"))
    moved = weights(tmp_path / "full", 2, "model")
    assert max(float((moved[k] - start[k]).abs().max()) for k in start) > 0  # the writer was trained


def test_rating_recommender_kind(tiny, tmp_path):
    """--rec-kind rating: the expected-rating reader is trained on the profiles; rating metrics are reported."""
    model, data = tiny
    start = load_file(str(Path(model) / "model.safetensors"))
    last = train(parse_config(LangPTuneConfig, PRESETS, args(model, data, tmp_path, "--iterations", "1",
                                                             "--rec-kind", "rating"))[0])
    assert 0 <= last["val_mae"] <= 4 and last["rec_loss_last"] == last["rec_loss_last"]
    rec = weights(tmp_path, 1, "recommender")
    assert max(float((rec[k] - start[k]).abs().max()) for k in start) > 0  # the reader was trained


def test_two_ranks_equal_one_process(tiny, tmp_path):
    """Under torchrun both models are sharded: two ranks train the same writer and recommender as one process."""
    import os
    import subprocess
    import sys

    model, data = tiny
    root = Path(__file__).resolve().parents[1]
    for name, nproc in (("one", 1), ("two", 2)):
        pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        res = subprocess.run([*pre, str(root / "scripts/train_langptune.py"),
                              *args(model, data, tmp_path / name, "--iterations", "1")], capture_output=True,
                             text=True, cwd=root, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
    # the recommender is replicated (every rank computes the same batches): bitwise the one-process weights
    a, b = weights(tmp_path / "one", 1, "recommender"), weights(tmp_path / "two", 1, "recommender")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the writer's loss and gradient norm (before clipping: a wrong scale over ranks shows there) agree step by
    # step; its weights agree to a small share of how far the step moved them (Adam turns the float noise of a
    # different padding into updates of up to lr where a gradient entry is near zero)
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    w1, w2 = [r for r in m1 if "writer/grad_norm" in r], [r for r in m2 if "writer/grad_norm" in r]
    assert len(w1) == len(w2) == 2
    for r1, r2 in zip(w1, w2):
        for k in ("writer/writer_loss", "writer/grad_norm", "writer/reward_mean"):
            assert abs(r1[k] - r2[k]) <= 1e-4 * max(1.0, abs(r1[k])), (k, r1[k], r2[k])
    start = load_file(str(Path(model) / "model.safetensors"))
    a, b = weights(tmp_path / "one", 1, "model"), weights(tmp_path / "two", 1, "model")
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4 and max(float((a[k] - b[k]).abs().max()) for k in a) <= 0.25 * moved
    v1 = [r for r in m1 if "iteration/val_mrr" in r][-1]
    v2 = [r for r in m2 if "iteration/val_mrr" in r][-1]
    assert abs(v1["iteration/rec_loss_last"] - v2["iteration/rec_loss_last"]) == 0
