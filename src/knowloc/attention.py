"""Dynamic KN selection through attention (paper §3.2, eqs. 4-6; METHODS §5).

Attention weights ``A_(l,h)`` of layer ``l`` and head ``h`` have rows ``r`` (query positions)
and columns ``c`` (key positions). Everything here works on the *post-softmax* weights of
the model's eager attention; fused kernels (``sdpa``, flash, flex) never materialize them,
so reading or changing attention under one raises :class:`AttentionImplementationError`
(switch with ``with eager_attention(model): ...``).

Definitions (METHODS §5, with the paper's hyperparameters as defaults):

* **attention received** by token ``c`` in head ``(l, h)``: the column sum ``Σ_r A^(r,c)``
  (eq. 4 literally sums over the rows of a softmax, which is 1 for every row; eq. 6 and
  METHODS read it as the column sum).
* **most attended token** of a query ``t_i``: the argmax over ``c`` of the column sums of
  the head- and layer-averaged map ``(1/LH) Σ_l Σ_h A_(l,h)``; **predominance** ``P`` of a
  fact: the largest share of its queries whose most attended token is the same token
  (tokens compared by their text with surrounding whitespace stripped, so ``" Brazil"``
  and ``"Brazil"`` agree). Reported with and without the first position (BOS / sink).
* **knowledge synapses** ``S = {(c, l, h) : Σ_r A_(l,h)^(r,c) > τ}`` with
  ``τ = α · (1/(L·H)) Σ_l Σ_h Σ_r Σ_c A_(l,h)^(r,c)``, ``α = 0.3``.
* **manipulation**: the post-softmax weights of column ``c`` in head ``(l, h)`` are
  multiplied by a factor (× 0 suppresses, × 2 enhances), in every query row of the
  forward pass (``rows="all"``, the default) or only in the last one; rows are not
  renormalized (the paper scales "attention scores", nothing more). Synapses of another
  prompt are clipped to the current prompt's length.
* **ΔValue** = ± (V̄_after − V̄_before) / |V̄_before|, V̄ the mean activation of the query's
  knowledge neurons at the last position; **ΔProb** = ± (P_after − P_before) / P_before,
  P the probability of the gold answer's first token. The sign is "−" for a suppression
  (factor < 1), so that a drop counts as a positive effect (as METHODS §4). The absolute
  value in ΔValue's denominator keeps the sign meaningful when V̄_before < 0 (gated MLPs
  have signed activations); for V̄_before > 0 it is the paper's formula.

How attention is intercepted
----------------------------
In transformers 5 every supported attention module (GPT-2, LLaMA family, Gemma 3,
GPT-NeoX) computes q/k/v itself and then calls ``attention_interface(self, q, k, v, mask,
...)``, where ``attention_interface`` is the module-level function
``eager_attention_forward`` of its modeling file when ``config._attn_implementation ==
"eager"`` (looked up *at call time* as the default of ``ALL_ATTENTION_FUNCTIONS.get_interface``).
That function returns ``(attn_output, attn_weights)`` with ``attn_output = (A @ V)``
transposed to ``[batch, q, heads, head_dim]`` and ``A`` the post-softmax weights
``[batch, heads, q, k]``.

We wrap that function, in the namespace the module's ``forward`` resolves it from, for the
duration of a scope (reference-counted, restored on exit, also on error). The wrapper runs
the original eager function unchanged, then, only for attention modules registered by an
active scope of *this* model: records the weights, and/or rewrites the output as
``out + ((A' − A) @ V)``, where ``A'`` has the selected columns scaled. Because the
architecture's own eager code still does everything up to the softmax (scaling, Gemma's
soft-capping, sliding-window and causal masks, GQA), the only assumption is that its
output is ``A @ V`` — which the wrapper verifies on every manipulated call (a mismatch raises
:class:`~knowloc.errors.ModelError`). A factor of 1 gives ``A' − A = 0`` and leaves the
output bit-for-bit unchanged.

Alternatives considered: registering a custom implementation in ``AttentionInterface``
changes ``config._attn_implementation`` away from ``"eager"``, which switches off mask
creation in ``masking_utils`` (custom names get no mask) and other ``== "eager"`` branches
(GPT-2's upcast path); replacing the modules' ``forward`` would copy each architecture's
q/k/v code; scaling value vectors is equivalent only without grouped-query attention.

A forward pre/post hook pair on each hooked attention module checks that the wrapper
actually ran during that module's call; if not (an implementation switched inside the
scope, GPT-2's ``reorder_and_upcast_attn`` path, an unknown module), the forward raises
instead of silently doing nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import ConfigError, KnowlocError, ModelError
from .models import Model

log = logging.getLogger(__name__)

__all__ = [
    "ALPHA",
    "AttentionImplementationError",
    "AttentionMap",
    "Predominance",
    "SynapseEffect",
    "SynapseSet",
    "activation_matrix",
    "attention_implementation",
    "attention_map",
    "eager_attention",
    "heatmap_frame",
    "knowledge_synapses",
    "mean_activation",
    "most_attended",
    "predominance",
    "predominance_both",
    "received_attention",
    "record_attention",
    "scale_attention",
    "signed_relative_change",
    "synapse_effect",
    "synapse_experiment",
]

#: α of eq. 5 (paper A.1: "τ = 0.3", meaning the scaling factor).
ALPHA = 0.3

Rows = Literal["all", "last"]
Synapse = tuple[int, int, int]  # (position c, layer l, head h)

_HOOKED_NAME = "eager_attention_forward"


class AttentionImplementationError(KnowlocError):
    """Attention weights were read or changed while the model runs a fused attention kernel
    (sdpa, flash, flex), which never materializes them. Use ``with eager_attention(model):``."""


# =============================================================== implementation switch
def attention_implementation(model: Model) -> str | None:
    """The attention implementation the model runs now (``"eager"``, ``"sdpa"``, ...)."""
    return getattr(model.config, "_attn_implementation", None)


@contextlib.contextmanager
def eager_attention(model: Model) -> Iterator[Model]:
    """Run the model with eager attention inside the block, then restore what it was.

    Uses ``PreTrainedModel.set_attn_implementation`` (transformers 5). Logits under eager
    and sdpa agree to float rounding (~1e-6 in float32), not bit-for-bit, so compare
    before/after quantities computed inside the same block.
    """
    previous = attention_implementation(model)
    if previous == "eager":
        yield model
        return
    setter = getattr(model.hf, "set_attn_implementation", None)
    if setter is None:
        raise AttentionImplementationError(
            f"cannot switch {model.name!r} to eager attention (no set_attn_implementation); "
            "load it with attn_implementation='eager'"
        )
    try:
        setter("eager")
    except Exception as exc:
        raise AttentionImplementationError(
            f"cannot switch {model.name!r} from {previous!r} to eager attention: {exc}; "
            "load it with attn_implementation='eager'"
        ) from exc
    if attention_implementation(model) != "eager":
        with contextlib.suppress(Exception):
            setter(previous)
        raise AttentionImplementationError(
            f"{model.name!r} refused to switch from {previous!r} to eager attention; "
            "load it with attn_implementation='eager'"
        )
    log.debug("%s: attention %s -> eager", model.name, previous)
    try:
        yield model
    finally:
        setter(previous)
        log.debug("%s: attention eager -> %s", model.name, previous)


def _require_eager(model: Model, what: str) -> None:
    impls = {attention_implementation(model)}
    for layer in range(model.n_layers):
        cfg = getattr(model.attention(layer), "config", None)
        if cfg is not None:
            impls.add(getattr(cfg, "_attn_implementation", None))
    if impls != {"eager"}:
        raise AttentionImplementationError(
            f"cannot {what}: {model.name!r} runs attention implementation "
            f"{', '.join(sorted(map(str, impls)))}, a fused kernel that never materializes the "
            "attention weights; wrap the call in `with knowloc.attention.eager_attention(model):` "
            "(or load the model with attn_implementation='eager')"
        )


# ==================================================================== interception
class _Interceptor:
    """One scope's business with one attention module: observe and/or modify."""

    modifies = False

    def __init__(self, layer: int):
        self.layer = layer
        self.fired = False

    def __call__(self, module: nn.Module, value: torch.Tensor, out: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class _Patch:
    def __init__(self, namespace: dict[str, Any]):
        self.namespace = namespace
        self.original: Callable = namespace[_HOOKED_NAME]
        self.count = 0

        original = self.original

        def knowloc_eager_attention_forward(module, query, key, value, attention_mask,
                                            *args, **kwargs):
            out, weights = original(module, query, key, value, attention_mask, *args, **kwargs)
            entries = _INTERCEPTORS.get(module)
            if entries:
                if weights is None:
                    raise AttentionImplementationError(
                        f"the eager attention of {type(module).__name__} returned no weights"
                    )
                # modifiers first, so that observers see the weights the model really used
                for entry in sorted(entries, key=lambda e: not e.modifies):
                    out, weights = entry(module, value, out, weights)
                    entry.fired = True
            return out, weights

        knowloc_eager_attention_forward.__wrapped__ = original  # type: ignore[attr-defined]
        self.wrapper = knowloc_eager_attention_forward


_LOCK = threading.RLock()
_PATCHES: dict[int, _Patch] = {}
_INTERCEPTORS: dict[nn.Module, list[_Interceptor]] = {}


def _namespace_of(module: nn.Module) -> dict[str, Any]:
    """The globals that ``module.forward`` resolves ``eager_attention_forward`` from."""
    fwd = inspect.unwrap(type(module).forward)
    ns = getattr(fwd, "__globals__", None)
    if ns is None or _HOOKED_NAME not in ns:
        raise ModelError(
            f"cannot hook the eager attention of {type(module).__name__}: its forward does not "
            f"call a module-level {_HOOKED_NAME} (knowloc supports the attention modules of "
            "GPT-2, the LLaMA family, Gemma 3 and GPT-NeoX in transformers 5)"
        )
    return ns


def _acquire(ns: dict[str, Any]) -> None:
    patch = _PATCHES.get(id(ns))
    if patch is None:
        patch = _Patch(ns)
        _PATCHES[id(ns)] = patch
        ns[_HOOKED_NAME] = patch.wrapper
    patch.count += 1


def _release(ns: dict[str, Any]) -> None:
    patch = _PATCHES.get(id(ns))
    if patch is None:
        return
    patch.count -= 1
    if patch.count <= 0:
        ns[_HOOKED_NAME] = patch.original
        del _PATCHES[id(ns)]


@contextlib.contextmanager
def _intercept(model: Model, interceptors: dict[int, _Interceptor], what: str) -> Iterator[None]:
    _require_eager(model, what)
    done: list[tuple[nn.Module, _Interceptor, dict[str, Any]]] = []
    handles: list[Any] = []
    try:
        with _LOCK:
            for layer, entry in interceptors.items():
                module = model.attention(layer)
                ns = _namespace_of(module)
                _acquire(ns)
                _INTERCEPTORS.setdefault(module, []).append(entry)
                done.append((module, entry, ns))

                def pre(mod, args, _e=entry):
                    _e.fired = False

                def post(mod, args, output, _e=entry, _l=layer):
                    if not _e.fired:
                        raise AttentionImplementationError(
                            f"attention of layer {_l} ({type(mod).__name__}) did not go through "
                            f"eager attention (implementation now "
                            f"{getattr(getattr(mod, 'config', None), '_attn_implementation', '?')!r}"
                            "); its weights were neither read nor changed. Keep the model in "
                            "eager attention for the whole block"
                        )

                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
        yield
    finally:
        with _LOCK:
            for h in handles:
                h.remove()
            for module, entry, ns in done:
                lst = _INTERCEPTORS.get(module, [])
                if entry in lst:
                    lst.remove(entry)
                if not lst:
                    _INTERCEPTORS.pop(module, None)
                _release(ns)


# ========================================================================== capture
class _Recorder(_Interceptor):
    def __init__(self, layer: int, rows: Rows, store: dict[int, torch.Tensor]):
        super().__init__(layer)
        self.rows = rows
        self.store = store

    def __call__(self, module, value, out, weights):
        w = weights[:, :, -1:, :] if self.rows == "last" else weights
        self.store[self.layer] = w.detach().float().cpu()
        return out, weights


def _check_rows(rows: str) -> None:
    if rows not in ("all", "last"):
        raise ConfigError(f"rows must be 'all' or 'last' (got {rows!r})")


@contextlib.contextmanager
def record_attention(
    model: Model, *, rows: Rows = "all", layers: Sequence[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Record post-softmax attention weights of each forward pass inside the block.

    Yields a dict ``layer -> [batch, heads, rows, keys]`` (float32, CPU), overwritten by each
    forward. ``rows="last"`` keeps only the last query position. Requires eager attention.
    """
    _check_rows(rows)
    store: dict[int, torch.Tensor] = {}
    layers = range(model.n_layers) if layers is None else layers
    with _intercept(model, {l: _Recorder(l, rows, store) for l in layers}, "read attention weights"):
        yield store


@dataclass(frozen=True)
class AttentionMap:
    """Post-softmax attention of one prompt: ``weights[layer, head, row, column]``.

    ``rows == "all"``: every query position (R = C); ``"last"``: only the last (R = 1).
    ``tokens[c]`` is the text of the token at position ``c`` (used to compare queries).
    """

    weights: torch.Tensor
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...] = ()
    rows: str = "all"
    prompt: str | None = None
    query_id: str | None = None
    fact_id: str | None = None

    def __post_init__(self) -> None:
        if self.weights.ndim != 4:
            raise ConfigError(
                f"attention weights must be [layers, heads, rows, columns] (got {tuple(self.weights.shape)})"
            )
        if self.token_ids and len(self.token_ids) != self.weights.shape[-1]:
            raise ConfigError(
                f"{len(self.token_ids)} token ids for {self.weights.shape[-1]} attention columns"
            )
        if self.tokens and len(self.tokens) != self.weights.shape[-1]:
            raise ConfigError(f"{len(self.tokens)} tokens for {self.weights.shape[-1]} attention columns")

    @property
    def n_layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.weights.shape[1])

    @property
    def n_positions(self) -> int:
        return int(self.weights.shape[-1])

    def received(self) -> torch.Tensor:
        """[layers, heads, columns]: attention each token receives, Σ_r A^(r,c)."""
        return received_attention(self.weights)

    def token_key(self, position: int) -> str | int:
        """What identifies the token at ``position`` across queries: its stripped text, else
        its id."""
        if self.tokens:
            return _normalize_token(self.tokens[position])
        if self.token_ids:
            return int(self.token_ids[position])
        return position


def _normalize_token(text: str) -> str:
    return text.replace("\u2581", " ").replace("\u0120", " ").strip()


def _ids(model: Model, prompt: str | Sequence[int]) -> list[int]:
    return model.encode_prompt(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]


@torch.no_grad()
def attention_map(
    model: Model,
    prompt: str | Sequence[int],
    *,
    rows: Rows = "all",
    query_id: str | None = None,
    fact_id: str | None = None,
) -> AttentionMap:
    """Attention weights of every layer and head for one prompt (one forward pass).

    Switches the model to eager attention for the pass (and back).
    """
    _check_rows(rows)
    ids = _ids(model, prompt)
    x = torch.tensor([ids], device=model.device)
    with eager_attention(model), record_attention(model, rows=rows) as store:
        model.base_model()(input_ids=x, use_cache=False)
    weights = torch.stack([store[l][0] for l in range(model.n_layers)])
    tokens = tuple(model.tokenizer.decode([i]) for i in ids)
    return AttentionMap(
        weights=weights,
        token_ids=tuple(ids),
        tokens=tokens,
        rows=rows,
        prompt=prompt if isinstance(prompt, str) else None,
        query_id=query_id,
        fact_id=fact_id,
    )


# ===================================================================== predominance
def _weights(x: AttentionMap | torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, AttentionMap):
        return x.weights
    t = torch.as_tensor(x)
    return t.float() if not t.is_floating_point() else t


def received_attention(weights: AttentionMap | torch.Tensor | np.ndarray) -> torch.Tensor:
    """Column sums Σ_r A^(r,c) over the row axis (second to last): ``[..., columns]``."""
    return _weights(weights).sum(-2)


def most_attended(
    weights: AttentionMap | torch.Tensor | np.ndarray, *, skip_first: bool = False
) -> int | None:
    """The position ``c`` of the most attended token (eq. 4): argmax of the column sums of
    the map averaged over layers and heads. ``weights`` is ``[L, H, R, C]`` (or ``[R, C]``).
    ``skip_first`` leaves out position 0 (BOS / attention sink). Ties go to the earlier
    position. None when there is no candidate (one-token prompt with ``skip_first``)."""
    w = _weights(weights)
    if w.ndim == 4:
        w = w.mean(dim=(0, 1))
    elif w.ndim != 2:
        raise ConfigError(f"expected [L, H, R, C] or [R, C] attention weights, got {tuple(w.shape)}")
    col = w.sum(0)
    start = 1 if skip_first else 0
    if col.numel() <= start:
        return None
    return start + int(torch.argmax(col[start:]))


@dataclass(frozen=True)
class Predominance:
    """Predominance score P of one fact (eq. 4) and what it was computed from."""

    score: float  # max_t share of queries whose most attended token is t (NaN: no queries)
    token: str | int | None  # the winning token t (first of equal counts, in query order)
    positions: tuple[int | None, ...]  # most attended position per query
    tokens: tuple[str | int | None, ...]  # its token key per query
    skip_first: bool
    n_queries: int  # queries that had a candidate position

    def as_dict(self) -> dict[str, Any]:
        return {
            "P": self.score,
            "token": None if self.token is None else str(self.token),
            "skip_first": self.skip_first,
            "n_queries": self.n_queries,
        }


def predominance(maps: Sequence[AttentionMap], *, skip_first: bool = False) -> Predominance:
    """Predominance P of a fact from the attention maps of its queries (eq. 4, METHODS §5).

    For each query, the most attended token t_i (:func:`most_attended`); P is the largest
    share of queries sharing one token. Tokens are compared by :meth:`AttentionMap.token_key`
    (stripped text). Queries with no candidate (one token and ``skip_first``) are left out.
    """
    positions = tuple(most_attended(m, skip_first=skip_first) for m in maps)
    keys = tuple(None if p is None else m.token_key(p) for m, p in zip(maps, positions))
    valid = [k for k in keys if k is not None]
    if not valid:
        return Predominance(math.nan, None, positions, keys, skip_first, 0)
    counts: dict[Any, int] = {}
    for k in valid:
        counts[k] = counts.get(k, 0) + 1
    best = max(counts.values())
    token = next(k for k in valid if counts[k] == best)
    return Predominance(best / len(valid), token, positions, keys, skip_first, len(valid))


def predominance_both(maps: Sequence[AttentionMap]) -> dict[str, Predominance]:
    """P with and without the first position: ``{"with_first": ..., "without_first": ...}``."""
    return {
        "with_first": predominance(maps, skip_first=False),
        "without_first": predominance(maps, skip_first=True),
    }


# ============================================================================ synapses
@dataclass(frozen=True)
class SynapseSet:
    """Knowledge synapses of one query: ``(position, layer, head)`` triples (eq. 6)."""

    synapses: frozenset[Synapse]
    n_positions: int
    n_layers: int
    n_heads: int
    alpha: float = ALPHA
    tau: float = math.nan
    rows: str = "all"
    prompt: str | None = None
    query_id: str | None = None
    fact_id: str | None = None

    def __len__(self) -> int:
        return len(self.synapses)

    def __iter__(self) -> Iterator[Synapse]:
        return iter(sorted(self.synapses, key=lambda s: (s[1], s[2], s[0])))

    def __contains__(self, s: object) -> bool:
        return s in self.synapses

    def clip(self, n_positions: int) -> SynapseSet:
        """The synapses at positions < ``n_positions`` (another prompt's length)."""
        kept = frozenset(s for s in self.synapses if s[0] < n_positions)
        return SynapseSet(kept, min(self.n_positions, n_positions), self.n_layers, self.n_heads,
                          self.alpha, self.tau, self.rows, self.prompt, self.query_id, self.fact_id)

    def by_layer(self) -> dict[int, dict[int, list[int]]]:
        """``layer -> head -> sorted positions``."""
        out: dict[int, dict[int, list[int]]] = {}
        for c, l, h in self:
            out.setdefault(l, {}).setdefault(h, []).append(c)
        return out

    def to_frame(self) -> pd.DataFrame:
        rows = list(self)
        return pd.DataFrame(
            {
                "position": np.array([s[0] for s in rows], dtype=np.int32),
                "layer": np.array([s[1] for s in rows], dtype=np.int32),
                "head": np.array([s[2] for s in rows], dtype=np.int32),
            }
        )


def knowledge_synapses(
    attention: AttentionMap | torch.Tensor | np.ndarray,
    *,
    alpha: float = ALPHA,
    exclude_first: bool = False,
) -> SynapseSet:
    """Knowledge synapses (eqs. 5-6): ``{(c, l, h) : Σ_r A_(l,h)^(r,c) > τ}`` with
    ``τ = α · (1/(L·H)) Σ_l Σ_h Σ_r Σ_c A_(l,h)^(r,c)``.

    ``attention`` is an :class:`AttentionMap` or a ``[L, H, R, C]`` tensor. With every row of
    a causal softmax summing to 1, τ = α · R (α · 1 for ``rows="last"``).

    ``exclude_first`` drops the synapses at position 0 (BOS / attention sink; τ unchanged).
    In models with a sink, column 0 receives most of every head's attention, so the
    definition puts one synapse at position 0 in nearly every head (Gemma 3 270M: ~72 of
    ~73 per query) and suppressing them disables attention wholesale, for any prompt.
    """
    if not alpha >= 0:
        raise ConfigError(f"alpha must be >= 0 (got {alpha})")
    w = _weights(attention).double()
    if w.ndim != 4:
        raise ConfigError(f"expected [L, H, R, C] attention weights, got {tuple(w.shape)}")
    L, H, _, C = w.shape
    tau = alpha * float(w.sum(dim=(2, 3)).mean())
    col = w.sum(2)  # [L, H, C]
    idx = torch.nonzero(col > tau, as_tuple=False)
    syn = frozenset((int(c), int(l), int(h)) for l, h, c in idx.tolist() if not (exclude_first and c == 0))
    meta: dict[str, Any] = {}
    if isinstance(attention, AttentionMap):
        meta = {"rows": attention.rows, "prompt": attention.prompt, "query_id": attention.query_id,
                    "fact_id": attention.fact_id}
    return SynapseSet(syn, C, L, H, alpha=alpha, tau=tau, **meta)


# ======================================================================== manipulation
class _Scaler(_Interceptor):
    modifies = True

    def __init__(self, layer: int, heads: dict[int, list[int]], factor: float, rows: Rows):
        super().__init__(layer)
        self.heads = heads
        self.factor = float(factor)
        self.rows = rows
        self.n_applied = 0

    def __call__(self, module, value, out, weights):
        k = weights.shape[-1]
        plan = {h: [c for c in cs if c < k] for h, cs in self.heads.items()}
        plan = {h: cs for h, cs in plan.items() if cs}
        if not plan or self.factor == 1.0:
            return out, weights
        b, n_heads, q, _ = weights.shape
        if value.ndim != 4 or value.shape[-2] != k or n_heads % value.shape[1]:
            raise ModelError(
                f"unexpected value shape {tuple(value.shape)} for attention weights "
                f"{tuple(weights.shape)} in {type(module).__name__}"
            )
        if out.shape[:3] != (b, q, n_heads):
            raise ModelError(
                f"unexpected eager attention output {tuple(out.shape)} (expected [batch={b}, "
                f"q={q}, heads={n_heads}, head_dim]) in {type(module).__name__}"
            )
        n_rep = n_heads // value.shape[1]
        # the hook point's one assumption: the eager output is A @ V (checked, in float32)
        vals = value.float()
        recon = torch.matmul(weights.float(), vals.repeat_interleave(n_rep, dim=1)).transpose(1, 2)
        scale = max(1.0, float(out.detach().float().abs().max()))
        tol = 100 * torch.finfo(out.dtype).eps * scale
        err = float((recon - out.float()).abs().max())
        if err > tol:
            raise ModelError(
                f"the eager attention of {type(module).__name__} is not softmax(QK)V (|A V - out| "
                f"= {err:.3g}); knowloc cannot scale its attention weights"
            )
        r = slice(None) if self.rows == "all" else slice(q - 1, q)
        new_w = weights.clone()
        delta = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for h, cs in plan.items():
            cols = torch.tensor(cs, device=weights.device)
            a = weights[:, h, r, :].index_select(-1, cols).float()  # [b, rows, n_c]
            v = vals[:, h // n_rep].index_select(-2, cols)  # [b, n_c, d]
            delta[:, r, h, :] += torch.matmul((self.factor - 1.0) * a, v)
            new_w[:, h, r, cs] = (weights[:, h, r, cs].float() * self.factor).to(weights.dtype)
            self.n_applied += len(cs)
        return (out.float() + delta).to(out.dtype), new_w


def _as_triples(synapses: SynapseSet | Iterable[Synapse]) -> list[Synapse]:
    out = []
    for s in synapses:
        if len(s) != 3:
            raise ConfigError(f"a synapse is (position, layer, head); got {s!r}")
        out.append((int(s[0]), int(s[1]), int(s[2])))
    return out


@contextlib.contextmanager
def scale_attention(
    model: Model,
    synapses: SynapseSet | Iterable[Synapse],
    factor: float,
    *,
    rows: Rows = "all",
) -> Iterator[None]:
    """Multiply the post-softmax attention weights of column ``c`` in head ``(l, h)`` by
    ``factor`` for every synapse ``(c, l, h)``, in every forward pass inside the block.

    ``factor = 0`` suppresses (removes exactly that key's contribution to the head's output),
    ``2`` enhances; rows are not renormalized. Positions beyond a prompt's length are
    skipped (synapses of an unrelated, longer query are clipped). ``rows="last"`` touches
    only the last query row. Requires eager attention (see :func:`eager_attention`);
    restored on exit, also on error. Positions are absolute key positions: use unpadded
    (or right-padded) inputs.
    """
    _check_rows(rows)
    if not math.isfinite(float(factor)):
        raise ConfigError(f"factor must be finite (got {factor})")
    triples = _as_triples(synapses)
    n_heads = int(getattr(model.config, "num_attention_heads", 0) or getattr(model.config, "n_head", 0))
    plan: dict[int, dict[int, list[int]]] = {}
    for c, l, h in triples:
        if not 0 <= l < model.n_layers:
            raise ConfigError(f"synapse layer {l} out of range (model has {model.n_layers} layers)")
        if c < 0 or h < 0 or (n_heads and h >= n_heads):
            raise ConfigError(f"synapse {(c, l, h)} out of range ({n_heads} heads)")
        plan.setdefault(l, {}).setdefault(h, []).append(c)
    for heads in plan.values():
        for h in heads:
            heads[h] = sorted(set(heads[h]))
    interceptors = {l: _Scaler(l, heads, factor, rows) for l, heads in plan.items()}
    if not interceptors:
        _require_eager(model, "scale attention weights")
        yield
        return
    with _intercept(model, interceptors, "scale attention weights"):  # type: ignore[arg-type]
        yield


# ============================================================================= metrics
@torch.no_grad()
def _acts_and_probs(model: Model, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([L, D] activations at the last position, [vocab] next-token probabilities), float32."""
    x = torch.tensor([list(ids)], device=model.device)
    acts = torch.empty(model.n_layers, model.d_mlp, dtype=torch.float32)

    def grab(layer, h):
        acts[layer] = h[0, -1].detach().float().cpu()
        return h

    with model.hook_activations(grab):
        logits = model.hf(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    return acts, torch.softmax(logits, -1).cpu()


def mean_activation(acts: torch.Tensor, neurons: Iterable[tuple[int, int]]) -> float:
    """Mean of ``acts[layer, neuron]`` over ``neurons`` (NaN for an empty set)."""
    idx = list(neurons)
    if not idx:
        return math.nan
    ls = torch.tensor([n[0] for n in idx])
    ps = torch.tensor([n[1] for n in idx])
    return float(acts[ls, ps].double().mean())


def signed_relative_change(before: float, after: float, factor: float) -> float:
    """± (after − before) / |before|, "−" for a suppression (factor < 1)."""
    if before == 0 or not math.isfinite(before) or not math.isfinite(after):
        return math.nan
    sign = -1.0 if factor < 1 else 1.0
    return sign * (after - before) / abs(before)


@dataclass(frozen=True)
class SynapseEffect:
    """Effect of one synapse manipulation on one query (METHODS §5)."""

    factor: float
    n_synapses: int  # applied (after clipping to the prompt length)
    n_clipped: int  # dropped by clipping
    n_neurons: int
    value_before: float
    value_after: float
    prob_before: float
    prob_after: float
    delta_value: float
    delta_prob: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def synapse_effect(
    model: Model,
    prompt: str | Sequence[int],
    answer: str | int,
    synapses: SynapseSet | Iterable[Synapse],
    factor: float,
    neurons: Iterable[tuple[int, int]],
    *,
    rows: Rows = "all",
) -> SynapseEffect:
    """ΔValue and ΔProb of scaling ``synapses`` by ``factor`` for one query.

    ``answer``: the gold answer text (its first token is the target) or a token id.
    ``neurons``: the query's knowledge neurons. Both runs happen under eager attention.
    """
    ids = _ids(model, prompt)
    if isinstance(answer, str):
        if not isinstance(prompt, str):
            raise ConfigError("give the answer as a token id when the prompt is token ids")
        target = model.target_id(prompt, answer)
    else:
        target = int(answer)
    triples = _as_triples(synapses)
    kept = [s for s in triples if s[0] < len(ids)]
    kns = list(neurons)
    with eager_attention(model):
        acts_b, probs_b = _acts_and_probs(model, ids)
        with scale_attention(model, kept, factor, rows=rows):
            acts_a, probs_a = _acts_and_probs(model, ids)
    vb, va = mean_activation(acts_b, kns), mean_activation(acts_a, kns)
    pb, pa = float(probs_b[target]), float(probs_a[target])
    return SynapseEffect(
        factor=float(factor),
        n_synapses=len(kept),
        n_clipped=len(triples) - len(kept),
        n_neurons=len(kns),
        value_before=vb,
        value_after=va,
        prob_before=pb,
        prob_after=pa,
        delta_value=signed_relative_change(vb, va, factor),
        delta_prob=signed_relative_change(pb, pa, factor),
    )


def synapse_experiment(
    model: Model,
    prompt: str,
    answer: str,
    neurons: Iterable[tuple[int, int]],
    own: SynapseSet,
    irrelevant: SynapseSet | None = None,
    *,
    factors: dict[str, float] | None = None,
    rows: Rows = "all",
) -> pd.DataFrame:
    """The Figure 6 rows for one query: for ``synapses`` in (self, irrelevant) and
    ``operation`` in (sup × 0, enh × 2), its ΔValue and ΔProb (one row each).

    Columns: ``synapses, operation, factor, n_synapses, n_clipped, n_neurons, value_before,
    value_after, prob_before, prob_after, delta_value, delta_prob``.
    """
    factors = factors or {"sup": 0.0, "enh": 2.0}
    kns = list(neurons)
    sets = {"self": own} if irrelevant is None else {"self": own, "irrelevant": irrelevant}
    records = []
    for name, syn in sets.items():
        for op, f in factors.items():
            eff = synapse_effect(model, prompt, answer, syn, f, kns, rows=rows)
            records.append({"synapses": name, "operation": op, **eff.as_dict()})
    return pd.DataFrame.from_records(records)


# ============================================================================ heatmaps
@torch.no_grad()
def activation_matrix(
    model: Model,
    prompt: str | Sequence[int],
    *,
    synapses: SynapseSet | Iterable[Synapse] | None = None,
    factor: float = 1.0,
    rows: Rows = "all",
) -> torch.Tensor:
    """[layers, d_mlp] neuron activations at the last position (float32, CPU), optionally
    with ``synapses`` scaled by ``factor`` (under eager attention)."""
    ids = _ids(model, prompt)
    with eager_attention(model):
        if synapses is None:
            acts, _ = _acts_and_probs(model, ids)
        else:
            with scale_attention(model, [s for s in _as_triples(synapses) if s[0] < len(ids)],
                                 factor, rows=rows):
                acts, _ = _acts_and_probs(model, ids)
    return acts


CONDITIONS: dict[str, float] = {"none": 1.0, "suppress": 0.0, "enhance": 2.0}


def heatmap_frame(
    model: Model,
    prompts: Sequence[str],
    synapses: Sequence[SynapseSet | None] | None = None,
    *,
    conditions: Sequence[str] = ("none",),
    neurons: Sequence[int] | slice | None = None,
    labels: Sequence[str] | None = None,
    rows: Rows = "all",
) -> pd.DataFrame:
    """Layer × neuron activation matrices (Figures 1, 7, 10) as a long table.

    For each prompt and condition (``none``: as is; ``suppress``: its synapses × 0;
    ``enhance``: × 2), the last-position activations of every layer. ``synapses[i]`` are
    prompt i's synapses (computed from its attention when None or not given).
    ``neurons`` restricts the neuron axis (a slice or indices) to keep the table small.

    Columns: ``query`` (label), ``prompt``, ``condition``, ``layer``, ``neuron``,
    ``activation``.
    """
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        raise ConfigError(f"unknown heatmap condition(s) {bad}; choose from {list(CONDITIONS)}")
    labels = list(labels) if labels is not None else [f"q{i + 1}" for i in range(len(prompts))]
    if len(labels) != len(prompts) or (synapses is not None and len(synapses) != len(prompts)):
        raise ConfigError("prompts, labels and synapses must have the same length")
    cols = np.arange(model.d_mlp)
    if neurons is not None:
        cols = cols[neurons] if isinstance(neurons, slice) else np.asarray(list(neurons), dtype=np.int64)
    frames = []
    for i, prompt in enumerate(prompts):
        syn = synapses[i] if synapses is not None else None
        if syn is None and any(c != "none" for c in conditions):
            syn = knowledge_synapses(attention_map(model, prompt, rows=rows))
        for cond in conditions:
            factor = CONDITIONS[cond]
            acts = activation_matrix(model, prompt, synapses=None if cond == "none" else syn,
                                     factor=factor, rows=rows)
            sub = acts[:, torch.as_tensor(cols)].numpy()
            L = sub.shape[0]
            frames.append(
                pd.DataFrame(
                    {
                        "query": labels[i],
                        "prompt": prompt,
                        "condition": cond,
                        "layer": np.repeat(np.arange(L, dtype=np.int32), len(cols)),
                        "neuron": np.tile(cols.astype(np.int32), L),
                        "activation": sub.reshape(-1).astype(np.float64),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["query", "prompt", "condition", "layer", "neuron", "activation"]
    )
