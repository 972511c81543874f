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
* points (layer, step) are batched across layers in chunks sized to a memory budget, and
  the layers below a chunk's lowest patched layer run once at batch size 1 (their output is
  the same for every point), the residual stream being expanded to the chunk's batch there;
* weights are frozen; gradients are taken only w.r.t. the patched activations.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
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
    """Attribution scores of one query: ``scores[layer, neuron]`` (float32, CPU)."""

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
        model.hf(input_ids=batch_ids)
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
        return acts.float().mean(0, keepdim=True).to(dt)
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
def _bytes_per_point(model: Model, seq_len: int) -> int:
    cfg = model.config
    V = int(cfg.vocab_size)
    d = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    el = torch.finfo(model.dtype).bits // 8
    # the fused head keeps one float32 [vocab] buffer per point (+ a transient one);
    # per layer: activations saved for the backward pass, and the cached prefix keys/values
    per_layer = 12 * d + 8 * model.d_mlp + 2 * seq_len * d
    return 3 * V * 4 + model.n_layers * per_layer * el


def auto_batch_size(model: Model, seq_len: int, memory_budget_gb: float) -> int:
    return max(1, int(memory_budget_gb * 2**30 // _bytes_per_point(model, seq_len)))


def _layer_input_expander(batch: int):
    """Forward pre-hook (with kwargs) expanding a decoder layer's hidden-state input to ``batch``."""

    def pre(module, args, kwargs):
        if args:
            h = args[0]
            return (h.expand(batch, *h.shape[1:]),) + tuple(args[1:]), kwargs
        h = kwargs["hidden_states"]
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h.expand(batch, *h.shape[1:])
        return args, kwargs

    return pre


class _PrefixRunner:
    """Runs the last prompt token, batched, on top of a cached prefix."""

    def __init__(self, model: Model, ids: Sequence[int]):
        self.model = model
        self.ids = list(ids)
        dev = model.device
        self.last = torch.tensor([[self.ids[-1]]], device=dev)
        self.cache = None
        if len(self.ids) > 1:
            with torch.no_grad():
                out = model.hf(input_ids=torch.tensor([self.ids[:-1]], device=dev), use_cache=True)
            self.cache = out.past_key_values

    def _cache_for(self, batch: int, lo: int):
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        for i, layer in enumerate(cache.layers):
            if i >= lo:
                layer.batch_repeat_interleave(batch)
        return cache

    def hidden(self, batch: int, lo: int, act_fn: Callable | None, layers: Sequence[int]) -> torch.Tensor:
        """[batch, d_model] final-normed last-position hidden state; layers >= ``lo`` run at
        batch size ``batch``, the ones below once at batch size 1."""
        model = self.model
        handle = model.layers()[lo].register_forward_pre_hook(
            _layer_input_expander(batch), with_kwargs=True
        )
        try:
            ctx = model.hook_activations(act_fn, layers) if act_fn else contextlib.nullcontext()
            with ctx:
                out = model.base_model()(
                    input_ids=self.last,
                    past_key_values=self._cache_for(batch, lo),
                    use_cache=self.cache is not None,
                )
        finally:
            handle.remove()
        return out.last_hidden_state[:, -1]


class _TargetProb(torch.autograd.Function):
    """P(target | final hidden state) with a fused, memory-light backward.

    Forward: logits = h E^T (+ bias), p = softmax(logits) computed in place, returns p_t.
    Backward: dp_t/dh = p_t (E_t - p^T E). Two matrix products and a few passes over the
    [batch, vocab] buffer, instead of autograd's chain of full-vocab temporaries.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target: int):
        logits = (h @ weight.t()).float()
        if bias is not None:
            logits += bias.float()
        logits -= torch.logsumexp(logits, -1, keepdim=True)
        p = logits.exp_()
        p_t = p[:, target].clone()
        ctx.save_for_backward(p, p_t)
        ctx.weight, ctx.target, ctx.h_dtype = weight, target, h.dtype
        return p_t

    @staticmethod
    def backward(ctx, grad_out):
        p, p_t = ctx.saved_tensors
        w = ctx.weight
        # E_t - p^T E cancels badly when p_t is large; leave the target out of the product:
        # E_t - p^T E = (1 - p_t) E_t - sum_{v != t} p_v E_v
        p_other = p.clone()
        p_other[:, ctx.target] = 0
        rest = (p_other.to(w.dtype) @ w).float()
        w_t = w[ctx.target].float()[None, :]
        grad_h = (grad_out * p_t)[:, None] * ((1 - p_t)[:, None] * w_t - rest)
        return grad_h.to(ctx.h_dtype), None, None, None


def target_prob(model: Model, hidden: torch.Tensor, target: int) -> torch.Tensor:
    """[batch] P(target) from final-normed hidden states [batch, d_model]."""
    head = model.unembedding()
    cap = model.logit_softcap()
    if cap:  # soft-capped logits: plain autograd path
        logits = head(hidden).float()
        logits = torch.tanh(logits / cap) * cap
        return torch.softmax(logits, -1)[:, target]
    return _TargetProb.apply(hidden, head.weight, getattr(head, "bias", None), target)


def _plan_chunks(n_layers: int, n_per_layer: int, batch: int) -> list[list[tuple[int, int]]]:
    """Split points (layer, j) into chunks of <= ``batch`` points, highest layers first.

    Points of one layer stay together when a layer fits in a chunk, so a chunk spans as few
    layers as possible (its cost grows with the number of layers above its lowest one).
    """
    points = [(layer, j) for layer in reversed(range(n_layers)) for j in range(n_per_layer)]
    return [points[i : i + batch] for i in range(0, len(points), batch)]


def _attribute_one(
    model: Model,
    q: _Prepared,
    cfg: AttributionConfig,
    batch_size: int,
    bar: tqdm | None,
) -> Attribution:
    L, D, m = model.n_layers, model.d_mlp, cfg.n_steps
    runner = _PrefixRunner(model, q.ids)

    # clean run: activations a, P(target), prediction
    acts = torch.empty(L, D, device=model.device, dtype=model.dtype)

    def grab(layer, h):
        acts[layer] = h[0, -1]
        return h

    with torch.no_grad():
        h = runner.hidden(1, 0, grab, range(L))
        clean_logits = model.unembedding()(h)[0].float()
        cap = model.logit_softcap()
        if cap:
            clean_logits = torch.tanh(clean_logits / cap) * cap
    probs = torch.softmax(clean_logits, -1)
    prob = float(probs[q.target_id])
    pred = int(probs.argmax())

    base = baselines(model, q.ids, cfg)  # [B0, L, D]
    n_base = base.shape[0]
    alphas = torch.arange(1, m + 1, device=model.device, dtype=torch.float32) / m
    grad_sum = torch.zeros(n_base, L, D, device=model.device, dtype=torch.float32)
    n_per_layer = n_base * m
    for chunk in _plan_chunks(L, n_per_layer, batch_size):
        B = len(chunk)
        layer_idx = torch.tensor([p[0] for p in chunk], device=model.device)
        base_idx = torch.tensor([p[1] // m for p in chunk], device=model.device)
        alpha = alphas[torch.tensor([p[1] % m for p in chunk], device=model.device)]
        b = base[base_idx, layer_idx].float()
        a = acts[layer_idx].float()
        x = (b + alpha[:, None] * (a - b)).to(model.dtype).requires_grad_(True)
        chunk_layers = sorted({p[0] for p in chunk})
        sel = {l: (layer_idx == l)[:, None] for l in chunk_layers}

        def patch(layer, h, x=x, sel=sel):
            return torch.where(sel[layer][:, :, None] if h.dim() == 3 else sel[layer], x[:, None, :], h)

        with torch.enable_grad():
            hidden = runner.hidden(B, chunk_layers[0], patch, chunk_layers)
            p_target = target_prob(model, hidden, q.target_id)
            (g,) = torch.autograd.grad(p_target.sum(), x)
        grad_sum.index_put_((base_idx, layer_idx), g.float(), accumulate=True)
        if bar is not None:
            bar.update(B)

    diff = acts.float()[None] - base.float()  # [B0, L, D]
    scores = (diff * grad_sum / m).sum(0)
    scores = normalize(scores, cfg.method)
    return Attribution(
        prompt=q.prompt,
        answer=q.answer,
        target_id=q.target_id,
        method=cfg.method,
        scores=scores.cpu(),
        activations=acts.float().cpu(),
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
    forward pass; by default it is sized to ``memory_budget_gb``. Results do not depend on it.
    """
    cfg = AttributionConfig(method=method, n_steps=n_steps, sig_mode=sig_mode).validate()
    single = not (isinstance(queries, (list, tuple)) and not _is_pair(queries))
    qs = [queries] if single else list(queries)
    prepared = [_prepare(model, q) for q in qs]
    results = []
    total = 0
    for q in prepared:
        nb = len(maskable_positions(model, q.ids)) if (cfg.method == "sig" and cfg.sig_mode == "per_token") else 1
        total += model.n_layers * cfg.n_steps * nb
    bar = tqdm(total=total, desc=f"{cfg.method} attribution", unit="pt", disable=not progress, leave=False)
    try:
        for q in prepared:
            bs = internal_batch_size or auto_batch_size(model, len(q.ids), memory_budget_gb)
            if bs < 1:
                raise ConfigError(f"internal_batch_size must be >= 1 (got {bs})")
            bar.set_postfix_str(q.prompt[-40:])
            results.append(_attribute_one(model, q, cfg, bs, bar))
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
    "baselines",
    "normalize",
    "auto_batch_size",
    "target_prob",
]
