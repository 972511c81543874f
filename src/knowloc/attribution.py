"""Knowledge-neuron attribution: IG (Dai et al.), SIG (Enguehard, adapted), AMIG (Chen et al.).

All three are integrated gradients over the neuron activations of one layer at the last
prompt position (METHODS §1), with different baselines and normalizations:

==========  ===========================================  ==========================
method      baseline b_l (per layer, last position)      normalization of the map
==========  ===========================================  ==========================
``ig``      0                                            none
``sig``     mean over prompt tokens j of the activations   divided by the L2 norm of
            with token j alone replaced by mask/pad/EOS    the whole map (eq. 14)
            (``sig_mode="per_token"``: sum of the per-
            token IGs instead, T times the cost)
``amig``    activations of a same-length prompt whose      divided by the sum over
            non-special tokens are all EOS                 all neurons (eq. 18)
==========  ===========================================  ==========================

``Attr(l, p) = (a_lp - b_lp) * (1/m) * sum_{k=1..m} dP(b_l + (k/m)(a_l - b_l)) / da_lp``
where P is the softmax probability of the first token of the gold answer.

The fast engine (the only one shipped; a plain reference lives in the tests) exploits that
patching the last position leaves the prompt prefix unchanged:

* the prefix runs once and its key/value cache is reused by every integration point;
* each point pushes only the last token through the model;
* points (layer, step) are batched across layers in passes sized to a memory budget; in a
  pass the batch grows layer by layer ("staircase"): a point patched at layer l joins the
  batch at layer l, as a copy of the unpatched run, so no layer computes a row whose value
  is already known;
* row 0 of that batch is the unpatched run itself: it gives the activations the points are
  built from, P(target) and the top token, and -- since scaling by alpha = 1 changes nothing
  -- the gradients of the alpha = 1 points of every layer from one row (a zero leaf added
  to its activation at each layer), so no separate clean run and 1/m fewer rows;
* the output head is fused: P(target) and its gradient w.r.t. the final hidden state come
  from two matrix products with the unembedding (no autograd over the [vocab] softmax);
* weights are frozen; gradients are taken only w.r.t. the patched activations.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .models import Model

log = logging.getLogger(__name__)

METHODS = ("ig", "sig", "amig")
SIG_MODES = ("mean", "per_token")


@dataclass(frozen=True)
class AttributionConfig:
    """Everything that determines an attribution result (hashed for caching)."""

    method: str = "ig"
    n_steps: int = 20
    sig_mode: str = "mean"

    def validate(self) -> AttributionConfig:
        if self.method not in METHODS:
            raise ConfigError(f"unknown attribution method {self.method!r}; choose from {METHODS}")
        if not isinstance(self.n_steps, int) or self.n_steps < 2:
            raise ConfigError(
                f"n_steps must be an integer >= 2 for integrated gradients (got {self.n_steps!r}); "
                "the paper uses 20"
            )
        if self.sig_mode not in SIG_MODES:
            raise ConfigError(f"unknown sig_mode {self.sig_mode!r}; choose from {SIG_MODES}")
        return self

    def as_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "n_steps": self.n_steps}
        if self.method == "sig":
            d["sig_mode"] = self.sig_mode
        return d


@dataclass
class Attribution:
    """Attribution scores of one query: ``scores[layer, neuron]`` (CPU; float32, or float64
    for a float64 model)."""

    prompt: str
    answer: str
    target_id: int
    method: str
    scores: torch.Tensor
    activations: torch.Tensor
    prob: float
    top1: bool
    predicted_id: int
    predicted: str
    config: dict[str, Any]
    query_id: str | None = None
    fact_id: str | None = None
    relation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    def top(self, k: int = 10) -> list[tuple[int, int, float, float]]:
        """The ``k`` highest-scoring neurons as (layer, neuron, attribution, activation)."""
        flat = self.scores.flatten()
        k = min(k, flat.numel())
        vals, idx = torch.topk(flat, k)
        d = self.scores.shape[1]
        return [
            (int(i) // d, int(i) % d, float(v), float(self.activations.flatten()[int(i)]))
            for v, i in zip(vals, idx)
        ]


# ---------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class _Prepared:
    prompt: str
    answer: str
    ids: tuple[int, ...]
    target_id: int
    query_id: str | None
    fact_id: str | None
    relation: str | None


def _prepare(model: Model, q: Any) -> _Prepared:
    if isinstance(q, (tuple, list)) and len(q) == 2:
        prompt, answer = q
        qid = fid = rel = None
    else:
        prompt, answer = q.prompt, q.answer
        qid = getattr(q, "query_id", None)
        fid = getattr(q, "fact_id", None)
        rel = getattr(q, "relation", None)
    ids = model.encode_prompt(prompt)
    target = model.target_id(prompt, answer)
    return _Prepared(prompt, answer, tuple(ids), target, qid, fid, rel)


# -------------------------------------------------------------------------- baselines
@torch.no_grad()
def _batch_activations(model: Model, batch_ids: torch.Tensor) -> torch.Tensor:
    """[n, n_layers, d_mlp] last-position activations for a batch of equal-length prompts."""
    out = torch.empty(batch_ids.shape[0], model.n_layers, model.d_mlp, device=model.device, dtype=model.dtype)

    def grab(layer, h):
        out[:, layer] = h[:, -1]
        return h

    with model.hook_activations(grab):
        model.base_model()(input_ids=batch_ids, use_cache=False)
    return out


def maskable_positions(model: Model, ids: Sequence[int]) -> list[int]:
    """Positions of the prompt's non-special tokens (those SIG masks one at a time)."""
    special = model.special_ids()
    pos = [j for j, t in enumerate(ids) if t not in special]
    return pos or list(range(len(ids)))


def baselines(model: Model, ids: Sequence[int], cfg: AttributionConfig) -> torch.Tensor:
    """Baselines ``[n_baselines, n_layers, d_mlp]`` for one prompt (n_baselines = 1 except
    for ``sig_mode="per_token"``, where it is the number of masked positions)."""
    L, D = model.n_layers, model.d_mlp
    dev, dt = model.device, model.dtype
    if cfg.method == "ig":
        return torch.zeros(1, L, D, device=dev, dtype=dt)
    ids_t = torch.tensor(ids, device=dev)
    if cfg.method == "amig":
        special = model.special_ids()
        eos = model.eos_id()
        base = torch.tensor([t if t in special else eos for t in ids], device=dev)
        return _batch_activations(model, base[None])
    # sig: token j alone replaced by the mask token
    pos = maskable_positions(model, ids)
    batch = ids_t.repeat(len(pos), 1)
    batch[torch.arange(len(pos)), torch.tensor(pos)] = model.mask_id()
    acts = _batch_activations(model, batch)
    if cfg.sig_mode == "mean":
        return acts.to(work_dtype(model)).mean(0, keepdim=True).to(dt)
    return acts


def normalize(scores: torch.Tensor, method: str) -> torch.Tensor:
    """Method-specific normalization of a whole [n_layers, d_mlp] map (float32)."""
    if method == "sig":
        n = scores.norm()
        return scores / n if n > 0 else scores
    if method == "amig":
        s = scores.sum()
        return scores / s if s != 0 else scores
    return scores


# ----------------------------------------------------------------------- fast engine
def work_dtype(model: Model) -> torch.dtype:
    """The dtype scores and the softmax are computed in: float32, or float64 for a float64
    model (which makes the engine an exact oracle to compare against)."""
    return torch.promote_types(model.dtype, torch.float32)


def _layer_bytes_per_row(model: Model, seq_len: int) -> int:
    """Bytes one batch row keeps per decoder layer during a pass: activations saved for the
    backward pass and its copy of the prefix keys/values."""
    cfg = model.config
    d = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    el = torch.finfo(model.dtype).bits // 8
    return (12 * d + 8 * model.d_mlp + 2 * seq_len * d) * el


def auto_batch_size(model: Model, seq_len: int, memory_budget_gb: float) -> int:
    """Integration points per pass that fit ``memory_budget_gb``. A point patched at layer l
    is a batch row in layers l..L-1: (L+1)/2 layers on average."""
    per_point = _layer_bytes_per_row(model, seq_len) * (model.n_layers + 1) // 2
    return max(1, int(memory_budget_gb * 2**30 // per_point))


def head_rows(model: Model, memory_budget_gb: float) -> int:
    """Rows per block of the fused head (per row: ~3 [HEAD_BLOCK] logit buffers)."""
    el = torch.finfo(work_dtype(model)).bits // 8
    return max(1, int(memory_budget_gb * 2**30 // (3 * HEAD_BLOCK * el)))


def _grow(n_new: int):
    """Forward pre-hook (with kwargs) on a decoder layer: append ``n_new`` copies of row 0
    (the unpatched run) to the layer's hidden-state input, detached from row 0's graph."""

    def grow(h):
        # detached: a new row starts as a copy of the unpatched run, and its gradient must not
        # flow back into row 0 (which carries the alpha = 1 points, see _attribute_one)
        return torch.cat([h, h[:1].detach().expand(n_new, *h.shape[1:])])

    def pre(module, args, kwargs):
        if args:
            return (grow(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = grow(kwargs["hidden_states"])
        return args, kwargs

    return pre


class _PrefixRunner:
    """Runs the last prompt token on top of a cached prefix, as a "staircase" batch.

    ``run(counts)`` starts at batch size 1 (the unpatched run, row 0); at the input of layer
    k it appends ``counts[k]`` copies of row 0, the rows that will be patched at layer k.
    A point patched at layer l is thus a batch row only in layers l..L-1, where its hidden
    state differs from the unpatched one: no layer runs a row whose result is known.
    """

    def __init__(self, model: Model, ids: Sequence[int]):
        self.model = model
        self.ids = list(ids)
        dev = model.device
        self.last = torch.tensor([[self.ids[-1]]], device=dev)
        self.cache = None
        if len(self.ids) > 1:
            with torch.no_grad():
                out = model.base_model()(input_ids=torch.tensor([self.ids[:-1]], device=dev), use_cache=True)
            self.cache = out.past_key_values

    def _cache_for(self, rows: Sequence[int]):
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        for layer, n in zip(cache.layers, rows):
            if n > 1:
                layer.batch_repeat_interleave(n)
        return cache

    def run(self, counts: Sequence[int], act_fn: Callable | None = None) -> torch.Tensor:
        """[1 + sum(counts), d_model] final-normed last-position hidden states; row 0 is the
        unpatched run, then the rows added at layer 0, layer 1, ... in order."""
        model = self.model
        rows, n = [], 1
        for c in counts:
            n += c
            rows.append(n)
        handles = [
            model.layers()[k].register_forward_pre_hook(_grow(c), with_kwargs=True)
            for k, c in enumerate(counts)
            if c
        ]
        try:
            ctx = model.hook_activations(act_fn) if act_fn else contextlib.nullcontext()
            with ctx:
                out = model.base_model()(
                    input_ids=self.last,
                    past_key_values=self._cache_for(rows),
                    use_cache=self.cache is not None,
                )
        finally:
            for h in handles:
                h.remove()
        return out.last_hidden_state[:, -1]


# vocabulary rows per block of the fused head: measured on GPT-2 and Gemma shapes, 1024-2048
# beat 8192 by 15-20% (a block's logits stay in cache between its two products)
HEAD_BLOCK = 1024


@torch.no_grad()
def target_prob_grad(
    model: Model,
    hidden: torch.Tensor,
    target: int,
    max_rows: int | None = None,
    argmax_row: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """P(target) and its gradient w.r.t. final-normed hidden states ``hidden`` [n, d_model].

    With z = E h (+ bias, then soft-capping z -> c tanh(z/c) where the model has it) and
    p = softmax(z): dp_t/dh = p_t ((1 - p_t) s_t E_t - sum_{v != t} p_v s_v E_v), s_v the
    soft-cap derivative (1 without). The vocabulary is swept in blocks of ``HEAD_BLOCK`` rows
    with a running maximum (online softmax): each block's logits are computed, exponentiated
    and multiplied back into E while they are still in cache, so the [vocab, n] logits never
    exist in full and E is read once. The target is left out of the sum, which would
    otherwise cancel badly when p_t is close to 1. Rows go in blocks of ``max_rows``.
    Returns ``(p_t [n], grad [n, d_model])`` in :func:`work_dtype`; with ``argmax_row`` also
    the most likely token of that row (the first one on ties, like ``torch.argmax``).
    """
    head = model.unembedding()
    W = head.weight  # [V, d]
    bias = getattr(head, "bias", None)
    cap = model.logit_softcap()
    work = work_dtype(model)
    V, d = W.shape
    n = hidden.shape[0]
    max_rows = max_rows or n
    dev = hidden.device
    p_out = torch.empty(n, device=dev, dtype=work)
    g_out = torch.empty(n, d, device=dev, dtype=work)
    w_t = W[target].to(work)
    # (logit, token) of argmax_row, kept on the device: no host sync per block
    best_z = torch.tensor(-torch.inf, device=dev, dtype=work)
    best_t = torch.tensor(-1, device=dev)
    for i in range(0, n, max_rows):
        h = hidden[i : i + max_rows].to(W.dtype)
        r = h.shape[0]
        ht = h.t().contiguous()
        run_max = torch.full((r,), -torch.inf, device=dev, dtype=work)
        total = torch.zeros(r, device=dev, dtype=torch.float64)  # cheap, and p_t hinges on it
        rest = torch.zeros(r, d, device=dev, dtype=work)  # sum_{v != t} exp(z_v - max) s_v E_v
        for s in range(0, V, HEAD_BLOCK):
            Wb = W[s : s + HEAD_BLOCK]
            z = (Wb @ ht).to(work)  # [block, r]
            if bias is not None:
                z += bias[s : s + HEAD_BLOCK].to(work)[:, None]
            slope = None
            if cap:
                z.div_(cap).tanh_()
                slope = 1 - z * z
                z.mul_(cap)
            if s <= target < s + HEAD_BLOCK:  # the target's logit from the same product
                y_t = z[target - s].clone()
                s_t = slope[target - s].clone() if slope is not None else 1.0
            if argmax_row is not None and i <= argmax_row < i + r:
                top, idx = z[:, argmax_row - i].max(0)
                better = top > best_z  # strictly: an earlier block wins a tie
                best_t = torch.where(better, idx + s, best_t)
                best_z = torch.maximum(top, best_z)
            new_max = torch.maximum(run_max, z.amax(0))
            rescale = torch.exp(run_max - new_max)
            z -= new_max
            z.exp_()
            # the block's sum in the work dtype (a cascade sum: ~1e-7 relative), the running
            # total across blocks in float64; z.sum(0, dtype=float64) would copy the block
            total.mul_(rescale.double()).add_(z.sum(0).double())
            if s <= target < s + HEAD_BLOCK:
                z[target - s] = 0
            if slope is not None:
                z *= slope
            rest.mul_(rescale[:, None]).addmm_(z.t(), Wb.to(work))
            run_max = new_max
        e_t = torch.exp(y_t - run_max)
        total = total.to(work)
        p_t = e_t / total
        rest /= total[:, None]
        g_out[i : i + max_rows] = p_t[:, None] * (((1 - p_t) * s_t)[:, None] * w_t - rest)
        p_out[i : i + max_rows] = p_t
    if argmax_row is not None:
        return p_out, g_out, int(best_t)
    return p_out, g_out


def _plan_passes(n_layers: int, n_per_layer: int, batch: int) -> list[list[tuple[int, int]]]:
    """Split the points (layer, j) into passes of <= ``batch`` points, each sorted by layer.

    Points are taken step-major (every layer's j-th point, then the (j+1)-th, ...), so a full
    pass holds the same number of points at every layer. The cost of a point does not depend
    on which pass it is in (it is a batch row in layers l..L-1 either way). A plan always has
    at least one pass (possibly empty: row 0 alone still carries the alpha = 1 points).
    """
    points = [(layer, j) for j in range(n_per_layer) for layer in range(n_layers)]
    return [sorted(points[i : i + batch]) for i in range(0, len(points), batch)] or [[]]


def _attribute_one(
    model: Model,
    q: _Prepared,
    cfg: AttributionConfig,
    batch_size: int,
    max_head_rows: int,
    bar: tqdm | None,
) -> Attribution:
    """One query. Every pass is a staircase run on the cached prefix (:class:`_PrefixRunner`)
    whose row 0 is the unpatched run; the point (l, alpha) is built inside the pass from row
    0's own activation at layer l. The alpha = 1 points need no rows of their own: the
    patched run is then the unpatched one, so in the first pass row 0 gets a zero-valued leaf
    added to its activation at every layer, and one backward pass gives dP/da_l at alpha = 1
    for all layers at once (and row 0's P(target) and top token are the clean prediction).
    """
    L, D, m = model.n_layers, model.d_mlp, cfg.n_steps
    dev, work = model.device, work_dtype(model)
    runner = _PrefixRunner(model, q.ids)
    base = baselines(model, q.ids, cfg).to(work)  # [B0, L, D]
    n_base = base.shape[0]
    alphas = torch.arange(1, m, device=dev, dtype=work) / m  # alpha_1..alpha_{m-1}; alpha_m = 1 is row 0
    acts = torch.empty(L, D, device=dev, dtype=model.dtype)
    grad_sum = torch.zeros(n_base, L, D, device=dev, dtype=work)
    prob = pred = None
    for n_pass, points in enumerate(_plan_passes(L, n_base * (m - 1), batch_size)):
        first = n_pass == 0
        ids = [[j for layer, j in points if layer == k] for k in range(L)]  # point ids per layer
        counts = [len(j) for j in ids]
        idx = {k: torch.tensor(j, device=dev) for k, j in enumerate(ids) if j}
        leaves: dict[int, torch.Tensor] = {}  # layer -> [c, D] patched activations (new rows)
        zeros: dict[int, torch.Tensor] = {}  # layer -> [D] zero leaf on row 0 (first pass)

        def patch(layer, h, counts=counts, idx=idx, leaves=leaves, zeros=zeros, first=first):
            a = h[0, -1].detach()  # the unpatched activation at this layer (row 0)
            if first:
                acts[layer] = a
            c = counts[layer]
            keep = h[: h.shape[0] - c]
            if first:
                z = torch.zeros_like(a, requires_grad=True)
                zeros[layer] = z
                keep = torch.cat([keep[:1] + z, keep[1:]])
            if not c:
                return keep
            j = idx[layer]
            b = base[j // (m - 1), layer]
            x = (b + alphas[j % (m - 1), None] * (a.to(work) - b)).to(model.dtype).requires_grad_(True)
            leaves[layer] = x
            return torch.cat([keep, x[:, None, :]])

        with torch.enable_grad():
            hidden = runner.run(counts, patch)  # [1 + len(points), d_model]
            if first:
                p_t, g_hidden, pred = target_prob_grad(
                    model, hidden.detach(), q.target_id, max_head_rows, argmax_row=0
                )
                prob = float(p_t[0])
            else:  # row 0 carries no leaves here: leave it out of the head
                _, g_rest = target_prob_grad(model, hidden[1:].detach(), q.target_id, max_head_rows)
                g_hidden = torch.cat([torch.zeros_like(g_rest[:1]), g_rest])
            inputs = list(leaves.values()) + list(zeros.values())
            grads = torch.autograd.grad(hidden, inputs, grad_outputs=g_hidden.to(hidden.dtype))
        for layer, g in zip(leaves, grads[: len(leaves)]):
            grad_sum[:, layer].index_add_(0, idx[layer] // (m - 1), g.to(work))
        for layer, g in zip(zeros, grads[len(leaves) :]):
            grad_sum[:, layer] += g.to(work)  # alpha = 1: the same point for every baseline
        if bar is not None:
            bar.update(len(points) + (L * n_base if first else 0))

    diff = acts.to(work)[None] - base  # [B0, L, D]
    scores = (diff * grad_sum / m).sum(0)
    scores = normalize(scores, cfg.method)
    return Attribution(
        prompt=q.prompt,
        answer=q.answer,
        target_id=q.target_id,
        method=cfg.method,
        scores=scores.cpu(),
        activations=acts.to(work).cpu(),
        prob=prob,
        top1=pred == q.target_id,
        predicted_id=pred,
        predicted=model.tokenizer.decode([pred]),
        config=cfg.as_dict(),
        query_id=q.query_id,
        fact_id=q.fact_id,
        relation=q.relation,
    )


def attribute(
    model: Model,
    queries: Any,
    method: str = "ig",
    *,
    n_steps: int = 20,
    internal_batch_size: int | None = None,
    memory_budget_gb: float = 2.0,
    sig_mode: str = "mean",
    progress: bool = True,
) -> Attribution | list[Attribution]:
    """Attribute the gold answer of each query to the model's MLP neurons.

    ``queries`` is a :class:`knowloc.data.Query`, a ``(prompt, answer)`` tuple, or a
    sequence of either; a single query gives a single :class:`Attribution`, a sequence a
    list. ``internal_batch_size`` is the number of integration points (layer, step) per
    forward pass; by default it is sized to ``memory_budget_gb``, which also bounds the rows
    per block of the output head. Results do not depend on either.
    """
    cfg = AttributionConfig(method=method, n_steps=n_steps, sig_mode=sig_mode).validate()
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1
    ):
        raise ConfigError(f"internal_batch_size must be an integer >= 1 (got {internal_batch_size!r})")
    if not memory_budget_gb > 0:
        raise ConfigError(f"memory_budget_gb must be > 0 (got {memory_budget_gb!r})")
    single = not (isinstance(queries, (list, tuple)) and not _is_pair(queries))
    qs = [queries] if single else list(queries)
    prepared = [_prepare(model, q) for q in qs]
    results = []
    total = 0
    for q in prepared:
        nb = len(maskable_positions(model, q.ids)) if (cfg.method == "sig" and cfg.sig_mode == "per_token") else 1
        total += model.n_layers * cfg.n_steps * nb
    bar = tqdm(total=total, desc=f"{cfg.method} attribution", unit="pt", disable=not progress, leave=False)
    rows = head_rows(model, memory_budget_gb)
    try:
        for q in prepared:
            bs = internal_batch_size or auto_batch_size(model, len(q.ids), memory_budget_gb)
            bar.set_postfix_str(q.prompt[-40:])
            results.append(_attribute_one(model, q, cfg, bs, rows, bar))
    finally:
        bar.close()
    return results[0] if single else results


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, str) for v in x)


__all__ = [
    "METHODS",
    "Attribution",
    "AttributionConfig",
    "attribute",
    "auto_batch_size",
    "baselines",
    "normalize",
    "target_prob_grad",
    "work_dtype",
]


# TEMPORARY: replaced by the registry at merge
@dataclass(frozen=True)
class Method:
    """How an attribution method is presented: its name, label and paper figure."""

    name: str
    label: str
    figure: str | None


_REGISTRY: dict[str, Method] = {
    m.name: m for m in (Method("ig", "IG", "3"), Method("sig", "SIG", "8"),
                        Method("amig", "AMIG", "9"))
}


def method_names() -> tuple[str, ...]:
    """The registered methods, in display order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; ConfigError for an unknown one."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attribution method {name!r}; choose from "
                          f"{', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def sort_methods(names: Iterable[str]) -> list[str]:
    """``names`` without repeats: registered ones in display order, then the others sorted."""
    present = set(names)
    return [m for m in _REGISTRY if m in present] + sorted(present - set(_REGISTRY))
