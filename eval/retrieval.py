"""The retrieval recommender of LangPTune (Gao et al., "End-to-end Training for Recommendation with Language-based
User Profiles"): a trainable language model embeds a user text (the profile, then the recent item titles) and
every item's text; the score of an item is the dot product of the two L2-normalised embeddings (mean-pooled
final hidden states, centred on the catalogue's mean), and the catalogue is ranked by it. It trains with the InfoNCE loss (van den Oord et al.
2018, "Representation Learning with Contrastive Predictive Coding", arXiv 1807.03748): each user text against
its own next item with the other items of the batch as negatives. Its rank of the true next item gives the
profile writer's reward (NDCG@k or MRR), in alternation with the recommender's own training.

    emb = Embedder(model, tokenizer)                       # model: model.Transformer
    index = ItemIndex.from_dataset(emb, ds)                # every item embedded once (no grad): index.emb (N, D)
    u = emb.embed([user_text(profile, titles)], grad=True)  # (B, D)
    loss, m = info_nce(u, emb.embed(item_texts, grad=True))
    ranks = target_ranks(index.scores(u), targets, exclude)   # (B,) 1-based, history excluded
    reward = ranking_reward(index.scores(u), targets, exclude, "ndcg", k=10)

Centring. A decoder LM's mean-pooled states all point one way (SmolLM2-135M-Instruct: cosine 0.95 +- 0.02 between
two titles of the synthetic catalogue, `scripts/retrieval_headroom.py` prints it), so at temperature 0.1 the
InfoNCE logits of a batch are nearly equal and the first updates learn little. Subtracting the catalogue's mean
embedding before normalising (the mean step of Su et al. 2021, "Whitening Sentence Representations for Better
Semantics and Faster Retrieval", arXiv 2103.15316) spreads them (cosine 0.00 +- 0.24) without changing what the
model knows. The mean is a function of the weights: ItemIndex computes it with the catalogue on every refresh,
and the embedder uses it for users and items until the next refresh.

Notation: B users (rows), N catalogue items, T tokens, D hidden size. Pure tensor functions where possible;
the numpy metrics of eval/metrics.py rank one positive against sampled negatives, these against the catalogue.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from data.history import HistoryIndex
from eval.recommender import length_batches

RANKING_REWARDS = ("ndcg", "mrr")


# ---- texts --------------------------------------------------------------------------------------------------

def item_text(item, max_chars: int = 300) -> str:
    """An item (title, description) as the text the recommender embeds: the title, then the description if any,
    cut to max_chars characters."""
    desc = (item.description or "").strip()
    text = f"{item.title.strip()}. {desc}" if desc else item.title.strip()
    return text[:max_chars]


def user_text(profile: str | None, history_titles: Sequence[str]) -> str:
    """The user's side: the profile (when there is one), then "Recent items: " and the titles in the given order."""
    recent = "Recent items: " + ("; ".join(history_titles) if history_titles else "none")
    return f"{profile.strip()}\n{recent}" if profile and profile.strip() else recent


# ---- embeddings ---------------------------------------------------------------------------------------------

def mean_pool(hidden: torch.Tensor, mask: torch.Tensor, center: torch.Tensor | None = None,
              normalize: bool = True) -> torch.Tensor:
    """hidden (B, T, D), mask (B, T) 1 for real tokens, center (D,) or None -> (B, D) fp32: the mean over real
    tokens, minus center, L2-normalised (normalize=False: the centred mean as it is)."""
    m = mask.to(hidden.device, torch.float32).unsqueeze(-1)  # (B, T, 1)
    mean = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)
    if center is not None:
        mean = mean - center
    return F.normalize(mean, dim=-1) if normalize else mean


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (ids (B, T), mask (B, T)), padded on the right."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids, mask


class Embedder:
    """Texts -> L2-normalised mean-pooled final hidden states of `model` (a model.Transformer), minus `center`
    (D,) when it is set (see "Centring" above; ItemIndex sets it). Plain text, no chat template and no special
    tokens; each text keeps its first `max_tokens` tokens."""

    def __init__(self, model, tokenizer, max_tokens: int = 256, batch_size: int = 16):
        self.model, self.tok = model, tokenizer
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.center: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, cut to max_tokens; an empty text becomes the pad token alone."""
        return [self.tok.encode(t, add_special_tokens=False)[:self.max_tokens] or [self.tok.pad_token_id]
                for t in texts]

    def embed(self, texts: Sequence[str], grad: bool = False, batch_size: int | None = None,
              center: bool = True, normalize: bool = True) -> torch.Tensor:
        """texts -> (N, D) fp32 on the model's device. grad=False: no autograd, in length-sorted batches of
        batch_size (default self.batch_size; 1 makes each embedding independent of the others' padding);
        grad=True: one batch, with the graph through the model (the caller sizes it). center=False: without
        subtracting self.center; normalize=False: the mean hidden state before L2 normalisation."""
        seqs = self.encode(texts)
        c = self.center if center else None
        if grad:
            return self._embed_batch(seqs, c, normalize)
        out = torch.empty(len(seqs), self.dim, device=self.device)
        with torch.no_grad():
            for idx in length_batches([len(s) for s in seqs], batch_size or self.batch_size):
                out[idx] = self._embed_batch([seqs[i] for i in idx], c, normalize)
        return out

    def fit_center(self, texts: Sequence[str]) -> torch.Tensor:
        """Set center to the mean over texts of their mean hidden states (D,), before normalisation; return it."""
        self.center = self.embed(texts, center=False, normalize=False).mean(0)
        return self.center

    def _embed_batch(self, seqs: list[list[int]], center: torch.Tensor | None, normalize: bool) -> torch.Tensor:
        """Token id lists -> (B, D)."""
        if not seqs:
            return torch.zeros(0, self.dim, device=self.device)
        ids, mask = right_pad(seqs, self.tok.pad_token_id)  # (B, T)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return mean_pool(self.model.hidden_states(ids, attention_mask=mask), mask, center, normalize)


# ---- the contrastive loss -----------------------------------------------------------------------------------

def info_nce(user_emb: torch.Tensor, item_emb: torch.Tensor, temperature: float = 0.1,
             item_keys: Sequence | None = None) -> tuple[torch.Tensor, dict]:
    """InfoNCE with in-batch negatives (van den Oord et al. 2018, arXiv 1807.03748; LangPTune's recommender loss).

    user_emb (B, D), item_emb (B, D): row i of each is a (user, next item) pair. The logits of user i are
    <u_i, v_j> / temperature over the B items j (B, B); the loss is the cross-entropy with item i as the class,
    averaged over the B rows. item_keys (B,), optional: items with equal keys are the same item, and its other
    copies are removed from a row's negatives (they are not negatives of that user).
    -> (loss, {"loss", "accuracy"}) with 0-dim detached metrics; accuracy is the share of rows whose own item
    scores strictly above every other item of the batch.
    """
    if user_emb.shape != item_emb.shape or user_emb.dim() != 2:
        raise ValueError(f"info_nce needs two (B, D) tensors of one shape, got {tuple(user_emb.shape)} "
                         f"and {tuple(item_emb.shape)}")
    B = user_emb.shape[0]
    logits = user_emb.float() @ item_emb.float().T / temperature  # (B, B)
    labels = torch.arange(B, device=logits.device)
    duplicate = torch.zeros(B, B, dtype=torch.bool, device=logits.device)
    if item_keys is not None:
        same = [[a == b for b in item_keys] for a in item_keys]
        duplicate = torch.tensor(same, device=logits.device) & ~torch.eye(B, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(duplicate, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        acc = (target_ranks(logits, labels, duplicate) == 1).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": acc}


# ---- ranking and its metrics --------------------------------------------------------------------------------

def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """scores (B, N), targets (B,) item positions, exclude (B, N) bool -> (B,) long 1-based ranks.

    The rank of each row's target among the N items, higher score first, with the excluded items (the user's
    history) taken out of the ranking as if scored -inf; a target is never excluded from its own row. Ties are
    pessimistic: the target ranks below every other item with an equal score.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    exclude = exclude.to(scores.device, torch.bool).clone()
    exclude[rows, targets] = False
    target_score = scores[rows, targets].unsqueeze(1)  # (B, 1)
    return ((scores >= target_score) & ~exclude).sum(1)  # the target itself counts once: rank >= 1


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) ranks -> (B,) NDCG@k of a single relevant item: 1 / log2(rank + 1) if rank <= k, else 0."""
    r = ranks.double()
    return torch.where(ranks <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).float()


def mrr(ranks: torch.Tensor) -> torch.Tensor:
    """(B,) ranks -> (B,) reciprocal ranks 1 / rank."""
    return 1.0 / ranks.float()


def recall_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) ranks -> (B,) recall@k of a single target (hit@k): 1 if rank <= k, else 0."""
    return (ranks <= k).float()


def precision_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) ranks -> (B,) precision@k of a single target: recall@k / k."""
    return recall_at_k(ranks, k) / k


def ranking_reward(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor, kind: str = "ndcg",
                   k: int = 10) -> torch.Tensor:
    """The profile writer's reward from the recommender's ranking: scores (B, N), targets (B,), exclude (B, N)
    -> (B,) NDCG@k ("ndcg") or reciprocal rank ("mrr") of each row's target."""
    if kind not in RANKING_REWARDS:
        raise ValueError(f"unknown ranking reward {kind!r}: use one of {', '.join(RANKING_REWARDS)}")
    ranks = target_ranks(scores, targets, exclude)
    return ndcg_at_k(ranks, k) if kind == "ndcg" else mrr(ranks)


# ---- the item catalogue -------------------------------------------------------------------------------------

class ItemIndex:
    """Every catalogue item's embedding, computed at construction and again on refresh() (after the embedder's
    model has been trained): emb (N, D); index_of maps an item id to its row. center=True: each refresh first
    sets the embedder's center to the catalogue's mean (see "Centring" above)."""

    def __init__(self, embedder: Embedder, item_ids: list[str], texts: list[str], center: bool = True):
        if len(item_ids) != len(texts):
            raise ValueError(f"{len(item_ids)} item ids but {len(texts)} texts")
        self.embedder, self.item_ids, self.texts, self.center = embedder, list(item_ids), list(texts), center
        self.index_of: dict[str, int] = {iid: n for n, iid in enumerate(self.item_ids)}
        self.refresh()

    @classmethod
    def from_dataset(cls, embedder: Embedder, ds, max_chars: int = 300, center: bool = True) -> "ItemIndex":
        """All items of a dataset, in id order, as item_text(item, max_chars)."""
        ids = sorted(ds.items)
        return cls(embedder, ids, [item_text(ds.items[i], max_chars) for i in ids], center)

    def refresh(self):
        """Recompute all item embeddings with the embedder's current weights (no grad), and the center first."""
        if self.center:
            raw = self.embedder.embed(self.texts, center=False, normalize=False)  # (N, D)
            self.embedder.center = raw.mean(0)
            self.emb = F.normalize(raw - self.embedder.center, dim=-1)
        else:
            self.emb = self.embedder.embed(self.texts)  # (N, D)

    def scores(self, user_emb: torch.Tensor) -> torch.Tensor:
        """user_emb (B, D) -> (B, N) dot products with every item."""
        return user_emb.float() @ self.emb.T

    def positions(self, item_ids: Sequence[str]) -> torch.Tensor:
        """(B,) long rows of the given items."""
        return torch.tensor([self.index_of[i] for i in item_ids], dtype=torch.long, device=self.emb.device)

    def mask(self, item_id_lists: Sequence[Sequence[str]]) -> torch.Tensor:
        """(B, N) bool: True at the items of each row's list (ids outside the catalogue are ignored)."""
        out = torch.zeros(len(item_id_lists), len(self.item_ids), dtype=torch.bool)
        for b, ids in enumerate(item_id_lists):
            out[b, [self.index_of[i] for i in ids if i in self.index_of]] = True
        return out.to(self.emb.device)


# ---- targets and histories ----------------------------------------------------------------------------------

class Target(NamedTuple):
    user_id: str
    item_id: str
    timestamp: int


def next_item_targets(ds, split: str, min_rating: int = 4, limit: int | None = None) -> list[Target]:
    """The retrieval targets of a split: its interactions rated >= min_rating (on rating data the next item is the
    next interaction the user liked), as (user_id, item_id, timestamp), in timestamp order; the first `limit`."""
    out = [Target(x.user_id, x.item_id, x.timestamp) for x in ds.split(split) if x.rating >= min_rating]
    return out if limit is None else out[:limit]


_INDEXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # dataset -> its HistoryIndex


def history_index(hx_or_ds) -> HistoryIndex:
    """A HistoryIndex as is, or a dataset's (built once per dataset object)."""
    if isinstance(hx_or_ds, HistoryIndex):
        return hx_or_ds
    if hx_or_ds not in _INDEXES:
        _INDEXES[hx_or_ds] = HistoryIndex(hx_or_ds)
    return _INDEXES[hx_or_ds]


def history_items(hx_or_ds, user_id: str, t: int) -> list[str]:
    """Ids of every item the user interacted with strictly before t (any split), oldest first: the items a
    ranking at t excludes."""
    return history_index(hx_or_ds).user_item_ids(user_id, t)


def history_titles(hx_or_ds, user_id: str, t: int, k: int = 10) -> list[str]:
    """Titles of the user's last k interactions before t, oldest first (for user_text)."""
    return [e.title for e in history_index(hx_or_ds).user_history(user_id, t, k)]


def retrieval_ranks(embedder: Embedder, index: ItemIndex, hx_or_ds, targets: Sequence[Target],
                    texts: Sequence[str]) -> torch.Tensor:
    """(M,) long ranks of each target's item over the catalogue, from the user texts (M,), without gradients;
    the user's earlier items excluded. The index is used as it is (refresh it after training)."""
    user = embedder.embed(texts)  # (M, D)
    out = []
    for a in range(0, len(targets), embedder.batch_size):
        rows = targets[a:a + embedder.batch_size]
        exclude = index.mask([history_items(hx_or_ds, x.user_id, x.timestamp) for x in rows])  # (b, N)
        ranks = target_ranks(index.scores(user[a:a + len(rows)]), index.positions([x.item_id for x in rows]), exclude)
        out.append(ranks.cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
