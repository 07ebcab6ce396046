"""The evaluation pipeline (eval/evaluate.py, eval/profiles.py, scripts/evaluate.py) on a hand-made dataset."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from data import load_dataset
from data.history import HistoryIndex
from eval import evaluate as E
from eval.profile_cache import ProfileCache, weights_hash
from eval.profiles import HistoryOptions, write_profiles
from eval.recommender import Recommender
from model import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
sys.path.insert(0, str(ROOT / "scripts"))

# (user, item, rating, timestamp, split)
ROWS = [("u1", "a", 5, 1, "train"), ("u1", "b", 4, 2, "train"), ("u2", "a", 2, 3, "train"),
        ("u2", "c", 1, 4, "train"), ("u1", "c", 3, 5, "valid"), ("u2", "b", 2, 6, "valid"),
        ("u1", "a", 4, 7, "test"), ("u2", "c", 2, 8, "test"), ("u1", "b", 5, 9, "test")]


TITLES = {"a": "Album A (calm jazz, 1990s)", "b": "Album B (dark metal, 1990s)", "c": "Album C (upbeat rock, 1970s)"}


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
            f.write(json.dumps({"item_id": i, "title": TITLES[i], "description": ""}) + "\n")
    (d / "manifest.json").write_text("{}")
    with open(d / "oracle_profiles.jsonl", "w") as f:
        f.write(json.dumps({"user_id": "u1", "profile": "Loves jazz.", "liked": ["jazz", "rock", "calm", "1990s"],
                            "disliked": ["metal", "dark"], "bias": 0.0}) + "\n")
        f.write(json.dumps({"user_id": "u2", "profile": "Dislikes rock.", "liked": ["folk", "jazz", "calm", "1960s"],
                            "disliked": ["rock", "upbeat"], "bias": -0.2}) + "\n")
    return d


def test_global_mean_row_by_hand(ds_dir):
    ds = load_dataset(ds_dir)
    ex = E.build_examples(ds, "test")
    assert [(e.user_id, e.item_id, e.rating, e.item_title) for e in ex] == \
        [("u1", "a", 4, TITLES["a"]), ("u2", "c", 2, TITLES["c"]), ("u1", "b", 5, TITLES["b"])]
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


def test_cached_profiles_generate_each_prompt_once(ds_dir, tmp_path, monkeypatch):
    calls = []

    def fake(model, tok, prompts, max_new_tokens, **k):
        calls.extend(tuple(p) for p in prompts)
        return [f"answer to a prompt of {len(p)} tokens" for p in prompts]

    monkeypatch.setattr(E, "write_profiles", fake)
    ds = load_dataset(ds_dir)
    ex = E.build_examples(ds, "test")
    ex = ex + ex[:1]  # the same example twice: one prompt
    tok = load_tokenizer(STORIES)

    def run():
        return E.cached_profiles("lg", ex, ds, HistoryIndex(ds), object(), tok, ProfileCache(tmp_path, "lg", "x" * 64),
                                 HistoryOptions(), 32, 100_000)

    first = run()
    assert len(calls) == len(set(calls)) == 3 and first[0] == first[3]
    calls.clear()
    assert run() == first and calls == []  # a rerun: everything comes from disk


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
def run_with_fake_generator(method, fake, ds_dir, tmp_path, monkeypatch):
    """evaluate_method on the test split with `fake` standing in for write_profiles; stories260K recommends."""
    monkeypatch.setattr(E, "write_profiles", fake)
    ds = load_dataset(ds_dir)
    ex = E.build_examples(ds, "test")
    tok = load_tokenizer(STORIES)
    rec = Recommender(load_model(STORIES), tok)
    return ds, ex, rec, E.evaluate_method(method, ex, ds, recommender=rec, generator=object(), gen_tok=tok,
                                          cache=ProfileCache(tmp_path / "c", method, "z" * 64))


def test_duet_failures_apart_and_oracle(ds_dir, tmp_path, monkeypatch):
    good = ("<user_profile><cue>c</cue><constructed_prompt>p</constructed_prompt><profile>Likes A.</profile>"
            "</user_profile><item_profile><cue>c</cue><constructed_prompt>p</constructed_prompt>"
            "<profile>A calm album.</profile></item_profile>")
    # the third: a generation stopped at "</item_profile>" whose last token ran past it is cut there
    answers = iter([good, "<user_profile> oops", good + "></"])
    stops = []

    def fake(m, t, prompts, *a, stop_texts=(), **k):
        stops.append(tuple(stop_texts))
        return [next(answers) for _ in prompts]

    ds, ex, rec, (m, rows) = run_with_fake_generator("duet", fake, ds_dir, tmp_path, monkeypatch)
    assert m["format_failures"] == 1 and m["n"] == 2 and set(stops) == {("</item_profile>",)}
    failed = [r for r in rows if r["prediction"] is None]
    assert len(failed) == 1 and failed[0]["format"] == "unclosed <user_profile>"
    ok = [r for r in rows if r["prediction"] is not None]
    assert all("Likes A." in r["prompt"] and "A calm album." in r["prompt"] for r in ok)
    y = np.array([r["rating"] for r in ok])
    p = np.array([r["prediction"] for r in ok])
    assert m["mae"] == pytest.approx(np.abs(p - y).mean())  # failures never enter MAE
    assert all(abs(sum(r["probs"]) - 1) < 1e-4 for r in ok)
    # mae_fallback: every example, the failed one predicted as 10H predicts it
    _, rows_10h = E.evaluate_method("10h", ex, ds, recommender=rec)
    fb = [r["prediction"] if r["prediction"] is not None else h["prediction"] for r, h in zip(rows, rows_10h)]
    assert m["mae_fallback"] == pytest.approx(np.mean([abs(r["rating"] - f) for r, f in zip(rows, fb)]), abs=1e-5)
    assert [r["prediction_fallback"] for r in rows] == pytest.approx(fb, abs=1e-5)  # what --paired --fallback reads

    m, rows = E.evaluate_method("oracle", ex, ds, recommender=rec)
    # the taste applied to the target: u1 on calm jazz of the 1990s 4.4 + 3 * 0.35 -> 5; u2 on upbeat rock
    # 4.4 - 0.2 - 2 * 1.6 -> 1; u1 on dark metal 4.4 + 0.35 - 2 * 1.6 -> 2
    assert m["n"] == 3 and "(User profile: Would rate this calm jazz album about 5/5.)" in rows[0]["prompt"]
    assert "about 1/5" in rows[1]["prompt"] and "about 2/5" in rows[2]["prompt"]
    # history strictly before the target: u1's test interaction at t=9 sees a (t=1), b, c, a (t=7), not b (t=9)
    assert f'4. "{TITLES["a"]}" - rated 4/5' in rows[2]["prompt"] and f'5. "{TITLES["b"]}" - rated ' in rows[2]["prompt"]


def test_duet_profile_like_duet_without_cue_and_prompt(ds_dir, tmp_path, monkeypatch):
    """duet-profile: the +Profile prompt per (user, item) pair, stopped at </item_profile>, both profiles to the
    recommender; a failure apart; the cache keyed by the pair, as DUET's."""
    good = "<user_profile>Likes A.</user_profile>\n<item_profile>A calm album.</item_profile>"
    answers = iter([good, "<user_profile>Likes A.</user_profile> and more", good + "></"])
    seen, stops = [], []

    def fake(m, t, prompts, *a, stop_texts=(), **k):
        seen.extend(prompts)
        stops.append(tuple(stop_texts))
        return [next(answers) for _ in prompts]

    ds, ex, rec, (m, rows) = run_with_fake_generator("duet-profile", fake, ds_dir, tmp_path, monkeypatch)
    tok = load_tokenizer(STORIES)
    assert all("<user_profile>" in tok.decode(q) and "<cue>" not in tok.decode(q) for q in seen)
    assert m["format_failures"] == 1 and m["n"] == 2 and set(stops) == {("</item_profile>",)}
    failed = [r for r in rows if r["prediction"] is None]
    assert len(failed) == 1 and failed[0]["format"].startswith("missing <item_profile>")
    ok = [r for r in rows if r["prediction"] is not None]
    assert all((r["user_profile"], r["item_profile"]) == ("Likes A.", "A calm album.") for r in ok)
    assert all("(User profile: Likes A.)\n(Target item profile: A calm album.)" in r["prompt"] for r in ok)
    cached = [json.loads(line) for line in next((tmp_path / "c").rglob("*.jsonl")).read_text().splitlines()]
    assert sorted((c["user_id"], c["item_id"]) for c in cached) == sorted((e.user_id, e.item_id) for e in ex)


@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} not found")
def test_duet_profile_script_with_tiny_models(ds_dir, tmp_path, capsys):
    """scripts/evaluate.py --method duet-profile end to end, stories260K writing and recommending: a story model
    writes no tags, so every example is a format failure, predicted as 10H for mae_fallback."""
    import evaluate as script

    out = tmp_path / "duet-profile"
    script.main(["--method", "duet-profile", "--generator", str(STORIES), "--recommender", str(STORIES),
                 "--data", str(ds_dir), "--max-new-tokens", "8", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    met = json.loads((out / "metrics.json").read_text())
    assert met["method"] == "duet-profile" and met["n"] + met["format_failures"] == 3
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["generated"] is not None and r["format"] for r in rows)
    assert "| duet-profile |" in capsys.readouterr().out


def test_lg_rating_answer_opens_with_its_prefix(ds_dir, tmp_path, monkeypatch):
    """lg-rating: the generator's prompt ends with "Usually rates " and the profile the recommender reads is the
    prefix plus what was written after it."""
    seen = []

    def fake(m, t, prompts, *a, **k):
        seen.extend(prompts)
        return ["4/5. Likes calm jazz." for _ in prompts]

    _, _, _, (m, rows) = run_with_fake_generator("lg-rating", fake, ds_dir, tmp_path, monkeypatch)
    tok = load_tokenizer(STORIES)
    opener = tok.encode("Usually rates ", add_special_tokens=False)
    assert seen and all(q[-len(opener):] == opener and "Begin with the rating" in tok.decode(q) for q in seen)
    assert m["n"] == 3 and m["format_failures"] == 0
    assert all(r["user_profile"] == "Usually rates 4/5. Likes calm jazz." for r in rows)
    assert all("(User profile: Usually rates 4/5. Likes calm jazz.)" in r["prompt"] for r in rows)


def test_paired_difference_by_hand(tmp_path, capsys):
    from eval.metrics import paired_mae_difference

    # |b - y| - |a - y|: (0.5 - 1.0), (0 - 0), (1.5 - 0.5) -> -0.5, 0, 1.0; mean 1/6, sd of (-0.5, 0, 1) = 0.7638
    m = paired_mae_difference([4, 5, 2], [3.0, 5.0, 2.5], [4.5, 5.0, 3.5])
    assert m["diff"] == pytest.approx(1 / 6) and m["mae_b"] - m["mae_a"] == pytest.approx(1 / 6)
    assert m["se"] == pytest.approx(0.7637626 / 3 ** 0.5, rel=1e-6)
    assert (m["b_better"], m["a_better"], m["ties"], m["n"]) == (1, 1, 1, 3)
    # the script matches rows on (user, item, rating) and leaves out a failure (prediction null)
    import evaluate as S

    for name, preds in (("a", [3.0, 5.0, 2.5, 4.0]), ("b", [4.5, 5.0, 3.5, None])):
        rows = [{"user_id": u, "item_id": i, "rating": y, "prediction": p}
                for (u, i, y), p in zip([("u1", "x", 4), ("u1", "y", 5), ("u2", "x", 2), ("u3", "z", 1)], preds)]
        S.write_results(tmp_path / name, {}, rows[::-1] if name == "b" else rows)
    S.main(["--paired", str(tmp_path / "a"), str(tmp_path / "b")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["diff"] == pytest.approx(1 / 6) and out["n"] == 3 and (out["only_a"], out["only_b"]) == (1, 0)
    # --fallback: the failure counts at its fallback (history-alone) prediction, here 2.0 for the rating 1
    rows = [json.loads(x) for x in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        r["prediction_fallback"] = 2.0 if r["prediction"] is None else r["prediction"]
    S.write_results(tmp_path / "b", {}, rows)
    S.main(["--paired", str(tmp_path / "a"), str(tmp_path / "b"), "--fallback"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the fourth example: |2 - 1| - |4 - 1| = -2; mean of (-0.5, 0, 1, -2) = -0.375
    assert out["n"] == 4 and out["diff"] == pytest.approx(-0.375) and (out["only_a"], out["only_b"]) == (0, 0)


def test_profile_headroom_script(ds_dir, capsys):
    """scripts/profile_headroom.py scores the template profiles; "none" is the 10H row, the paired difference of
    each template is its MAE minus none's, and the user-mean baseline is computed by hand here."""
    import profile_headroom

    profile_headroom.main(["--recommender", str(STORIES), "--data", str(ds_dir), "--examples", "5"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 2 and out["none (10H)"]["diff_vs_none"] == 0
    for name, row in out.items():
        if isinstance(row, dict):
            assert row["diff_vs_none"] == pytest.approx(row["mae"] - out["none (10H)"]["mae"], abs=2e-4)
    # valid rows: u1 rates c 3 at t=5 (before: 5, 4 -> 4.5), u2 rates b 2 at t=6 (before: 2, 1 -> 1.5)
    assert out["user_mean_baseline"] == pytest.approx((1.5 + 0.5) / 2)


def test_headroom_reads_attributes_off_a_history():
    """The history-derived templates of profile_headroom: the attribute estimate (eval.baselines) is the mean plus the deviations of
    the items sharing the target's mood and genre; dislikes are the attributes rated below 3 at least twice."""
    from data.history import HistoryEntry
    from eval.baselines import attribute_estimate
    from profile_headroom import disliked_attributes, target_dislike_text

    h = [HistoryEntry(str(i), f"A B ({mood} {genre}, 1990s)", r, "", i) for i, (mood, genre, r) in enumerate(
        [("dark", "hip hop", 2), ("calm", "jazz", 5), ("dark", "jazz", 3), ("calm", "hip hop", 2), ("calm", "jazz", 4)])]
    base = 16 / 5
    # mood dark: 2, 3 -> 2.5; genre jazz: 5, 3, 4 -> 4.0
    assert attribute_estimate(h, "X Y (dark jazz, 1970s)") == pytest.approx(base + (2.5 - base) + (4.0 - base))
    # mood upbeat never met: only the genre moves it; hip hop (a two-word genre): 2, 2
    assert attribute_estimate(h, "X Y (upbeat hip hop, 1970s)") == pytest.approx(base + (2.0 - base))
    assert attribute_estimate(h, "no attributes") is None and attribute_estimate([], "X (dark jazz, 1970s)") is None
    assert disliked_attributes(h) == ["dark", "hip hop"]  # calm: 5, 2, 4 -> 3.67; jazz 4.0
    assert target_dislike_text(h, "X Y (calm hip hop, 2000s)") == "This album is hip hop, which the user dislikes."
    assert target_dislike_text(h, "X Y (calm jazz, 2000s)").startswith("Nothing")


def test_script_out_and_compare(ds_dir, tmp_path, capsys):
    import evaluate as script

    for m in ("global-mean", "user-mean"):
        script.main(["--method", m, "--data", str(ds_dir), "--split", "test", "--out", str(tmp_path / m)])
    met = json.loads((tmp_path / "user-mean" / "metrics.json").read_text())
    assert {"mae", "rmse", "acc", "f1_macro_5", "f1_macro_present", "format_failures", "n"} <= set(met)
    lines = (tmp_path / "user-mean" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["prediction"] == pytest.approx(4.5)  # u1 train mean
    capsys.readouterr()
    script.main(["--compare", str(tmp_path / "global-mean"), str(tmp_path / "user-mean")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| Method | MAE") and out[2].startswith("| global-mean | 1.3333")
    assert out[3].startswith("| user-mean |")


@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} not found")
def test_write_profiles_greedy_matches_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(STORIES)
    prompts = ["Once upon a time", "Lily and Tom went to the park. They"]
    got = write_profiles(load_model(STORIES), tok, [tok.encode(p, add_special_tokens=False) for p in prompts],
                         max_new_tokens=12, batch_size=2)
    hf = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    for p, g in zip(prompts, got):
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_token_id)
        assert g == tok.decode(out[0, ids.shape[1]:].tolist())


def test_ranking_by_hand(ds_dir, capsys):
    """--negatives: each positive against items its user never rated. item-mean: a 3.5, b 4.0, c 1.0 and the
    unseen items d, e, f the global mean 3.0, so u1's a and b rank 1st and u2's c ranks 3rd of 3."""
    import evaluate as script

    with open(ds_dir / "items.jsonl", "a") as f:
        for i in "def":
            f.write(json.dumps({"item_id": i, "title": f"Album {i.upper()} (calm folk, 1960s)", "description": ""})
                    + "\n")
    ds = load_dataset(ds_dir)
    ex = E.build_examples(ds, "test")
    neg = E.negative_examples(ds, ex, 2)
    assert len(neg) == 6 and all(n.item_id in "def" and n.rating == 0 for n in neg)
    assert [n.user_id for n in neg] == ["u1", "u1", "u2", "u2", "u1", "u1"]
    assert all(len({n.item_id for n in neg[j:j + 2]}) == 2 for j in (0, 2, 4))  # without replacement
    with pytest.raises(ValueError, match="fewer than 4 negatives"):
        E.negative_examples(ds, ex, 4)
    capsys.readouterr()
    script.main(["--method", "item-mean", "--data", str(ds_dir), "--split", "test", "--negatives", "2"])
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["hit@1"] == pytest.approx(2 / 3) and got["mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert got["ndcg@5"] == pytest.approx((1 + 1 / np.log2(4) + 1) / 3) and got["hit@5"] == 1.0
    # a failed prediction ranks below every scored item, on either side
    rows = lambda *p: [{"prediction": x} for x in p]  # noqa: E731
    r = E.ranking_from_predictions(rows(None, 4.0), rows(1.0, 2.0, None, 5.0), 2)
    assert r["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2)  # None vs (1, 2): 3rd, with ties pessimistic; 4 vs (None, 5): 2nd


def test_profile_agreement_by_hand(ds_dir, tmp_path, capsys):
    """scripts/profile_agreement.py: the N/5 each profile states against the two teachers, computed by hand."""
    import profile_agreement

    # test targets: u1 a at t=7 (before: a 5 calm jazz, b 4 dark metal, c 3 upbeat rock; mean 4, calm and jazz 5:
    # 4 + 1 + 1 -> 5; average 4); u2 c at t=8 (a 2, c 1 upbeat rock, b 2; mean 5/3, upbeat and rock 1: 1/3 -> 1;
    # average 5/3 -> 2); u1 b at t=9 (a 5, b 4, c 3, a 4; mean 4, dark and metal 4 -> 4; average 4)
    rows = [("u1", "a", "Would rate this album about 5/5."), ("u2", "c", "Usually rates 2/5."), ("u1", "b", "Likes jazz.")]
    d = tmp_path / "ev"
    d.mkdir()
    (d / "predictions.jsonl").write_text("".join(json.dumps({"user_id": u, "item_id": i, "user_profile": p}) + "\n"
                                                 for u, i, p in rows))
    profile_agreement.main([str(d), "--data", str(ds_dir)])
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and out["stated"] == {"2": 1, "5": 1, "None": 1}
    assert out["teacher_attributes"] == {"1": 1, "4": 1, "5": 1} and out["teacher_average"] == {"2": 1, "4": 2}
    assert out["agree_attributes"] == 1 and out["agree_average"] == 1
    assert out["attributes_vs_stated"] == {"1->2": 1, "4->None": 1, "5->5": 1}
    (d / "predictions.jsonl").write_text(json.dumps({"user_id": "u1", "item_id": "c", "user_profile": ""}) + "\n")
    with pytest.raises(SystemExit, match="line 1"):  # u1 c is a valid-split interaction, not a test one
        profile_agreement.main([str(d), "--data", str(ds_dir)])
    (d / "predictions.jsonl").write_text(json.dumps({"user_id": "u1", "item_id": "a"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"predictions.jsonl:2: not a prediction record"):
        profile_agreement.main([str(d), "--data", str(ds_dir)])
