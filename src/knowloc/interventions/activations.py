"""Activation interventions on knowledge neurons (paper §3.1; METHODS §4).

They scale the neurons' activations instead of the weights: ``with intervene(model,
neurons, scale=0.0): ...`` multiplies the down-projection inputs of the given neurons at the
last prompt position (``positions="all"``: every position) by ``scale`` (0 suppresses, 2
enhances). With ``scale=0`` at every position this equals erasing the same neurons' value
vectors (:meth:`knowloc.interventions.weights.Edit.erase`). When answer tokens follow the
prompt in the pass (a teacher-forced multi-token target), the last prompt position is given
explicitly: the answer positions see the change only through attention.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import torch

from ..errors import ConfigError
from ..models import Model
from ..models.forward import answer_scores
from ..neurons import as_neurons, check_neurons, neurons_by_layer

log = logging.getLogger(__name__)

__all__ = ["intervene", "intervention_probs"]


@contextlib.contextmanager
def intervene(
    model: Model,
    neurons: Iterable[Sequence[int]],
    scale: float = 0.0,
    *,
    positions: Literal["last", "all"] = "last",
    last: int | None = None,
) -> Iterator[None]:
    """Multiply the activations of ``neurons`` by ``scale`` while the block runs.

    The neuron is the input of the MLP down projection (METHODS §0); ``positions="last"``
    (default, METHODS §4) scales it at the last prompt position only -- position ``last``
    (0-based), by default the last position of each pass --, ``"all"`` at every position.
    Hooks are removed on exit, also on error. An empty neuron set is a no-op.
    """
    if positions not in ("last", "all"):
        raise ConfigError(f"positions must be 'last' or 'all' (got {positions!r})")
    ns = as_neurons(neurons)
    check_neurons(model, ns)
    groups = {
        layer: torch.tensor(idx, device=model.device, dtype=torch.long)
        for layer, idx in neurons_by_layer(ns).items()
    }
    if not groups:
        yield
        return

    pos = -1 if last is None else int(last)

    def fn(layer: int, h: torch.Tensor) -> torch.Tensor:
        idx = groups[layer]
        h = h.clone()
        if positions == "last":
            h[:, pos, idx] = h[:, pos, idx] * scale
        else:
            h[:, :, idx] = h[:, :, idx] * scale
        return h

    with model.hook_activations(fn, sorted(groups)):
        yield


@torch.no_grad()
def intervention_probs(
    model: Model,
    prompt_ids: Sequence[int],
    variants: Sequence[tuple[Iterable[Sequence[int]], float]],
    target_ids: Sequence[int],
) -> torch.Tensor:
    """Teacher-forced P(``target_ids``) after the prompt, for the plain prompt and every
    intervention variant.

    ``target_ids`` are the answer's target tokens (:meth:`knowloc.models.Model.target_ids`).
    One batched forward pass over prompt + target[:-1]
    (:func:`knowloc.models.forward.answer_scores`): row 0 is unmodified, row ``1 + v`` has
    variant ``v``'s neurons scaled by its factor at the last prompt position (the same as
    :func:`intervene` with ``last=len(prompt_ids) - 1``). Returns ``[1 + len(variants)]``
    float64 probabilities (for a one-token target: its float32 next-token probability).
    """
    n_rows = 1 + len(variants)
    mult: dict[int, torch.Tensor] = {}
    for row, (neurons, scale) in enumerate(variants, start=1):
        ns = as_neurons(neurons)
        check_neurons(model, ns)
        for layer, idx in neurons_by_layer(ns).items():
            if layer not in mult:
                mult[layer] = torch.ones(n_rows, model.d_mlp, device=model.device,
                                         dtype=model.dtype)
            mult[layer][row, idx] = scale

    pos = len(prompt_ids) - 1

    def fn(layer: int, h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, pos, :] = h[:, pos, :] * mult[layer]
        return h

    x = torch.tensor([list(prompt_ids)] * n_rows, device=model.device)
    answers = torch.tensor([[int(t) for t in target_ids]] * n_rows, device=model.device)
    scores = answer_scores(model, x, answers, act_fn=fn if mult else None, layers=sorted(mult))
    return scores.prob
