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
