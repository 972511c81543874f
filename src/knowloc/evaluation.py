"""Evaluating edits and interventions (paper §2.2, §3.1, A.5; METHODS §3, §4).

Knowledge-modification metrics of one edit of query q_i of a fact ⟨s, r, o⟩ (the edit is only
evaluated when the unedited model's top-1 on q_i is o):

* **Rel**  erase: 1 − 1[top-1(q_i) = o];      update: 1[top-1(q_i) = o′]
* **Gen**  the same, averaged over the neighbor queries q_j, j ≠ i (by default those the
  unedited model answers correctly; ``gen_on="all"`` takes every neighbor)
* **Loc**  share of unrelated queries (facts of other relations) whose top-1 is unchanged
* **Avg**  mean of the three (of those defined: Gen is undefined without neighbors)

An answer is scored by its target tokens (:meth:`knowloc.models.Model.target_ids`, in the
run's target mode): "top-1(q) = o" means greedy decoding after q reproduces every target
token of o, and P(o|q) is the teacher-forced product of their probabilities. A one-token
target is the plain next-token top-1 and probability.

Probability-based versions: erase ``rel_prob = P_b(o|q_i) − P_a(o|q_i)`` (the drop),
update ``rel_prob = P_a(o′|q_i) − P_b(o′|q_i)`` (the gain), ``gen_prob`` the same averaged over
neighbors, ``loc_prob = 1 − mean_u |P_a(y_u|u) − P_b(y_u|u)|`` with y_u the unedited top-1 of
unrelated query u; ``avg_prob`` their mean.

General capability: ΔPPL = (PPL_a − PPL_b) / PPL_b on ``n_entries`` (5) text entries drawn at
random (seeded, recorded) for every edit, PPL = exp(Σ NLL / Σ tokens) over the drawn entries,
each scored with a sliding window over the model context (:func:`perplexity`). The unedited
NLL of an entry is computed once and reused.

Interventions: ΔProb = ± (P_a − P_b) / P_b, "−" for suppression (:func:`delta_prob`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError
from .interventions.weights import Edit
from .models import Model
from .models.forward import answer_scores, final_hidden, logits_from_hidden, next_token_probs

log = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_CORPUS",
    "Baseline",
    "EvalQuery",
    "Observation",
    "PPLCorpus",
    "PPLSampler",
    "delta_prob",
    "evaluate_edit",
    "load_ppl_corpus",
    "modification_metrics",
    "nll_sum",
    "observe",
    "perplexity",
    "predict",
    "probability_metrics",
]

#: Name of the built-in English corpus (written for knowloc) used without ``--ppl-text``.
BUILTIN_CORPUS = "builtin:ppl_corpus.txt"


# ------------------------------------------------------------------------ predictions
@dataclass
class Predictions:
    """Top-1 token, its probability, and the probabilities of watched tokens, per prompt."""

    top1: np.ndarray  # [n] int64
    top1_prob: np.ndarray  # [n] float64
    watched: list[np.ndarray]  # per prompt, P of its watched token ids (float64)


@torch.no_grad()
def predict(
    model: Model,
    prompts: Sequence[Sequence[int]],
    watch: Sequence[Sequence[int]] | None = None,
    *,
    max_batch: int = 32,
) -> Predictions:
    """Next-token predictions after each prompt (token ids), batched by prompt length.

    The final-normed hidden state of the last position goes through the unembedding (and the
    logit soft-cap, where the model has one); nothing is padded, so every batch row is exact.
    """
    n = len(prompts)
    watch = watch if watch is not None else [[] for _ in range(n)]
    top1 = np.zeros(n, dtype=np.int64)
    top1_prob = np.zeros(n, dtype=np.float64)
    watched: list[np.ndarray] = [np.zeros(0)] * n
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    for idx_all in by_len.values():
        for s in range(0, len(idx_all), max_batch):
            idx = idx_all[s : s + max_batch]
            x = torch.tensor([list(prompts[i]) for i in idx], device=model.device)
            probs = next_token_probs(model, x)
            p, t = probs.max(-1)
            for row, i in enumerate(idx):
                top1[i] = int(t[row])
                top1_prob[i] = float(p[row])
                w = list(watch[i])
                watched[i] = probs[row, w].double().cpu().numpy() if w else np.zeros(0)
    return Predictions(top1, top1_prob, watched)


# ---------------------------------------------------------------------------- metrics
def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values]
    return float(np.mean(vals)) if vals else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def modification_metrics(
    op: str,
    *,
    rel_hit: bool,
    gen_hits: Sequence[bool],
    loc_same: Sequence[bool],
) -> dict[str, float]:
    """Rel, Gen, Loc and Avg of one edit from its post-edit predictions.

    Args:
        op: ``"erase"`` or ``"update"``.
        rel_hit: the post-edit top-1 on the edited query is the *target* (o for erase,
            o′ for update).
        gen_hits: the same for each neighbor query.
        loc_same: for each unrelated query, whether the top-1 is unchanged by the edit.

    For erase, Rel and Gen are 1 − accuracy (paper §2.2); Avg is the mean of the metrics that
    are defined (Gen is NaN without neighbors, Loc without unrelated queries).
    """
    if op not in ("erase", "update"):
        raise ConfigError(f"unknown edit operation {op!r}; choose erase or update")
    rel = float(bool(rel_hit))
    gen = _mean([float(bool(h)) for h in gen_hits])
    if op == "erase":
        rel = 1.0 - rel
        gen = 1.0 - gen if not math.isnan(gen) else gen
    loc = _mean([float(bool(s)) for s in loc_same])
    return {"rel": rel, "gen": gen, "loc": loc, "avg": _nanmean([rel, gen, loc])}


def probability_metrics(
    op: str,
    *,
    rel: tuple[float, float],
    gen: Sequence[tuple[float, float]],
    loc: Sequence[tuple[float, float]],
) -> dict[str, float]:
    """Probability-based Rel/Gen/Loc/Avg from ``(P_before, P_after)`` pairs.

    ``rel``/``gen``: P of o (erase: the drop P_b − P_a) or of o′ (update: the gain P_a − P_b)
    on the edited query / each neighbor. ``loc``: P of each unrelated query's unedited top-1;
    ``loc_prob = 1 − mean |P_a − P_b|``.
    """
    if op not in ("erase", "update"):
        raise ConfigError(f"unknown edit operation {op!r}; choose erase or update")
    sign = 1.0 if op == "erase" else -1.0

    def change(b: float, a: float) -> float:
        return sign * (float(b) - float(a))

    rel_p = change(*rel)
    gen_p = _mean([change(b, a) for b, a in gen])
    loc_p = 1.0 - _mean([abs(float(a) - float(b)) for b, a in loc]) if len(loc) else float("nan")
    return {"rel_prob": rel_p, "gen_prob": gen_p, "loc_prob": loc_p,
            "avg_prob": _nanmean([rel_p, gen_p, loc_p])}


def delta_prob(p_before: float, p_after: float, op: str) -> float:
    """ΔProb = ± (P_a − P_b) / P_b: "−" for suppression, "+" for enhancement (paper §3.1)."""
    if op not in ("suppress", "enhance"):
        raise ConfigError(f"op must be 'suppress' or 'enhance' (got {op!r})")
    if not p_before > 0:
        return float("nan")
    change = (float(p_after) - float(p_before)) / float(p_before)
    return -change if op == "suppress" else change


# ------------------------------------------------------------------------- perplexity
def model_context(model: Model) -> int:
    """Maximum sequence length of the model (``max_position_embeddings`` / ``n_positions``)."""
    return model.context_length or 1024


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a sequence of n tokens."""
    out = []
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end >= n:
            break
        begin += stride
    return out


@torch.no_grad()
def nll_sum(
    model: Model,
    ids: Sequence[int],
    *,
    window: int | None = None,
    stride: int | None = None,
    head_rows: int = 64,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of tokens 1..n−1 of ``ids`` and their count.

    Sliding window: windows of ``window`` tokens (default: the model context, at most 1024)
    start every ``stride`` tokens (default ``window // 2``); each token is scored once, in the
    first window that contains it with at least one token of context before it, from the
    window's own context only. A sequence no longer than the window is one plain forward pass.
    """
    n = len(ids)
    if n < 2:
        return 0.0, 0
    window = int(window or min(model_context(model), 1024))
    stride = int(stride or max(1, window // 2))
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(f"need window >= 2 and 1 <= stride <= window (got {window}, {stride})")
    x_all = torch.tensor(list(ids), device=model.device)
    total = 0.0
    count = 0
    for begin, end, first in _windows(n, window, stride):
        hidden = final_hidden(model, x_all[begin:end][None])[0]
        # logits at position t-1 predict token t; score t in [first, end)
        h = hidden[first - 1 - begin : end - 1 - begin]
        targets = x_all[first:end]
        for s in range(0, h.shape[0], head_rows):
            logits = logits_from_hidden(model, h[s : s + head_rows])
            tgt = targets[s : s + head_rows]
            lse = torch.logsumexp(logits, -1)
            total += float((lse - logits.gather(1, tgt[:, None])[:, 0]).double().sum())
        count += end - first
    return total, count


def perplexity(
    model: Model,
    texts: str | Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
) -> float:
    """Perplexity exp(Σ NLL / Σ tokens) over ``texts``, each scored by :func:`nll_sum`.

    Each text is tokenized with the tokenizer's default special tokens (e.g. BOS) and, with
    ``max_tokens``, cut to its first ``max_tokens`` tokens.
    """
    if isinstance(texts, str):
        texts = [texts]
    nll, cnt = 0.0, 0
    for t in texts:
        ids = encode_text(model, t, max_tokens)
        a, b = nll_sum(model, ids, window=window, stride=stride)
        nll += a
        cnt += b
    if cnt == 0:
        raise DataError("perplexity needs at least one text of 2 or more tokens")
    return math.exp(nll / cnt)


def encode_text(model: Model, text: str, max_tokens: int | None = None) -> list[int]:
    ids = list(model.tokenizer(text)["input_ids"])
    return ids[:max_tokens] if max_tokens else ids


# ---------------------------------------------------------------------- text corpus
@dataclass(frozen=True)
class PPLCorpus:
    """Text entries for ΔPPL: paragraphs of a text file, or the built-in corpus."""

    entries: tuple[str, ...]
    source: str
    builtin: bool
    sha256: str

    def __len__(self) -> int:
        return len(self.entries)


def _is_heading(line: str) -> bool:
    s = line.strip()
    return len(s) >= 2 and s.startswith("=") and s.endswith("=")


def load_ppl_corpus(path: str | Path | None = None, *, min_words: int = 20) -> PPLCorpus:
    """Entries (one per non-empty line, WikiText ``= Heading =`` lines left out, at least
    ``min_words`` words) of a text file such as WikiText-2's ``wiki.test.raw``.

    Without ``path`` the built-in corpus is used: short English paragraphs written for knowloc
    (not WikiText; numbers measured on it are not comparable with the paper's).
    """
    if path is None:
        raw = resources.files("knowloc").joinpath("resources/ppl_corpus.txt").read_bytes()
        source, builtin = BUILTIN_CORPUS, True
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"perplexity text file {p} does not exist; give a text file such "
                            "as WikiText-2's wiki.test.raw with --ppl-text, or leave it out to "
                            "use the built-in corpus")
        raw = p.read_bytes()
        source, builtin = str(p.resolve()), False
    text = raw.decode("utf-8", errors="replace")
    entries = tuple(
        " ".join(line.split()) for line in text.splitlines()
        if line.strip() and not _is_heading(line) and len(line.split()) >= min_words
    )
    if not entries:
        raise DataError(f"{source} has no paragraph of {min_words} or more words to measure "
                        "perplexity on")
    return PPLCorpus(entries, source, builtin, hashlib.sha256(raw).hexdigest())


def _seed_of(*parts: Any) -> int:
    from .store import content_hash

    return int(content_hash(list(parts), length=15), 16)


@dataclass
class PPLSampler:
    """ΔPPL on entries drawn at random (seeded) for every edit, baselines cached per entry.

    ``pool_size`` entries are drawn once from the corpus (seeded); each edit draws
    ``n_entries`` of them, seeded by ``(seed, key)`` so a draw does not depend on the order in
    which edits run. Each entry is cut to its first ``max_tokens`` tokens.
    """

    model: Model
    corpus: PPLCorpus
    n_entries: int = 5
    pool_size: int = 25
    max_tokens: int | None = 128
    seed: int = 0
    window: int | None = None
    stride: int | None = None
    _ids: dict[int, list[int]] = field(default_factory=dict, repr=False)
    _baseline: dict[int, tuple[float, int]] = field(default_factory=dict, repr=False)
    pool: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.n_entries < 1:
            raise ConfigError(f"ppl n_entries must be >= 1 (got {self.n_entries})")
        rng = np.random.default_rng(_seed_of("ppl-pool", self.seed, self.corpus.sha256))
        k = min(self.pool_size, len(self.corpus))
        self.pool = tuple(sorted(int(i) for i in rng.choice(len(self.corpus), k, replace=False)))

    def config(self) -> dict[str, Any]:
        return {"source": self.corpus.source, "builtin": self.corpus.builtin,
                "sha256": self.corpus.sha256, "n_entries": self.n_entries,
                "pool_size": len(self.pool), "max_tokens": self.max_tokens, "seed": self.seed,
                "window": self.window, "stride": self.stride}

    def draw(self, key: str) -> list[int]:
        """Entry indices (into the corpus) for the edit identified by ``key``."""
        rng = np.random.default_rng(_seed_of("ppl-draw", self.seed, key))
        k = min(self.n_entries, len(self.pool))
        return sorted(int(self.pool[i]) for i in rng.choice(len(self.pool), k, replace=False))

    def _entry_ids(self, i: int) -> list[int]:
        if i not in self._ids:
            self._ids[i] = encode_text(self.model, self.corpus.entries[i], self.max_tokens)
        return self._ids[i]

    def _nll(self, i: int) -> tuple[float, int]:
        return nll_sum(self.model, self._entry_ids(i), window=self.window, stride=self.stride)

    def baseline(self, draw: Sequence[int]) -> float:
        """PPL of the unedited model on ``draw``; call it while no edit is applied."""
        nll = cnt = 0.0
        for i in draw:
            if i not in self._baseline:
                self._baseline[i] = self._nll(i)
            a, b = self._baseline[i]
            nll += a
            cnt += b
        return math.exp(nll / cnt) if cnt else float("nan")

    def current(self, draw: Sequence[int]) -> float:
        """PPL of the model as it is now (inside an edit) on ``draw``."""
        nll = cnt = 0.0
        for i in draw:
            a, b = self._nll(i)
            nll += a
            cnt += b
        return math.exp(nll / cnt) if cnt else float("nan")


# --------------------------------------------------------------------- edit evaluation
def _token_ids(ids: int | Sequence[int]) -> tuple[int, ...]:
    return (int(ids),) if isinstance(ids, (int, np.integer)) else tuple(int(t) for t in ids)


@dataclass(frozen=True)
class EvalQuery:
    """A query as the evaluation sees it: its prompt tokens and the answer's target tokens
    (:meth:`knowloc.models.Model.target_ids`; a token id stands for a one-token target)."""

    query_id: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # o's target tokens
    new_target_ids: tuple[int, ...] | None = None  # o′'s target tokens (update)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_ids", _token_ids(self.target_ids))
        if self.new_target_ids is not None:
            object.__setattr__(self, "new_target_ids", _token_ids(self.new_target_ids))

    def targets(self) -> list[tuple[int, ...]]:
        """o's target, then o′'s where there is one."""
        return [self.target_ids] + ([self.new_target_ids] if self.new_target_ids else [])


@dataclass
class Observation:
    """What the model does on one edit's prompts: for each fact query and each of its
    targets, the teacher-forced P(target) and whether greedy decoding reproduces the target;
    for each unrelated query, its top-1 next token and the probability of a watched token
    (its own top-1 when nothing is watched)."""

    prob: dict[tuple[str, tuple[int, ...]], float]
    hit: dict[tuple[str, tuple[int, ...]], bool]
    loc_top1: list[int]
    loc_prob: list[float]


@torch.no_grad()
def observe(model: Model, fact_queries: Sequence[EvalQuery],
            locality: Sequence[tuple[int, ...]],
            loc_watch: Sequence[int] | None = None) -> Observation:
    """The model's predictions on the fact queries' targets and on the unrelated queries.

    One :func:`predict` call over the fact prompts and the unrelated prompts gives every
    top-1 and the probability of every one-token target (a one-token target is "reproduced"
    when it is the top-1). A multi-token target is scored alone by
    :func:`knowloc.models.forward.answer_scores`: the product of its teacher-forced
    probabilities, and whether greedy decoding reproduces all its tokens. The batches depend
    only on the arguments, so the same call gives the same numbers whenever it is made.
    """
    nf = len(fact_queries)
    watch = [[t[0] for t in q.targets() if len(t) == 1] for q in fact_queries]
    watch += [[int(w)] for w in loc_watch] if loc_watch is not None else [[] for _ in locality]
    pred = predict(model, [q.prompt_ids for q in fact_queries] + list(locality), watch)
    prob: dict[tuple[str, tuple[int, ...]], float] = {}
    hit: dict[tuple[str, tuple[int, ...]], bool] = {}
    for k, q in enumerate(fact_queries):
        slot = 0
        for t in q.targets():
            if len(t) == 1:
                prob[(q.query_id, t)] = float(pred.watched[k][slot])
                hit[(q.query_id, t)] = int(pred.top1[k]) == t[0]
                slot += 1
            else:
                s = answer_scores(model, [list(q.prompt_ids)], [list(t)])
                prob[(q.query_id, t)] = float(s.prob[0])
                hit[(q.query_id, t)] = bool(s.known[0])
    loc_top1 = [int(t) for t in pred.top1[nf:]]
    loc_prob = ([float(w[0]) for w in pred.watched[nf:]] if loc_watch is not None
                else [float(p) for p in pred.top1_prob[nf:]])
    return Observation(prob, hit, loc_top1, loc_prob)


@dataclass
class Baseline:
    """Unedited observations (:func:`observe`), computed once per request and reused.

    A request is one edit's fact queries with their targets and its unrelated prompts, and
    it is computed in exactly the batches of the post-edit pass of :func:`evaluate_edit`:
    an unedited number never depends on which prompts were asked before (or in which order
    units run), and an edit that changes nothing changes no number."""

    seen: dict[tuple[Any, ...], Observation] = field(default_factory=dict)

    def observe(self, model: Model, fact_queries: Sequence[EvalQuery],
                locality: Sequence[tuple[int, ...]]) -> Observation:
        key = (tuple((q.query_id, q.prompt_ids, q.target_ids, q.new_target_ids)
                     for q in fact_queries), tuple(tuple(p) for p in locality))
        if key not in self.seen:
            self.seen[key] = observe(model, fact_queries, locality)
        return self.seen[key]


def evaluate_edit(
    model: Model,
    edit: Edit,
    *,
    fact_queries: Sequence[EvalQuery],
    rel_ids: Sequence[str],
    locality: Sequence[tuple[int, ...]],
    baseline: Baseline,
    ppl: PPLSampler | None = None,
    ppl_key: str = "",
    gen_on: str = "known",
) -> list[dict[str, Any]]:
    """Apply ``edit``, evaluate it for each edited query in ``rel_ids``, restore the model.

    One edit can serve several edited queries (the global set N_g is the same for every
    query of a fact): the post-edit predictions are computed once and read for each q_i.
    A target "is the top-1" when greedy decoding reproduces all its tokens, and P(target)
    is teacher-forced (:func:`observe`); locality compares the unrelated queries' top-1
    next token. Returns one row per ``rel_ids`` entry with Rel/Gen/Loc/Avg, the
    probability-based versions, ΔPPL and the drawn entries. An empty edit is evaluated as
    ``status="empty"`` with every metric NaN (it is never a success).
    """
    if gen_on not in ("known", "all"):
        raise ConfigError(f"gen_on must be 'known' or 'all' (got {gen_on!r})")
    op = edit.op
    by_id = {q.query_id: q for q in fact_queries}
    before = baseline.observe(model, fact_queries, locality)
    known = {q.query_id: before.hit[(q.query_id, q.target_ids)] for q in fact_queries}
    rows: list[dict[str, Any]] = []
    nan = float("nan")
    empty_row = {"rel": nan, "gen": nan, "loc": nan, "avg": nan, "rel_prob": nan,
                 "gen_prob": nan, "loc_prob": nan, "avg_prob": nan, "ppl_before": nan,
                 "ppl_after": nan, "dppl": nan, "ppl_entries": "", "n_gen": 0,
                 "n_loc": len(locality)}
    if edit.empty:
        for qid in rel_ids:
            rows.append({"query_id": qid, "status": "empty", "n_neurons": 0, **empty_row})
        return rows

    draw = ppl.draw(ppl_key) if ppl is not None else []
    ppl_b = ppl.baseline(draw) if ppl is not None else nan
    with edit.applied(model):
        after = observe(model, fact_queries, locality, before.loc_top1)
        ppl_a = ppl.current(draw) if ppl is not None else nan
    loc_same = [a == b for a, b in zip(after.loc_top1, before.loc_top1)]
    loc_probs = list(zip(before.loc_prob, after.loc_prob))
    dppl = (ppl_a - ppl_b) / ppl_b if ppl is not None else nan

    def target_of(q: EvalQuery) -> tuple[int, ...]:
        return q.target_ids if op == "erase" else q.new_target_ids  # type: ignore[return-value]

    def hit(q: EvalQuery) -> bool:
        return after.hit[(q.query_id, target_of(q))]

    def probs_of(q: EvalQuery) -> tuple[float, float]:
        key = (q.query_id, target_of(q))
        return before.prob[key], after.prob[key]

    for qid in rel_ids:
        q = by_id[qid]
        if op == "update" and q.new_target_ids is None:
            raise ConfigError(f"query {qid} has no new target o′ for an update edit")
        neighbors = [n for n in fact_queries if n.query_id != qid
                     and (gen_on == "all" or known[n.query_id])]
        m = modification_metrics(op, rel_hit=hit(q), gen_hits=[hit(n) for n in neighbors],
                                 loc_same=loc_same)
        pm = probability_metrics(op, rel=probs_of(q), gen=[probs_of(n) for n in neighbors],
                                 loc=loc_probs)
        rows.append({"query_id": qid, "status": "ok", "n_neurons": len(edit), **m, **pm,
                     "ppl_before": ppl_b, "ppl_after": ppl_a, "dppl": dppl,
                     "ppl_entries": "|".join(str(i) for i in draw), "n_gen": len(neighbors),
                     "n_loc": len(locality)})
    return rows
