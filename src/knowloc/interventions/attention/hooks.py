"""The eager switch, and recording and scaling post-softmax attention weights by intercepting
the eager attention function (what the weights mean: :mod:`knowloc.interventions.attention`).

How attention is intercepted
----------------------------
In transformers 5 every supported attention module (GPT-2, LLaMA family, Gemma 3,
GPT-NeoX) computes q/k/v itself and then calls ``attention_interface(self, q, k, v, mask,
...)``, where ``attention_interface`` is the module-level function
``eager_attention_forward`` of its modeling file when the model runs eager attention
(looked up *at call time* as the default of ``ALL_ATTENTION_FUNCTIONS.get_interface``).
That function returns ``(attn_output, attn_weights)`` with ``attn_output = (A @ V)``
transposed to ``[batch, q, heads, head_dim]`` and ``A`` the post-softmax weights
``[batch, heads, q, k]``. (Where that function lives and how the implementation is read
and switched are transformers internals: :mod:`knowloc.models.compat`.)

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
changes the implementation name away from ``"eager"``, which switches off mask creation in
``masking_utils`` (custom names get no mask) and other ``== "eager"`` branches (GPT-2's
upcast path); replacing the modules' ``forward`` would copy each architecture's q/k/v
code; scaling value vectors is equivalent only without grouped-query attention.

A forward pre/post hook pair on each hooked attention module checks that the wrapper
actually ran during that module's call; if not (an implementation switched inside the
scope, GPT-2's ``reorder_and_upcast_attn`` path, an unknown module), the forward raises
instead of silently doing nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, KnowlocError, ModelError
from ...models import Model
from ...models.compat import (
    EAGER_ATTENTION_NAME,
    attn_implementation,
    eager_attention_namespace,
    set_attn_implementation,
)
from ...synapses import Rows, Synapse, SynapseSet, as_synapses, check_rows

log = logging.getLogger(__name__)


class AttentionImplementationError(KnowlocError):
    """Attention weights were read or changed while the model runs a fused attention kernel
    (sdpa, flash, flex), which never materializes them. Use ``with eager_attention(model):``."""


# =============================================================== implementation switch
def attention_implementation(model: Model) -> str | None:
    """The attention implementation the model runs now (``"eager"``, ``"sdpa"``, ...)."""
    return attn_implementation(model.config)


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
    setter = set_attn_implementation(model.hf)
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
            setter(previous)  # type: ignore[arg-type]  # None restores the default
        raise AttentionImplementationError(
            f"{model.name!r} refused to switch from {previous!r} to eager attention; "
            "load it with attn_implementation='eager'"
        )
    log.debug("%s: attention %s -> eager", model.name, previous)
    try:
        yield model
    finally:
        setter(previous)  # type: ignore[arg-type]
        log.debug("%s: attention eager -> %s", model.name, previous)


def _require_eager(model: Model, what: str) -> None:
    impls = {attention_implementation(model)}
    for layer in range(model.n_layers):
        cfg = getattr(model.attention(layer), "config", None)
        if cfg is not None:
            impls.add(attn_implementation(cfg))
    if impls != {"eager"}:
        raise AttentionImplementationError(
            f"cannot {what}: {model.name!r} runs attention implementation "
            f"{', '.join(sorted(map(str, impls)))}, a fused kernel that never materializes the "
            "attention weights; wrap the call in `with knowloc.attention.eager_attention(model):` "
            "(or load the model with attn_implementation='eager')"
        )


# ======================================================================== interception
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
        self.original: Callable = namespace[EAGER_ATTENTION_NAME]
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
    ns = eager_attention_namespace(module)
    if ns is None:
        raise ModelError(
            f"cannot hook the eager attention of {type(module).__name__}: its forward does not "
            f"call a module-level {EAGER_ATTENTION_NAME} (knowloc supports the attention modules "
            "of GPT-2, the LLaMA family, Gemma 3 and GPT-NeoX in transformers 5)"
        )
    return ns


def _acquire(ns: dict[str, Any]) -> None:
    patch = _PATCHES.get(id(ns))
    if patch is None:
        patch = _Patch(ns)
        _PATCHES[id(ns)] = patch
        ns[EAGER_ATTENTION_NAME] = patch.wrapper
    patch.count += 1


def _release(ns: dict[str, Any]) -> None:
    patch = _PATCHES.get(id(ns))
    if patch is None:
        return
    patch.count -= 1
    if patch.count <= 0:
        ns[EAGER_ATTENTION_NAME] = patch.original
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
                            f"{attn_implementation(getattr(mod, 'config', None)) or '?'!r}"
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


# ============================================================================= capture
class _Recorder(_Interceptor):
    def __init__(self, layer: int, rows: Rows, store: dict[int, torch.Tensor]):
        super().__init__(layer)
        self.rows = rows
        self.store = store

    def __call__(self, module, value, out, weights):
        w = weights[:, :, -1:, :] if self.rows == "last" else weights
        self.store[self.layer] = w.detach().float().cpu()
        return out, weights


@contextlib.contextmanager
def record_attention(
    model: Model, *, rows: Rows = "all", layers: Sequence[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Record post-softmax attention weights of each forward pass inside the block.

    Yields a dict ``layer -> [batch, heads, rows, keys]`` (float32, CPU), overwritten by each
    forward. ``rows="last"`` keeps only the last query position. Requires eager attention.
    """
    check_rows(rows)
    store: dict[int, torch.Tensor] = {}
    layers = range(model.n_layers) if layers is None else layers
    with _intercept(model, {l: _Recorder(l, rows, store) for l in layers}, "read attention weights"):
        yield store


# ======================================================================== manipulation
class _Scaler(_Interceptor):
    modifies = True

    def __init__(self, layer: int, heads: dict[int, list[int]], factor: float, rows: Rows,
                 last: int | None = None):
        super().__init__(layer)
        self.heads = heads
        self.factor = float(factor)
        self.rows = rows
        self.last = last
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
        end = q if self.last is None else min(q, self.last + 1)
        r = slice(0, end) if self.rows == "all" else slice(end - 1, end)
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


@contextlib.contextmanager
def scale_attention(
    model: Model,
    synapses: SynapseSet | Iterable[Synapse],
    factor: float,
    *,
    rows: Rows = "all",
    last: int | None = None,
) -> Iterator[None]:
    """Multiply the post-softmax attention weights of column ``c`` in head ``(l, h)`` by
    ``factor`` for every synapse ``(c, l, h)``, in every forward pass inside the block.

    ``factor = 0`` suppresses (removes exactly that key's contribution to the head's output),
    ``2`` enhances; rows are not renormalized. Positions beyond a prompt's length are
    skipped (synapses of an unrelated, longer query are clipped). ``rows="last"`` touches
    only the last query row. ``last``: the last prompt position (0-based) when answer
    tokens follow the prompt in the pass; rows after it are left alone (default: the last
    row of each pass). Requires eager attention (see :func:`eager_attention`);
    restored on exit, also on error. Positions are absolute key positions: use unpadded
    (or right-padded) inputs.
    """
    check_rows(rows)
    if not math.isfinite(float(factor)):
        raise ConfigError(f"factor must be finite (got {factor})")
    triples = as_synapses(synapses)
    n_heads = model.n_heads
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
    interceptors = {l: _Scaler(l, heads, factor, rows, last) for l, heads in plan.items()}
    if not interceptors:
        _require_eager(model, "scale attention weights")
        yield
        return
    with _intercept(model, interceptors, "scale attention weights"):  # type: ignore[arg-type]
        yield
