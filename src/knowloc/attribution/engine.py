"""The attribution engine: prefix runner, pass planner and staircase passes.

Patching the last position leaves the prompt prefix unchanged, which the engine exploits:

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
* the output head is fused (:mod:`.head`): P(target) and its gradient w.r.t. the final
  hidden state come from two matrix products with the unembedding;
* weights are frozen; gradients are taken only w.r.t. the patched activations;
* a multi-token target (``target="all"``, or a first token extended through a leading
  whitespace-only one) is teacher-forced: every row pushes the last prompt token followed by
  the answer tokens but the last (a short suffix on the same prefix cache); the patch stays
  at the last prompt position, which reaches the answer positions through attention, and
  P(answer) = prod_i P(t_i | prompt, t_<i) with its exact gradient
  dP/dh_i = (prod_{j != i} p_j) dp_i/dh_i from the fused head at each position. A
  one-token target runs exactly as before (a suffix of length 1).

The method (:mod:`.methods`) only supplies baselines, the number of steps and the final
normalization; the engine is the same for every method.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models import ActivationFn, Model
from ..models.compat import cache_kwargs, output_cache, repeat_cache_rows
from .head import HeadOutput, head_rows, target_prob_grad, work_dtype
from .methods import AttributionConfig, AttributionMethod
from .result import Attribution

log = logging.getLogger(__name__)

__all__ = ["Attribution", "PrefixRunner", "attribute", "auto_batch_size", "completeness_gap",
           "plan_passes"]


# ---------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class _Prepared:
    prompt: str
    answer: str
    ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    query_id: str | None
    fact_id: str | None
    relation: str | None


def _prepare(model: Model, q: Any, target: str) -> _Prepared:
    if isinstance(q, (tuple, list)) and len(q) == 2:
        prompt, answer = q
        qid = fid = rel = None
    else:
        prompt, answer = q.prompt, q.answer
        qid = getattr(q, "query_id", None)
        fid = getattr(q, "fact_id", None)
        rel = getattr(q, "relation", None)
    ids = model.encode_prompt(prompt)
    targets = model.target_ids(prompt, answer, target)
    return _Prepared(prompt, answer, tuple(ids), tuple(targets), qid, fid, rel)


# ----------------------------------------------------------------------- memory sizing
def _layer_bytes_per_row(model: Model, seq_len: int, n_suffix: int = 1) -> int:
    """Bytes one batch row keeps per decoder layer during a pass: activations of its
    ``n_suffix`` pushed positions saved for the backward pass, and its keys/values."""
    d = model.d_model
    el = torch.finfo(model.dtype).bits // 8
    return ((12 * d + 8 * model.d_mlp) * n_suffix + 2 * (seq_len + n_suffix - 1) * d) * el


def auto_batch_size(model: Model, seq_len: int, memory_budget_gb: float,
                    n_suffix: int = 1) -> int:
    """Integration points per pass that fit ``memory_budget_gb`` (``n_suffix``: positions
    each row pushes, the answer length of a teacher-forced target). A point patched at
    layer l is a batch row in layers l..L-1: (L+1)/2 layers on average."""
    per_point = _layer_bytes_per_row(model, seq_len, n_suffix) * (model.n_layers + 1) // 2
    return max(1, int(memory_budget_gb * 2**30 // per_point))


# ----------------------------------------------------------------------- prefix runner
def _grow(n_new: int) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
    """Forward pre-hook (with kwargs) on a decoder layer: append ``n_new`` copies of row 0
    (the unpatched run) to the layer's hidden-state input, detached from row 0's graph."""

    def grow(h: torch.Tensor) -> torch.Tensor:
        # detached: a new row starts as a copy of the unpatched run, and its gradient must not
        # flow back into row 0 (which carries the alpha = 1 points, see _attribute_one)
        return torch.cat([h, h[:1].detach().expand(n_new, *h.shape[1:])])

    def pre(module: torch.nn.Module, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (grow(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = grow(kwargs["hidden_states"])
        return args, kwargs

    return pre


class PrefixRunner:
    """Runs the last prompt token (followed by ``suffix``, the teacher-forced answer tokens
    but the last) on top of a cached prefix, as a "staircase" batch.

    ``run(counts)`` starts at batch size 1 (the unpatched run, row 0); at the input of layer
    k it appends ``counts[k]`` copies of row 0, the rows that will be patched at layer k.
    A point patched at layer l is thus a batch row only in layers l..L-1, where its hidden
    state differs from the unpatched one: no layer runs a row whose result is known.
    """

    def __init__(self, model: Model, ids: Sequence[int], suffix: Sequence[int] = ()):
        self.model = model
        self.ids = list(ids)
        dev = model.device
        self.last = torch.tensor([[self.ids[-1], *suffix]], device=dev)
        self.cache = None
        if len(self.ids) > 1:
            with torch.no_grad():
                out = model.base_model()(input_ids=torch.tensor([self.ids[:-1]], device=dev),
                                         use_cache=True)
            self.cache = output_cache(out)

    def run(self, counts: Sequence[int], act_fn: ActivationFn | None = None) -> torch.Tensor:
        """[1 + sum(counts), 1 + len(suffix), d_model] final-normed hidden states of the
        pushed positions; row 0 is the unpatched run, then the rows added at layer 0,
        layer 1, ... in order."""
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
        cache = repeat_cache_rows(self.cache, rows) if self.cache is not None else None
        try:
            ctx = model.hook_activations(act_fn) if act_fn else contextlib.nullcontext()
            with ctx:
                out = model.base_model()(
                    input_ids=self.last,
                    use_cache=self.cache is not None,
                    **cache_kwargs(cache),
                )
        finally:
            for h in handles:
                h.remove()
        return out.last_hidden_state


# ------------------------------------------------------------------------ pass planner
def plan_passes(n_layers: int, n_per_layer: int, batch: int) -> list[list[tuple[int, int]]]:
    """Split the points (layer, j) into passes of <= ``batch`` points, each sorted by layer.

    Points are taken step-major (every layer's j-th point, then the (j+1)-th, ...), so a full
    pass holds the same number of points at every layer. The cost of a point does not depend
    on which pass it is in (it is a batch row in layers l..L-1 either way). A plan always has
    at least one pass (possibly empty: row 0 alone still carries the alpha = 1 points).
    """
    points = [(layer, j) for j in range(n_per_layer) for layer in range(n_layers)]
    return [sorted(points[i : i + batch]) for i in range(0, len(points), batch)] or [[]]


class _StaircasePatch:
    """The activation function of one staircase pass (state explicit, one object per pass).

    At layer ``k`` it reads row 0's activation (the unpatched run) at the last prompt
    position (position 0 of the pushed tokens), keeps the rows that are already in the
    batch, and puts the ``counts[k]`` patched points ``b + alpha (a - b)`` of that layer, as
    leaves, at position 0 of the rows that joined at this layer (their answer positions keep
    the unpatched values: the patch reaches them from the next layer on, through
    attention). Point j of a layer is baseline ``j // r`` at node ``alphas[j % r]``
    (``r = len(alphas)``). In the first pass it also records the unpatched activations into
    ``acts`` and, when alpha = 1 is a node of the rule (``endpoint``), adds a zero leaf to
    row 0's position 0 at every layer (the alpha = 1 points). Under ``torch.no_grad`` the
    points are plain values (the baseline pass of the completeness gap).
    """

    def __init__(self, model: Model, points: Sequence[tuple[int, int]], first: bool,
                 base: torch.Tensor, alphas: torch.Tensor, acts: torch.Tensor,
                 endpoint: bool = True):
        self.model = model
        self.first = first
        self.endpoint = first and endpoint  # zero leaves on row 0: alpha = 1 is a node
        self.base = base
        self.alphas = alphas  # [r] the nodes with rows of their own; point j: alphas[j % r]
        self.acts = acts
        dev = model.device
        ids = [[j for layer, j in points if layer == k] for k in range(model.n_layers)]
        self.counts = [len(j) for j in ids]
        self.idx = {k: torch.tensor(j, device=dev) for k, j in enumerate(ids) if j}
        self.leaves: dict[int, torch.Tensor] = {}  # layer -> [c, D] patched activations
        self.zeros: dict[int, torch.Tensor] = {}  # layer -> [D] zero leaf on row 0 (first)

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        a = h[0, 0].detach()  # the unpatched activation at this layer (row 0)
        if self.first:
            self.acts[layer] = a
        c = self.counts[layer]
        keep = h[: h.shape[0] - c]
        one = h.shape[1] == 1  # a one-token target: the last prompt position alone
        if self.endpoint:
            z = torch.zeros_like(a, requires_grad=True)
            self.zeros[layer] = z
            row0 = keep[:1] + z if one else torch.cat([keep[:1, :1] + z, keep[:1, 1:]], 1)
            keep = torch.cat([row0, keep[1:]])
        if not c:
            return keep
        r = self.alphas.shape[0]
        j = self.idx[layer]
        b = self.base[j // r, layer]
        work = self.base.dtype
        x = (b + self.alphas[j % r, None] * (a.to(work) - b)).to(self.model.dtype)
        if torch.is_grad_enabled():
            x.requires_grad_(True)
        self.leaves[layer] = x
        new = x[:, None, :] if one else torch.cat([x[:, None, :], h[h.shape[0] - c:, 1:]], 1)
        return torch.cat([keep, new])


def _grad_scale(g_hidden: torch.Tensor, dtype: torch.dtype) -> float:
    """The power of two that ``g_hidden`` is multiplied by before a backward pass in
    ``dtype`` (and the gradients divided by after it): 1, except in float16, whose smallest
    value is ~6e-8, where it brings the largest |dP/dh| to [1, 2). Without it, dP/dh of an
    answer with P ~ 1e-8 rounds to 0 in float16 and so does its whole map (bfloat16 has
    float32's exponent range and needs no scaling)."""
    if dtype != torch.float16:
        return 1.0
    top = float(g_hidden.abs().max())
    if not 0 < top < math.inf:
        return 1.0
    return 2.0 ** -math.floor(math.log2(top))


def _answer_head(model: Model, hidden: torch.Tensor, targets: Sequence[int], max_rows: int,
                 argmax_row: int | None = None, extra: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor | None]:
    """P(answer) ``[n]`` of teacher-forced rows ``hidden`` ``[n, len(targets), d_model]``,
    its gradient w.r.t. ``hidden``, with ``argmax_row`` that row's most likely token at
    every position, and P(answer) of the forward-only rows ``extra`` ``[m, len(targets),
    d_model]`` (None without them; they share the head's sweep of the vocabulary, see
    :func:`~knowloc.attribution.head.target_prob_grad`). P = prod_i p_i, dP/dh_i =
    (prod_{j != i} p_j) dp_i/dh_i (no division)."""
    heads: list[HeadOutput] = [
        target_prob_grad(model, hidden[:, i], t, max_rows, argmax_row=argmax_row,
                         extra=None if extra is None else extra[:, i])
        for i, t in enumerate(targets)
    ]
    tops = [int(h.top) for h in heads if h.top is not None]
    p_extra = None
    if extra is not None:
        parts = [h.extra for h in heads if h.extra is not None]
        p_extra = parts[0]
        for part in parts[1:]:
            p_extra = p_extra * part
    if len(heads) == 1:
        return heads[0].prob, heads[0].grad[:, None], tops, p_extra
    p = torch.stack([h.prob for h in heads], 1)  # [n, len(targets)]
    grads = []
    for i, h in enumerate(heads):
        others = torch.cat([p[:, :i], p[:, i + 1:]], 1).prod(1)
        grads.append(others[:, None] * h.grad)
    return p.prod(1), torch.stack(grads, 1), tops, p_extra


def _baseline_rows(model: Model, runner: PrefixRunner, base: torch.Tensor, acts: torch.Tensor,
                   batch_size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The final hidden states ``[n_baselines * n_layers, n_answer, d_model]`` with layer l's
    activation at the last prompt position replaced by the baseline b_l, and their (layer,
    baseline) in row order: forward-only staircase passes on the cached prefix (one row per
    layer and baseline), for the completeness gap of rules without an alpha = 0 node."""
    n_base, L = base.shape[:2]
    zero = torch.zeros(1, device=base.device, dtype=base.dtype)
    rows, order = [], []
    with torch.no_grad():
        for points in plan_passes(L, n_base, batch_size):
            patch = _StaircasePatch(model, points, False, base, zero, acts, endpoint=False)
            rows.append(runner.run(patch.counts, patch)[1:])
            order += list(points)
    return torch.cat(rows), order


def completeness_gap(sums: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Per layer, ``|sum_p Attr(l, p) - (P(a_l) - P(b_l))| / |P(a_l) - P(b_l)|`` (IG's
    completeness; 0 for the exact integral), the largest over the baselines.

    ``sums`` ``[n_baselines, n_layers]``: each baseline's raw (unnormalized) attributions
    summed over a layer's neurons; ``deltas``: P(a_l) - P(b_l) of the same shape. A layer
    whose delta is 0 has gap 0 if its sum is 0 too, else infinity. Returns float64
    ``[n_layers]``.
    """
    sums, deltas = sums.double(), deltas.double()
    err = (sums - deltas).abs()
    degenerate = torch.where(err == 0, torch.zeros_like(err), torch.full_like(err, math.inf))
    gap = torch.where(deltas != 0, err / deltas.abs(), degenerate)
    return gap.amax(0)


def _attribute_one(
    model: Model,
    q: _Prepared,
    cfg: AttributionConfig,
    method: AttributionMethod,
    batch_size: int,
    max_head_rows: int,
    bar: tqdm | None,
) -> Attribution:
    """One query. Every pass is a staircase run on the cached prefix (:class:`PrefixRunner`)
    whose row 0 is the unpatched run; the point (l, alpha) is built inside the pass from row
    0's own activation at layer l. The alpha = 1 points need no rows of their own: the
    patched run is then the unpatched one, so in the first pass row 0 gets a zero-valued leaf
    added to its activation at every layer, and one backward pass gives dP/da_l at alpha = 1
    for all layers at once (and row 0's P(target) and top token are the clean prediction).
    """
    L, D = model.n_layers, model.d_mlp
    quad = method.quadrature(cfg)
    m = quad.n
    dev, work = model.device, work_dtype(model)
    runner = PrefixRunner(model, q.ids, q.target_ids[:-1])
    base = method.baseline(model, q.ids, cfg).to(work)  # [B0, L, D]
    n_base = base.shape[0]
    nodes = quad.alphas(work, dev)
    alphas = nodes[:-1] if quad.has_one else nodes  # the nodes with rows; alpha = 1 is row 0
    r = alphas.shape[0]
    # uniform weights (the paper's rule): gradients summed, divided by m once at the end
    weights = None if quad.uniform else torch.tensor(quad.weights, dtype=torch.float64).to(
        device=dev, dtype=work)
    acts = torch.empty(L, D, device=dev, dtype=model.dtype)
    grad_sum = torch.zeros(n_base, L, D, device=dev, dtype=work)
    p_base = torch.full((n_base, L), math.nan, device=dev, dtype=work)  # P(b_l) per baseline
    base_hidden: torch.Tensor | None = None
    base_order: list[tuple[int, int]] = []
    if not quad.has_zero:  # the baseline points: forward only, in passes of their own; their
        # P(b_l) rides on the first pass's head call (rows of the pass itself would change
        # its matrix shapes, and so the scores' bits)
        base_hidden, base_order = _baseline_rows(model, runner, base, acts, batch_size)
    prob = pred = None
    for n_pass, points in enumerate(plan_passes(L, n_base * r, batch_size)):
        first = n_pass == 0
        patch = _StaircasePatch(model, points, first, base, alphas, acts, quad.has_one)
        with torch.enable_grad():
            hidden = runner.run(patch.counts, patch)  # [1 + len(points), n_answer, d_model]
            if first:
                p_all, g_hidden, pred, p_b = _answer_head(
                    model, hidden.detach(), q.target_ids, max_head_rows, argmax_row=0,
                    extra=base_hidden if base_order else None)
                prob = float(p_all[0])
                p_rows = p_all[1:]
                if p_b is not None:
                    for row, (layer, k) in enumerate(base_order):
                        p_base[k, layer] = p_b[row]
            else:  # row 0 carries no leaves here: leave it out of the head
                p_rows, g_rest, _, _ = _answer_head(model, hidden[1:].detach(),
                                                    q.target_ids, max_head_rows)
                g_hidden = torch.cat([torch.zeros_like(g_rest[:1]), g_rest])
            inputs = list(patch.leaves.values()) + list(patch.zeros.values())
            scale = _grad_scale(g_hidden, hidden.dtype)
            grads = torch.autograd.grad(hidden, inputs,
                                        grad_outputs=(g_hidden * scale).to(hidden.dtype))
            if scale != 1:  # exact: a power of two, undone in the work dtype
                grads = tuple(g.to(work) / scale for g in grads)
        n_leaves = len(patch.leaves)
        for layer, g in zip(patch.leaves, grads[:n_leaves]):
            j = patch.idx[layer]
            g = g.to(work)
            if weights is not None:
                g = g * weights[j % r, None]
            grad_sum[:, layer].index_add_(0, j // r, g)
        for layer, g in zip(patch.zeros, grads[n_leaves:]):
            # alpha = 1: the same point for every baseline
            grad_sum[:, layer] += g.to(work) if weights is None else weights[-1] * g.to(work)
        if quad.has_zero:  # the alpha = 0 rows are the baseline points: P(b_l) for free
            for row, (layer, k) in enumerate(points):
                if k % r == 0:
                    p_base[k // r, layer] = p_rows[row]
        if bar is not None:
            bar.update(len(points) + (L * n_base if first and quad.has_one else 0))

    assert prob is not None and pred is not None  # the plan always has a first pass
    diff = acts.to(work)[None] - base  # [B0, L, D]
    raw = diff * grad_sum / m if weights is None else diff * grad_sum  # per baseline
    gap = completeness_gap(raw.sum(-1), prob - p_base.double())
    scores = raw.sum(0)
    if method.normalize is not None:
        scores = method.normalize(scores)
    wrong = [i for i, (p, t) in enumerate(zip(pred, q.target_ids)) if p != t]
    greedy = pred[: wrong[0] + 1] if wrong else pred
    return Attribution(
        prompt=q.prompt,
        answer=q.answer,
        target_id=q.target_ids[0],
        method=cfg.method,
        scores=scores.cpu(),
        activations=acts.to(work).cpu(),
        prob=prob,
        top1=not wrong,
        predicted_id=pred[0],
        predicted=model.tokenizer.decode(greedy),
        config=cfg.as_dict(),
        query_id=q.query_id,
        fact_id=q.fact_id,
        relation=q.relation,
        target_ids=q.target_ids,
        completeness_gap=gap.cpu(),
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
    target: str = "first",
    rule: str = "riemann_right",
    progress: bool = True,
) -> Attribution | list[Attribution]:
    """Attribute the gold answer of each query to the model's MLP neurons.

    ``queries`` is a :class:`knowloc.data.Query`, a ``(prompt, answer)`` tuple, or a
    sequence of either; a single query gives a single :class:`Attribution`, a sequence a
    list. ``method`` is a registered method name (:func:`~knowloc.attribution.method_names`).
    ``internal_batch_size`` is the number of integration points (layer, step) per forward
    pass; by default it is sized to ``memory_budget_gb``, which also bounds the rows per
    block of the output head. Results do not depend on either. ``target`` is what is
    attributed: ``"first"`` (the answer's first token, extended through a leading
    whitespace-only or partial-byte token) or ``"all"`` (the teacher-forced probability of
    the whole answer); see :meth:`knowloc.models.Model.target_ids`. ``rule`` is the
    integration rule over the ``n_steps`` points (:mod:`.quadrature`): ``"riemann_right"``
    (the paper's), ``"trapezoid"`` or ``"gausslegendre"``.

    Every attribution carries its per-layer completeness gap (``completeness_gap``): it
    costs one forward-only point per layer and baseline (none for the trapezoid, whose
    alpha = 0 node is the baseline point).
    """
    cfg = AttributionConfig(method=method, n_steps=n_steps, sig_mode=sig_mode,
                            target=target, rule=rule).validate()
    spec = cfg.spec
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1
    ):
        raise ConfigError(f"internal_batch_size must be an integer >= 1 (got {internal_batch_size!r})")
    if not memory_budget_gb > 0:
        raise ConfigError(f"memory_budget_gb must be > 0 (got {memory_budget_gb!r})")
    single = not (isinstance(queries, (list, tuple)) and not _is_pair(queries))
    qs = [queries] if single else list(queries)
    prepared = [_prepare(model, q, cfg.target) for q in qs]
    results = []
    total = sum(spec.cost(model, q.ids, cfg) for q in prepared)
    bar = tqdm(total=total, desc=f"{cfg.method} attribution", unit="pt", disable=not progress, leave=False)
    rows = head_rows(model, memory_budget_gb)
    try:
        for q in prepared:
            bs = internal_batch_size or auto_batch_size(model, len(q.ids), memory_budget_gb,
                                                        len(q.target_ids))
            bar.set_postfix_str(q.prompt if len(q.prompt) <= 40 else q.prompt[:39] + "…")
            results.append(_attribute_one(model, q, cfg, spec, bs, rows, bar))
    finally:
        bar.close()
    return results[0] if single else results


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, str) for v in x)
