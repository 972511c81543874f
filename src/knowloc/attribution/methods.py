"""Attribution methods: one object per method, registered in one place.

An attribution method is integrated gradients over the neuron activations of one layer at
the last prompt position (METHODS §1)::

    Attr(l, p) = (a_lp - b_lp) * (1/m) * sum_{k=1..m} dP(b_l + (k/m)(a_l - b_l)) / da_lp

summed over the method's baselines ``b`` (one, except SIG's per-token mode), then normalized
over the whole map. A method is therefore its baselines, its normalization and its number
of integration steps ``m`` (the configured ``n_steps``, or a fixed number: ``m = 1`` is
gradient x activation at alpha = 1), plus a name and a label for tables and figures. The sum
above is the paper's rule (right Riemann); ``AttributionConfig.rule`` picks another one
(:mod:`.quadrature`: nodes alpha_k and weights w_k in place of k/m and 1/m).

==========  ===========================================  ==========================
method      baseline b_l (per layer, last position)      normalization of the map
==========  ===========================================  ==========================
``ig``      0                                            none
``sig``     mean over prompt tokens j of the activations   divided by the L2 norm of
            with token j alone replaced by mask/pad/EOS    the whole map (eq. 14)
            (``sig_mode="per_token"``: sum of the per-
            token IGs instead, T times the cost)
``amig``    activations of a same-length prompt whose      divided by the absolute
            non-special tokens are all EOS                 value of the sum over all
                                                           neurons (eq. 18, |sum|)
==========  ===========================================  ==========================

Eq. 18 divides by the raw sum; when that sum is negative the whole map would flip sign and
``Attr > 0.2 max`` would select the neurons that push *against* the answer. knowloc divides
by ``|sum|`` instead, so the sign of every score is that of its contribution and the
knowledge neurons are those with the largest positive contribution. Each method names its
normalization (``normalization``), and :meth:`AttributionConfig.as_dict` records it, so
every run's config (and cache key) says which reading made its maps.

The attributed probability is that of the answer's first token (``target="first"``) or the
teacher-forced probability of the whole answer (``"all"``, :meth:`knowloc.models.Model.target_ids`).

The registry keeps registration order, which is the display order of every table and
figure; everything that lists methods (configuration checks, CLI choices, report order)
asks it at call time, so a method registered later works end to end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..models import TARGETS, Model
from ..models.forward import last_activations
from .head import work_dtype
from .quadrature import DEFAULT_RULE, RULES, Quadrature, quadrature

log = logging.getLogger(__name__)

__all__ = [
    "SIG_MODES",
    "AttributionConfig",
    "AttributionMethod",
    "abs_sum_normalize",
    "amig_baseline",
    "baselines",
    "get_method",
    "l2_normalize",
    "maskable_positions",
    "method_names",
    "normalize",
    "register_method",
    "sig_baseline",
    "sort_methods",
    "unregister_method",
    "zero_baseline",
]

SIG_MODES = ("mean", "per_token")

#: ``(model, prompt ids, config) -> [n_baselines, n_layers, d_mlp]`` (model dtype, device).
BaselineFn = Callable[[Model, Sequence[int], "AttributionConfig"], torch.Tensor]
#: ``(model, prompt ids, config) -> n_baselines`` without computing them.
CountFn = Callable[[Model, Sequence[int], "AttributionConfig"], int]


@dataclass(frozen=True)
class AttributionMethod:
    """One attribution method: what the engine needs to run it and what reports show.

    Attributes:
        name: the identifier used in configs, tables and the CLI (``"ig"``).
        label: the display name (``"IG"``).
        baseline: ``(model, ids, cfg) -> [n_baselines, n_layers, d_mlp]`` baselines.
        normalize: ``scores -> scores`` over the whole ``[n_layers, d_mlp]`` map, or None.
        figure: the paper's figure number of the method's CS2 violin plot, None if not in
            the paper.
        fixed_steps: integration steps ``m`` regardless of the configured ``n_steps`` (1:
            gradient x activation at alpha = 1); None: the configured ``n_steps`` (>= 2).
        options: names of :class:`AttributionConfig` fields the method reads (recorded in
            the config, so they take part in cache keys).
        n_baselines: ``(model, ids, cfg) -> int``, the number of baselines ``baseline``
            returns; None: one.
        normalization: a short name of ``normalize`` recorded in every config (``"l2"``,
            ``"abs_sum"``); None without a normalization.
    """

    name: str
    label: str
    baseline: BaselineFn
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    figure: str | None = None
    fixed_steps: int | None = None
    options: tuple[str, ...] = ()
    n_baselines: CountFn | None = None
    normalization: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier() or self.name.lower() != self.name:
            raise ConfigError(f"an attribution method name is a lower-case identifier "
                              f"(got {self.name!r})")
        if (self.normalize is None) != (self.normalization is None):
            raise ConfigError(f"method {self.name!r}: give normalize and its name "
                              "(normalization) together")
        if self.fixed_steps is not None and self.fixed_steps < 1:
            raise ConfigError(f"fixed_steps must be >= 1 (got {self.fixed_steps!r})")

    def steps(self, cfg: AttributionConfig) -> int:
        """The number of integration steps m of a run with ``cfg``."""
        return self.fixed_steps if self.fixed_steps is not None else cfg.n_steps

    def rule(self, cfg: AttributionConfig) -> str:
        """The integration rule of a run with ``cfg``: the configured one, or the paper's
        right Riemann sum for a method with ``fixed_steps`` (whose points are defined by
        their alphas k / m, e.g. m = 1: gradient x activation at alpha = 1)."""
        return cfg.rule if self.fixed_steps is None else DEFAULT_RULE

    def quadrature(self, cfg: AttributionConfig) -> Quadrature:
        """The nodes and weights of the integral of a run with ``cfg``."""
        return quadrature(self.rule(cfg), self.steps(cfg))

    def count_baselines(self, model: Model, ids: Sequence[int], cfg: AttributionConfig) -> int:
        return 1 if self.n_baselines is None else self.n_baselines(model, ids, cfg)

    def cost(self, model: Model, ids: Sequence[int], cfg: AttributionConfig) -> int:
        """Integration points (layer, baseline, step) of one query: its rows of work."""
        return model.n_layers * self.steps(cfg) * self.count_baselines(model, ids, cfg)


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, AttributionMethod] = {}


def register_method(method: AttributionMethod, *, replace: bool = False) -> AttributionMethod:
    """Add ``method`` to the registry (at the end of the display order). A name that is
    already registered raises :class:`ConfigError` unless ``replace`` (which keeps its place)."""
    if method.name in _REGISTRY and not replace:
        raise ConfigError(f"attribution method {method.name!r} is already registered "
                          "(pass replace=True to replace it)")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> AttributionMethod:
    """Remove a registered method and return it (:class:`ConfigError` if unknown)."""
    method = get_method(name)
    del _REGISTRY[name]
    return method


def method_names() -> tuple[str, ...]:
    """Registered method names in display order (registration order)."""
    return tuple(_REGISTRY)


def get_method(name: str) -> AttributionMethod:
    """The registered method called ``name`` (:class:`ConfigError` listing the choices)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown attribution method {name!r}; choose from "
                          f"{', '.join(method_names())}") from None


def sort_methods(names: Iterable[str]) -> list[str]:
    """``names`` in display order: registered ones first (registration order), then the
    others alphabetically. Duplicates are dropped."""
    given = set(names)
    order = method_names()
    return [m for m in order if m in given] + sorted(given - set(order))


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class AttributionConfig:
    """Everything that determines an attribution result (hashed for caching)."""

    method: str = "ig"
    n_steps: int = 20
    sig_mode: str = "mean"
    target: str = "first"
    rule: str = DEFAULT_RULE

    def validate(self) -> AttributionConfig:
        method = get_method(self.method)
        if method.fixed_steps is None and (
            not isinstance(self.n_steps, int) or isinstance(self.n_steps, bool) or self.n_steps < 2
        ):
            raise ConfigError(
                f"n_steps must be an integer >= 2 for integrated gradients (got {self.n_steps!r}); "
                "the paper uses 20"
            )
        if self.sig_mode not in SIG_MODES:
            raise ConfigError(f"unknown sig_mode {self.sig_mode!r}; choose from {SIG_MODES}")
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        if self.rule not in RULES:
            raise ConfigError(f"unknown integration rule {self.rule!r}; choose from "
                              f"{', '.join(RULES)}")
        return self

    @property
    def spec(self) -> AttributionMethod:
        """The registered method this config runs."""
        return get_method(self.method)

    def as_dict(self) -> dict[str, Any]:
        """What determines the result, for configs and cache keys. The integration rule is
        named only when it is not the paper's (``riemann_right``), so the keys of runs made
        before rules existed stay valid."""
        method = self.spec
        d: dict[str, Any] = {"method": self.method, "n_steps": method.steps(self),
                             "target": self.target}
        if method.rule(self) != DEFAULT_RULE:
            d["rule"] = method.rule(self)
        if method.normalization is not None:
            d["normalization"] = method.normalization
        for option in method.options:
            d[option] = getattr(self, option)
        return d


# -------------------------------------------------------------------------- baselines
def maskable_positions(model: Model, ids: Sequence[int]) -> list[int]:
    """Positions of the prompt's non-special tokens (those SIG masks one at a time)."""
    special = model.special_ids()
    pos = [j for j, t in enumerate(ids) if t not in special]
    return pos or list(range(len(ids)))


def zero_baseline(model: Model, ids: Sequence[int], cfg: AttributionConfig) -> torch.Tensor:
    """One all-zero baseline (IG)."""
    return torch.zeros(1, model.n_layers, model.d_mlp, device=model.device, dtype=model.dtype)


def amig_baseline(model: Model, ids: Sequence[int], cfg: AttributionConfig) -> torch.Tensor:
    """The activations of the same-length prompt whose non-special tokens are all EOS."""
    special = model.special_ids()
    eos = model.eos_id()
    base = torch.tensor([t if t in special else eos for t in ids], device=model.device)
    return last_activations(model, base[None])


def sig_baseline(model: Model, ids: Sequence[int], cfg: AttributionConfig) -> torch.Tensor:
    """The activations with token j alone replaced by the mask token, for every maskable j:
    their mean (``sig_mode="mean"``), or each of them (``"per_token"``)."""
    pos = maskable_positions(model, ids)
    batch = torch.tensor(ids, device=model.device).repeat(len(pos), 1)
    batch[torch.arange(len(pos)), torch.tensor(pos)] = model.mask_id()
    acts = last_activations(model, batch)
    if cfg.sig_mode == "mean":
        return acts.to(work_dtype(model)).mean(0, keepdim=True).to(model.dtype)
    return acts


def _sig_count(model: Model, ids: Sequence[int], cfg: AttributionConfig) -> int:
    return len(maskable_positions(model, ids)) if cfg.sig_mode == "per_token" else 1


def l2_normalize(scores: torch.Tensor) -> torch.Tensor:
    """The map divided by its L2 norm (SIG, eq. 14); an all-zero map stays as it is."""
    n = scores.norm()
    return scores / n if n > 0 else scores


def abs_sum_normalize(scores: torch.Tensor) -> torch.Tensor:
    """The map divided by the absolute value of its sum (AMIG, eq. 18 with ``|sum|``: a
    negative sum does not flip the map's sign); a map summing to 0 stays as it is."""
    s = scores.sum()
    return scores / s.abs() if s != 0 else scores


def baselines(model: Model, ids: Sequence[int], cfg: AttributionConfig) -> torch.Tensor:
    """Baselines ``[n_baselines, n_layers, d_mlp]`` of ``cfg``'s method for one prompt."""
    return cfg.spec.baseline(model, ids, cfg)


def normalize(scores: torch.Tensor, method: str) -> torch.Tensor:
    """The method's normalization of a whole ``[n_layers, d_mlp]`` map."""
    fn = get_method(method).normalize
    return fn(scores) if fn is not None else scores


register_method(AttributionMethod(name="ig", label="IG", baseline=zero_baseline, figure="3"))
register_method(AttributionMethod(name="sig", label="SIG", baseline=sig_baseline,
                                  normalize=l2_normalize, normalization="l2", figure="8",
                                  options=("sig_mode",), n_baselines=_sig_count))
register_method(AttributionMethod(name="amig", label="AMIG", baseline=amig_baseline,
                                  normalize=abs_sum_normalize, normalization="abs_sum",
                                  figure="9"))
