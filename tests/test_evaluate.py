"""The evaluation pipeline (eval/evaluate.py, eval/profiles.py, scripts/evaluate.py) on a hand-made dataset."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from data import load_dataset
from eval import evaluate as E
from eval import profiles as PR
from eval.profiles import ProfileCache, weights_hash
from eval.recommender import Recommender
from model import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
sys.path.insert(0, str(ROOT / "scripts"))

# (user, item, rating, timestamp, split)
ROWS = [("u1", "a", 5, 1, "train"), ("u1", "b", 4, 2, "train"), ("u2", "a", 2, 3, "train"),
        ("u2", "c", 1, 4, "train"), ("u1", "c", 3, 5, "valid"), ("u2", "b", 2, 6, "valid"),
        ("u1", "a", 4, 7, "test"), ("u2", "c", 2, 8, "test"), ("u1", "b", 5, 9, "test")]


@pytest.fixture
def ds_dir(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    with open(d / "interactions.jsonl", "w") as f:
        for u, i, r, t, s in ROWS:
            f.write(json.dumps({"user_id": u, "item_id": i, "rating": r, "timestamp": t, "review": f"review {u}{i}",
                                "split": s}) + "\n")
    with open(d / "items.jsonl", "w") as f:
        for i in "abc":
            f.write(json.dumps({"item_id": i, "title": f"Album {i.upper()}", "description": ""}) + "\n")
    (d / "manifest.json").write_text("{}")
    with open(d / "oracle_profiles.jsonl", "w") as f:
        f.write(json.dumps({"user_id": "u1", "profile": "Loves album A."}) + "\n")
        f.write(json.dumps({"user_id": "u2", "profile": "Dislikes everything."}) + "\n")
    return d


def test_global_mean_row_by_hand(ds_dir):
    ds = load_dataset(ds_dir)
    ex = E.build_examples(ds, "test")
    assert [(e.user_id, e.item_id, e.rating, e.item_title) for e in ex] == \
        [("u1", "a", 4, "Album A"), ("u2", "c", 2, "Album C"), ("u1", "b", 5, "Album B")]
    m, rows = E.evaluate_method("global-mean", ex, ds)
    mu = (5 + 4 + 2 + 1) / 4  # train mean 3.0 -> class 3 for all
    assert m["mae"] == pytest.approx((1 + 1 + 2) / 3) and m["rmse"] == pytest.approx(np.sqrt((1 + 1 + 4) / 3))
    assert m["acc"] == 0 and m["n"] == 3 and m["format_failures"] == 0
    assert [r["prediction"] for r in rows] == [mu] * 3
    assert len(E.build_examples(ds, "test", limit=2)) == 2


def test_cache_roundtrip_and_keys(tmp_path):
    c = ProfileCache(tmp_path, "kar", "h" * 64)
    assert c.get("u", "i", "p") is None
    c.put("u", "i", "p", "text one")
    assert c.get("u", "i", "p") == "text one"
    assert c.get("u", "i", "p2") is None and c.get("u2", "i", "p") is None
    assert ProfileCache(tmp_path, "palr", "h" * 64).get("u", "i", "p") is None  # another method
    assert ProfileCache(tmp_path, "kar", "g" * 64).get("u", "i", "p") is None  # other weights
    with open(c.path, "a") as f:
        f.write('{"key": "torn')  # an interrupted write
    again = ProfileCache(tmp_path, "kar", "h" * 64)
    assert again.get("u", "i", "p") == "text one" and len(again) == 1


def test_cached_generate_generates_each_prompt_once(tmp_path, monkeypatch):
    calls = []

    def fake(model, tok, prompts, max_new_tokens, batch_size, seed=0, progress=None):
        calls.extend(prompts)
        return [f"answer to {p}" for p in prompts]

    monkeypatch.setattr(PR, "generate_texts", fake)
    c = ProfileCache(tmp_path, "lg", "x" * 64)
    reqs = [("u1", "", "P1"), ("u2", "", "P2"), ("u1", "", "P1")]
    assert PR.cached_generate(reqs, None, None, c) == ["answer to P1", "answer to P2", "answer to P1"]
    assert calls == ["P1", "P2"]
    calls.clear()
    c2 = ProfileCache(tmp_path, "lg", "x" * 64)  # a rerun: everything comes from disk
    assert PR.cached_generate(reqs + [("u3", "", "P1")], None, None, c2)[3] == "answer to P1"
    assert calls == []


@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} not found")
def test_weights_hash_stable_and_sensitive(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    h = weights_hash(d)
    assert h == weights_hash(STORIES) and len(h) == 64
    f = d / "model.safetensors"
    b = bytearray(f.read_bytes())
    mid = (len(b) - (1 << 16)) * 7 // 15 + 100  # inside one of the sampled chunks
    b[mid] ^= 0xFF
    f.write_bytes(bytes(b))
    assert weights_hash(d) != h


@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} not found")
def test_duet_failures_apart_and_oracle(ds_dir, tmp_path, monkeypatch):
    good = ("<user_profile><cue>c</cue><constructed_prompt>p</constructed_prompt><profile>Likes A.</profile>"
            "</user_profile><item_profile><cue>c</cue><constructed_prompt>p</constructed_prompt>"
            "<profile>A calm album.</profile></item_profile>")
    answers = iter([good, "<user_profile> oops", good])
    monkeypatch.setattr(PR, "generate_texts", lambda m, t, prompts, *a, **k: [next(answers) for _ in prompts])
    ds = load_dataset(ds_dir)
    ex = E.build_examples(ds, "test")
    tok = load_tokenizer(STORIES)
    rec = Recommender(load_model(STORIES), tok)
    m, rows = E.evaluate_method("duet", ex, ds, recommender=rec, generator=object(), gen_tok=tok,
                                cache=ProfileCache(tmp_path / "c", "duet", "z" * 64))
    assert m["format_failures"] == 1 and m["n"] == 2
    failed = [r for r in rows if r["prediction"] is None]
    assert len(failed) == 1 and failed[0]["format"] == "unclosed <user_profile>"
    ok = [r for r in rows if r["prediction"] is not None]
    assert all("Likes A." in r["prompt"] and "A calm album." in r["prompt"] for r in ok)
    y = np.array([r["rating"] for r in ok])
    p = np.array([r["prediction"] for r in ok])
    assert m["mae"] == pytest.approx(np.abs(p - y).mean())  # failures never enter MAE
    assert all(abs(sum(r["probs"]) - 1) < 1e-4 for r in ok)

    m, rows = E.evaluate_method("oracle", ex, ds, recommender=rec)
    assert m["n"] == 3 and "Loves album A." in rows[0]["prompt"] and "Dislikes everything." in rows[1]["prompt"]
    # history strictly before the target: u1's test interaction at t=9 sees a (t=1), b, c, a (t=7), not b (t=9)
    assert '4. "Album A" - rated 4/5' in rows[2]["prompt"] and '5. "Album B" - rated ' in rows[2]["prompt"]


def test_script_out_and_compare(ds_dir, tmp_path, capsys):
    import evaluate as script

    for m in ("global-mean", "user-mean"):
        script.main(["--method", m, "--data", str(ds_dir), "--split", "test", "--out", str(tmp_path / m)])
    met = json.loads((tmp_path / "user-mean" / "metrics.json").read_text())
    assert {"mae", "rmse", "acc", "f1", "format_failures", "n"} <= set(met)
    lines = (tmp_path / "user-mean" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["prediction"] == pytest.approx(4.5)  # u1 train mean
    capsys.readouterr()
    script.main(["--compare", str(tmp_path / "global-mean"), str(tmp_path / "user-mean")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| Method | MAE") and out[2].startswith("| global-mean | 1.3333")
    assert out[3].startswith("| user-mean |")


@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} not found")
def test_generate_texts_greedy_matches_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(STORIES)
    prompts = ["Once upon a time", "Lily and Tom went to the park. They"]
    got = PR.generate_texts(load_model(STORIES), tok, prompts, max_new_tokens=12, batch_size=2)
    hf = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    for p, g in zip(prompts, got):
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_token_id)
        assert g == tok.decode(out[0, ids.shape[1]:].tolist())
