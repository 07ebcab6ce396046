"""The retrieval recommender (eval/retrieval.py), the trunk's hidden states and the trainable rating reader
(rl/rating_reader.py): hand computations, then the tiny model."""
import math

import pytest
import torch

from data import load_dataset
from data.history import HistoryEntry
from eval.recommender import RecExample, Recommender, expected_rating
from eval.retrieval import (Embedder, ItemIndex, history_items, history_titles, info_nce, item_text, mean_pool,
                            mrr, ndcg_at_k, next_item_targets, precision_at_k, ranking_reward, recall_at_k,
                            retrieval_ranks, target_ranks, user_text)
from model import load_model, load_tokenizer
from rl.rating_reader import digit_logits, rating_loss
from tests.tiny import STORIES, one_thread, tiny_chat_model, tiny_dataset  # noqa: F401 (autouse fixture)

needs_stories = pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} not found (shared/ beside the repository)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(chat model dir, dataset) of the tiny pipeline."""
    base = tmp_path_factory.mktemp("retrieval")
    return tiny_chat_model(base / "model"), load_dataset(tiny_dataset(base / "data"))


# ---- hidden states ------------------------------------------------------------------------------------------

@needs_stories
def test_hidden_states_are_the_trunk_of_forward_left_padded_too():
    model = load_model(STORIES)
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    with torch.no_grad():
        for m in (None, mask):
            h = model.hidden_states(ids, attention_mask=m)  # (B, T, D)
            assert h.shape == (3, 9, model.config.hidden_size)
            torch.testing.assert_close(model.lm_head(h), model(ids, attention_mask=m), rtol=1e-5, atol=1e-5)
        h = model.hidden_states(ids, attention_mask=mask)
        alone = model.hidden_states(ids[1:2, 4:])  # row 1 without its padding
        torch.testing.assert_close(h[1:2, 4:], alone, rtol=1e-5, atol=1e-5)
    assert model.hidden_states(ids[:1]).requires_grad  # autograd on: a graph to train through


def test_mean_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[0.0, 5.0], [7.0, 7.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    want = torch.tensor([[2 / math.sqrt(13), 3 / math.sqrt(13)], [0.0, 1.0]])
    torch.testing.assert_close(mean_pool(hidden, mask), want)
    center = torch.tensor([2.0, -1.0])  # row means (2, 3) and (0, 5) -> (0, 4) and (-2, 6)
    torch.testing.assert_close(mean_pool(hidden, mask, center), torch.tensor([[0.0, 1.0], [-1.0, 3.0]]) /
                               torch.tensor([[1.0], [math.sqrt(10)]]))
    torch.testing.assert_close(mean_pool(hidden, mask, center, normalize=False), torch.tensor([[0.0, 4.0],
                                                                                                [-2.0, 6.0]]))


# ---- InfoNCE ------------------------------------------------------------------------------------------------

U = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
V = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]


def test_info_nce_by_hand():
    # logits = U V^T / 0.5: rows [2, 0, 1.6], [0, 2, 1.2], [0, 2, 1.2]; the third row's positive (1.2) loses
    loss, m = info_nce(torch.tensor(U), torch.tensor(V), temperature=0.5)
    rows = [math.log(1 + math.exp(-2) + math.exp(-0.4)), math.log(math.exp(-2) + 1 + math.exp(-0.8)),
            math.log(math.exp(-1.2) + math.exp(0.8) + 1)]
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-6)
    assert m["loss"].item() == pytest.approx(loss.item()) and not m["loss"].requires_grad
    assert m["accuracy"].item() == pytest.approx(2 / 3)


def test_info_nce_gradient_pulls_users_to_their_items():
    u = torch.tensor(U, requires_grad=True)
    v = torch.tensor(V)
    loss, _ = info_nce(u, v, temperature=0.5)
    loss.backward()
    assert ((-u.grad) * v).sum(1).gt(0).all()  # descent raises every user's score of its own item
    with torch.no_grad():
        assert info_nce(u - 0.1 * u.grad, v, temperature=0.5)[0] < loss


def test_info_nce_same_item_twice_is_no_negative():
    u, v = torch.eye(3), torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])  # items 0 and 2 are one item
    # logits (t = 0.1): rows [10, 0, 10], [0, 10, 0], [0, 0, 0]
    _, m = info_nce(u, v)
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # rows 0 and 2 tie with another item (pessimistic)
    loss, m = info_nce(u, v, item_keys=["a", "b", "a"])  # row 0 drops item 2, row 2 drops item 0
    rows = [math.log(1 + math.exp(-10)), math.log(2 * math.exp(-10) + 1), math.log(2)]
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(2 / 3)


# ---- ranks and metrics --------------------------------------------------------------------------------------

SCORES = torch.tensor([[0.9, 0.5, 0.5, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5],
                       [0.3, 0.3, 0.3, 0.3, 0.3]])
TARGETS = torch.tensor([1, 4, 0, 2])
EXCLUDE = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)


def test_target_ranks_exclusions_and_ties_by_hand():
    # row 0: item 0 (0.9) excluded, item 4 (0.7) above, item 2 ties (pessimistic: above) -> 3
    # row 1: the best -> 1; row 2: the worst, items 1 and 2 excluded -> 3 of the 3 left
    # row 3: all tied; its own item is never excluded, item 4 is -> 4 of the 4 left
    assert target_ranks(SCORES, TARGETS, EXCLUDE).tolist() == [3, 1, 3, 4]
    assert target_ranks(SCORES, TARGETS, torch.zeros_like(EXCLUDE)).tolist() == [4, 1, 5, 5]


def test_ndcg_mrr_recall_precision_by_hand():
    ranks = torch.tensor([1, 3, 10, 11])
    torch.testing.assert_close(ndcg_at_k(ranks, 10), torch.tensor([1.0, 0.5, 1 / math.log2(11), 0.0]))
    torch.testing.assert_close(mrr(ranks), torch.tensor([1.0, 1 / 3, 0.1, 1 / 11]))
    torch.testing.assert_close(recall_at_k(ranks, 10), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(recall_at_k(ranks, 3), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(precision_at_k(ranks, 10), torch.tensor([0.1, 0.1, 0.1, 0.0]))


def test_ranking_reward():
    # ranks [3, 1, 3, 4] (test_target_ranks_exclusions_and_ties_by_hand)
    torch.testing.assert_close(ranking_reward(SCORES, TARGETS, EXCLUDE),
                               torch.tensor([0.5, 1.0, 0.5, 1 / math.log2(5)]))
    torch.testing.assert_close(ranking_reward(SCORES, TARGETS, EXCLUDE, "ndcg", k=3),
                               torch.tensor([0.5, 1.0, 0.5, 0.0]))
    torch.testing.assert_close(ranking_reward(SCORES, TARGETS, EXCLUDE, "mrr"), torch.tensor([1 / 3, 1.0, 1 / 3, 0.25]))
    with pytest.raises(ValueError, match="ndcg, mrr"):
        ranking_reward(SCORES, TARGETS, EXCLUDE, "auc")


# ---- texts, targets, histories ------------------------------------------------------------------------------

def test_texts():
    from data import Item

    assert item_text(Item("i", "Blue Train", "Calm jazz.")) == "Blue Train. Calm jazz."
    assert item_text(Item("i", "Blue Train", "")) == "Blue Train"
    assert len(item_text(Item("i", "T", "x" * 1000), max_chars=300)) == 300
    assert user_text(None, ["A", "B"]) == "Recent items: A; B"
    assert user_text("Loves jazz.", ["A"]) == "Loves jazz.\nRecent items: A"


def test_targets_and_histories(tiny):
    _, ds = tiny
    targets = next_item_targets(ds, "valid")
    liked = [x for x in ds.split("valid") if x.rating >= 4]
    assert len(targets) == len(liked) > 0 and [t.item_id for t in targets] == [x.item_id for x in liked]
    assert [t.timestamp for t in targets] == sorted(t.timestamp for t in targets)
    assert len(next_item_targets(ds, "valid", limit=3)) == 3
    u, t = targets[0].user_id, targets[0].timestamp
    want = [x.item_id for x in ds.interactions if x.user_id == u and x.timestamp < t]
    assert history_items(ds, u, t) == want and len(want) > 10
    assert history_titles(ds, u, t, k=3) == [ds.items[i].title for i in want[-3:]]


# ---- the rating reader --------------------------------------------------------------------------------------

def test_rating_loss_by_hand():
    logits = torch.stack([torch.zeros(5), torch.log(torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2]))])
    y = torch.tensor([3, 5])
    loss, m = rating_loss(logits, y, "ce")
    assert loss.item() == pytest.approx(math.log(5), abs=1e-6)  # -log 0.2 in both rows
    loss, m = rating_loss(logits, y, "mse")  # expectations 3.0 and 3.2
    assert loss.item() == pytest.approx((0 + 1.8 ** 2) / 2, abs=1e-5)
    assert m["mae"].item() == pytest.approx(0.9, abs=1e-5) and not m["loss"].requires_grad
    with pytest.raises(ValueError, match="ce, mse"):
        rating_loss(logits, y, "mae")


H = [HistoryEntry("a", "Blue Train (calm jazz, 1950s)", 5, "Great sax.", 10),
     HistoryEntry("b", "Master of Puppets (dark metal, 1980s)", 1, "Too loud.", 30)]
EXAMPLES = [RecExample(H, None, "Giant Steps (upbeat jazz, 1960s)"),
            RecExample(H[:1], "Loves calm jazz.", "Reign in Blood (dark metal, 1980s)", "A thrash metal album."),
            RecExample([], None, "Kind of Blue")]


@needs_stories
def test_digit_logits_have_gradients_and_match_the_frozen_scores(tiny):
    path, _ = tiny
    tok = load_tokenizer(path)
    rec = Recommender(load_model(path), tok, batch_size=2)
    logits = digit_logits(rec, EXAMPLES)  # (B, 5)
    assert logits.shape == (3, 5) and logits.requires_grad
    rating_loss(logits, torch.tensor([5, 1, 3]), "mse")[0].backward()
    assert rec.model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    frozen = Recommender(load_model(path).requires_grad_(False), tok, batch_size=2)  # shared prefix, batches of 2
    e, p = frozen.score(EXAMPLES)
    e2, p2 = expected_rating(logits.detach())
    torch.testing.assert_close(e2, e, rtol=0, atol=1e-5)
    torch.testing.assert_close(p2, p, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no trainable parameter"):
        digit_logits(frozen, EXAMPLES)


# ---- the embedder, trained ----------------------------------------------------------------------------------

def training_pairs(ds, n: int) -> tuple[list[str], list[str]]:
    """n (user text, next item text) pairs of the train split, no item twice."""
    users, items, seen = [], [], set()
    for t in next_item_targets(ds, "train"):
        if t.item_id in seen or not history_items(ds, t.user_id, t.timestamp):
            continue
        seen.add(t.item_id)
        users.append(user_text(None, history_titles(ds, t.user_id, t.timestamp, k=4)))
        items.append(item_text(ds.items[t.item_id]))
        if len(users) == n:
            break
    return users, items


@needs_stories
def test_embedder_batches_and_padding(tiny):
    path, ds = tiny
    emb = Embedder(load_model(path), load_tokenizer(path), max_tokens=64, batch_size=3)
    users, _ = training_pairs(ds, 5)
    together = emb.embed(users)  # (5, D) in length-sorted batches of 3, right-padded
    assert together.shape == (5, emb.dim) and not together.requires_grad
    torch.testing.assert_close(together.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(torch.cat([emb.embed([u]) for u in users]), together, rtol=1e-5, atol=1e-5)
    assert emb.embed(users[:2], grad=True).requires_grad
    assert len(emb.encode(["word " * 500])[0]) == 64


@needs_stories
def test_item_index_ranks_the_catalogue(tiny):
    path, ds = tiny
    emb = Embedder(load_model(path), load_tokenizer(path), max_tokens=64)
    index = ItemIndex.from_dataset(emb, ds)
    N = len(ds.items)
    assert index.emb.shape == (N, emb.dim) and index.item_ids[index.index_of["S0000003"]] == "S0000003"
    targets = next_item_targets(ds, "valid", limit=6)
    texts = [user_text(None, history_titles(ds, t.user_id, t.timestamp)) for t in targets]
    ranks = retrieval_ranks(emb, index, ds, targets, texts)  # (6,)
    seen = [len(set(history_items(ds, t.user_id, t.timestamp)) - {t.item_id}) for t in targets]
    assert all(1 <= r <= N - s for r, s in zip(ranks.tolist(), seen))
    scores = index.scores(emb.embed(texts))  # (6, N)
    raw = emb.embed(index.texts, center=False, normalize=False)  # (N, D) the centring is the catalogue's mean
    torch.testing.assert_close(emb.center, raw.mean(0))
    torch.testing.assert_close(index.emb, torch.nn.functional.normalize(raw - raw.mean(0), dim=-1))
    torch.testing.assert_close(emb.fit_center(index.texts), raw.mean(0))
    assert index.emb.sum(0).norm() < index.emb.shape[0] * 0.5  # spread out, not one direction
    exclude = index.mask([history_items(ds, t.user_id, t.timestamp) for t in targets])
    assert torch.equal(target_ranks(scores, index.positions([t.item_id for t in targets]), exclude), ranks)


@needs_stories
def test_embedder_learns_pairs_with_info_nce(tiny):
    """A few dozen Adam steps on 16 (user, item) pairs lower their InfoNCE loss clearly."""
    path, ds = tiny
    torch.manual_seed(0)
    emb = Embedder(load_model(path), load_tokenizer(path), max_tokens=64)
    users, items = training_pairs(ds, 16)

    def loss_on_all() -> float:
        with torch.no_grad():
            return sum(info_nce(emb.embed(users[a:a + 8]), emb.embed(items[a:a + 8]))[0].item() for a in (0, 8)) / 2

    before = loss_on_all()
    opt = torch.optim.Adam(emb.model.parameters(), lr=1e-3)
    for step in range(30):
        a = 8 * (step % 2)
        loss, _ = info_nce(emb.embed(users[a:a + 8], grad=True), emb.embed(items[a:a + 8], grad=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_on_all()
    assert after < 0.7 * before, (before, after)


@needs_stories
def test_retrieval_headroom_script_trains_both_conditions_and_pairs_them(tiny, capsys, tmp_path):
    """scripts/retrieval_headroom.py at tiny size: both conditions trained and ranked on the same targets, the
    references computed, and each paired difference the mean of the per-example differences."""
    import json

    from tests.tiny import script_function

    path, _ = tiny
    data = tiny_dataset(tmp_path / "data")
    ds = load_dataset(data)
    main = script_function("retrieval_headroom", "main")
    main(["--model", str(path), "--data", str(data), "--steps", "2", "--batch", "4", "--eval", "0",
          "--max-tokens", "32", "--trainable-layers", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = len(next_item_targets(ds, "valid"))
    assert out["n_eval"] == n and out["center"] is True
    cos = out["catalogue_cosine"]  # the pooled states point one way; centring spreads them around 0
    assert cos["pooled"]["mean"] > cos["centred"]["mean"] and abs(cos["centred"]["mean"]) < 0.1
    for cond in ("oracle", "none", "keywords", "random"):
        assert 0 <= out[cond]["ndcg@10"] <= 1 and 0 < out[cond]["mrr"] <= 1, (cond, out[cond])
    d = out["oracle_minus_none_ndcg@10"]
    assert d["a"] == out["oracle"]["ndcg@10"] and d["b"] == out["none"]["ndcg@10"]
    assert abs(d["diff"] - (d["a"] - d["b"])) < 2e-4 and d["se"] >= 0
