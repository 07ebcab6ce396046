"""Run checkpoints in one process: the training state (train_state/, DCP) round trip, what is refused on reading
it (a metadata pickle naming anything but DCP's classes, an optimizer over other parameters), and checkpoints
written before train_state/ (optimizer.pt, rng.pt). Several ranks: tests/test_grpo_train.py."""
import json
import os
import pickle
import shutil

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from model import load_model
from model.checkpoint import CheckpointError
from rl import checkpoints as C
from rl import distributed as D
from rl.optim import make_optimizer, make_scheduler
from tests.tiny import STORIES, one_thread  # noqa: F401 (autouse fixture)


def trained(seed=0, steps=2, lr=1e-2):
    """stories260K, AdamW and a cosine schedule after `steps` updates on a fixed batch."""
    torch.manual_seed(seed)
    model = load_model(STORIES, torch.float32).train()
    opt = make_optimizer(model, lr, 0.01)
    sched = make_scheduler(opt, 1, 10, "cosine")
    for _ in range(steps):
        model(torch.tensor([[1, 403, 260, 365, 300]])).logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_train_state_round_trip(tmp_path):
    model, opt, sched = trained()
    out = C.save(tmp_path, 2, model, None, opt, sched, {"config": {"model": str(STORIES)}}, D.Dist())
    assert sorted(p.name for p in (out / "train_state").iterdir()) == [".metadata", "__0_0.distcp"]
    assert not (out / "optimizer.pt").exists() and not (out / "rng.pt").exists()
    rng = torch.get_rng_state()
    torch.rand(5)  # moves the RNG on: the load must put it back

    fresh = load_model(out / "model", torch.float32).train()
    opt2 = make_optimizer(fresh, 1e-2, 0.01)
    sched2 = make_scheduler(opt2, 1, 10, "cosine")
    state = C.load_training_state(out, fresh, opt2, sched2, D.Dist())
    assert state["step"] == 2 and torch.equal(torch.get_rng_state(), rng)
    assert sched2.state_dict() == sched.state_dict()
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lr as the schedule left it, betas a tuple again
    assert isinstance(b["param_groups"][0]["betas"], tuple)
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)


def test_metadata_that_is_not_dcps_is_refused(tmp_path):
    """.metadata is a pickle: one naming any other callable (here os.system) is refused before it runs."""
    model, opt, sched = trained(steps=1)
    out = C.save(tmp_path, 1, model, None, opt, sched, {}, D.Dist())
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (out / "train_state/.metadata").write_bytes(pickle.dumps(Payload()))
    opt2 = make_optimizer(model, 1e-2, 0.01)
    with pytest.raises(CheckpointError, match=r"\.metadata: not DCP metadata .*refusing posix\.system"):
        C.load_training_state(out, model, opt2, None, D.Dist())
    assert not marker.exists()


def test_optimizer_over_other_parameters_is_refused(tmp_path):
    model, opt, sched = trained(steps=1)
    out = C.save(tmp_path, 1, model, None, opt, sched, {}, D.Dist())
    model.model.layers[0].requires_grad_(False)  # e.g. resumed with another --trainable-layers
    with pytest.raises(CheckpointError, match="not over this run's trainable parameters"):
        C.load_training_state(out, model, make_optimizer(model, 1e-2, 0.01), None, D.Dist())


def test_checkpoint_written_before_train_state_still_resumes(tmp_path):
    """optimizer.pt (the whole optimizer) and rng.pt, as checkpoints were written before DCP."""
    model, opt, sched = trained()
    out = C.save(tmp_path, 2, model, None, opt, sched, {}, D.Dist())
    shutil.rmtree(out / "train_state")
    torch.save(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)),
               out / "optimizer.pt")
    rng = torch.get_rng_state()
    torch.save({"rank0": {"torch": rng}}, out / "rng.pt")
    state = json.loads((out / "trainer_state.json").read_text())
    del state["optimizer_param_groups"]
    (out / "trainer_state.json").write_text(json.dumps(state))
    torch.rand(5)
    opt2 = make_optimizer(model, 1e-2, 0.01)
    C.load_training_state(out, model, opt2, make_scheduler(opt2, 1, 10, "cosine"), D.Dist())
    assert torch.equal(torch.get_rng_state(), rng)
    a, b = opt.state_dict(), opt2.state_dict()
    same = [{**g, "betas": tuple(g["betas"])} for g in b["param_groups"]]  # the full state dict's load lists them
    assert a["param_groups"] == same
    assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])
