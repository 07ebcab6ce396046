"""scripts/plot_run.py: curves of two fake runs (a GRPO and a LangPTune metrics.jsonl) in one PNG, by step and by
wall time; the keys each panel reads; a bad line or a missing run is one line on stderr naming it, exit 2."""
import json

import pytest

from tests.tiny import script_function

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(path, rows, config=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def runs(tmp_path):
    grpo = [{"step": 0, "time/elapsed_s": 5.0, "val/mae": 0.9, "val/reward": -1.0}]
    for s in (1, 2, 3):
        grpo.append({"step": s, "time/elapsed_s": 60.0 * s, "train/reward_mean": 0.1 * s, "train/kl": 0.01 * s})
    grpo.append({"step": 3, "time/elapsed_s": 190.0, "val/mae": 0.8})
    lpt = [{"step": s, "time/elapsed_s": 30.0 * s, "writer/reward_mean": 0.2 + 0.05 * s} for s in (1, 2, 3, 4)]
    lpt += [{"step": i, "time/elapsed_s": 65.0 * i, "iteration/val_ndcg@10": 0.1 * i} for i in (1, 2)]
    return write_run(tmp_path / "grpo", grpo), write_run(tmp_path / "lpt", lpt, {"writer_steps": 2})


@pytest.fixture
def plot_main(capsys):
    main = script_function("plot_run", "main")

    def run(*args):
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("x", ["step", "time"])
def test_two_runs_one_png(runs, tmp_path, plot_main, x):
    out = tmp_path / "fig" / "curves.png"
    code, err = plot_main(*runs, "--x", x, "--labels", "grpo run", "langptune run", "--out", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == PNG
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left beside it


def test_panels_and_keys(runs):
    read_rows, iteration_steps, panels = (script_function("plot_run", f) for f in
                                          ("read_rows", "iteration_steps", "panels"))
    rows = [(read_rows(d), iteration_steps(d)) for d in runs]
    figure = {title: lines for title, _, lines in panels(rows, "step")}
    assert list(figure) == ["training reward", "validation MAE (lower is better)", "validation NDCG@10",
                            "KL to the reference"]
    assert [(i, k) for i, k, _, _ in figure["training reward"]] == [(0, "train/reward_mean"), (1, "writer/reward_mean")]
    assert figure["validation MAE (lower is better)"] == [(0, "val/mae", [0, 3], [0.9, 0.8])]
    # LangPTune's iterations on its writer-step axis (2 writer steps per iteration)
    assert figure["validation NDCG@10"] == [(1, "iteration/val_ndcg@10", [2, 4], [0.1, 0.2])]
    by_time = {title: lines for title, _, lines in panels(rows, "time")}
    assert by_time["KL to the reference"][0][2] == [1.0, 2.0, 3.0]  # minutes


def test_bad_line_names_file_and_line(runs, tmp_path, plot_main):
    path = runs[1] / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 5, "writer/reward_mean": \n')
    out = tmp_path / "curves.png"
    code, err = plot_main(*runs, "--out", out)
    assert code == 2 and err.strip() == f"error: {path}:7: not JSON (Expecting value)"
    assert not out.exists()


def test_missing_run_and_labels(runs, tmp_path, plot_main):
    code, err = plot_main(runs[0], tmp_path / "nope", "--out", tmp_path / "c.png")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope'}: no such run directory"
    code, err = plot_main(*runs, "--labels", "one", "--out", tmp_path / "c.png")
    assert code == 2 and "2 runs" in err and len(err.strip().splitlines()) == 1


def test_time_axis_needs_the_wall_time(tmp_path, plot_main):
    old = write_run(tmp_path / "old", [{"step": 1, "train/reward_mean": 0.5}])
    code, err = plot_main(old, "--x", "time", "--out", tmp_path / "c.png")
    assert code == 2 and "time/elapsed_s" in err and "--x step" in err
    code, err = plot_main(old, "--out", tmp_path / "c.png")
    assert code == 0 and (tmp_path / "c.png").read_bytes()[:8] == PNG
