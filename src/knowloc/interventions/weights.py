"""Weight edits of knowledge neurons (paper §2.2, eq. 2; METHODS §3).

Weight edits change the *value vectors* of knowledge neurons: the row of the down
projection that neuron (l, p) writes into the residual stream.

* **erase**:  v_lp <- 0
* **update**: v_lp <- v_lp - λ1·E(o) + λ2·E(o′), λ1 = λ2 = 2, E(o) the mean of the
  unembedding rows (the input embeddings when the two are tied) of the target tokens of
  answer o (:meth:`knowloc.models.Model.target_ids`; for a one-token target, that token's
  row), and likewise E(o′) for the new answer o′.

An :class:`Edit` is a value; ``with edit.applied(model): ...`` writes it into the in-memory
weights and restores the saved rows bit-for-bit on exit, also when the body raises. Files on
disk are never opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from ..models import Model
from ..models.forward import prompt_activations
from ..neurons import Neuron, as_neurons, check_neurons, neurons_by_layer

log = logging.getLogger(__name__)

__all__ = ["LAMBDA1", "LAMBDA2", "OPS", "Edit", "activation_signs", "weights_digest"]

OPS: tuple[str, ...] = ("erase", "update")
LAMBDA1 = 2.0
LAMBDA2 = 2.0


@dataclass(frozen=True)
class Edit:
    """A weight edit of the value vectors of a set of knowledge neurons.

    Attributes:
        op: ``"erase"`` or ``"update"``.
        neurons: sorted, de-duplicated ``(layer, neuron)`` pairs.
        target_ids: target tokens of the original answer o (update only).
        new_target_ids: target tokens of the new answer o′ (update only).
        lambda1, lambda2: update weights of E(o) and E(o′) (2 and 2, METHODS §3).
    """

    op: Literal["erase", "update"]
    neurons: tuple[Neuron, ...]
    target_ids: tuple[int, ...] | None = None
    new_target_ids: tuple[int, ...] | None = None
    lambda1: float = LAMBDA1
    lambda2: float = LAMBDA2
    signs: tuple[float, ...] | None = None  # per neuron (sorted order); None: all +1 (paper)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"unknown edit operation {self.op!r}; choose erase or update")
        neurons = as_neurons(self.neurons)
        if self.signs is not None and len(self.signs) != len(neurons):
            raise ConfigError("signs must give one value per (distinct) neuron")
        object.__setattr__(self, "neurons", neurons)
        if self.op == "update" and not (self.target_ids and self.new_target_ids):
            raise ConfigError("an update edit needs target_ids (o) and new_target_ids (o′)")

    # ------------------------------------------------------------------ builders
    @classmethod
    def erase(cls, neurons: Iterable[Sequence[int]]) -> Edit:
        return cls("erase", tuple(neurons))  # type: ignore[arg-type]

    @classmethod
    def update(
        cls,
        neurons: Iterable[Sequence[int]],
        target_ids: int | Sequence[int],
        new_target_ids: int | Sequence[int],
        *,
        lambda1: float = LAMBDA1,
        lambda2: float = LAMBDA2,
        signs: dict[Neuron, float] | None = None,
    ) -> Edit:
        """v <- v - λ1 E(o) + λ2 E(o′) (paper eq. 2), E the mean unembedding row of the
        target tokens (a token id, or the ids of a multi-token target). With ``signs``
        (neuron -> ±1, e.g. from
        :func:`activation_signs`) the change is multiplied by the neuron's sign, so that it
        pushes towards o′ also where the activation that reads the value vector is negative
        (gated MLPs: LLaMA, Gemma); not in the paper."""
        ns = as_neurons(neurons)
        sg = None if signs is None else tuple(float(signs[n]) for n in ns)
        return cls("update", ns, _token_ids(target_ids), _token_ids(new_target_ids),
                   float(lambda1), float(lambda2), sg)

    # ------------------------------------------------------------------ properties
    @property
    def empty(self) -> bool:
        """An edit of no neuron: applying it changes nothing and it is never a success."""
        return len(self.neurons) == 0

    def __len__(self) -> int:
        return len(self.neurons)

    def describe(self) -> str:
        what = "zero" if self.op == "erase" else (
            f"-{self.lambda1:g}E({_ids_text(self.target_ids)}) "
            f"+{self.lambda2:g}E({_ids_text(self.new_target_ids)})")
        return f"{self.op} {len(self.neurons)} value vector(s): {what}"

    # ------------------------------------------------------------------ applying
    @torch.no_grad()
    def _delta(self, model: Model) -> torch.Tensor | None:
        if self.op == "erase":
            return None
        E = model.unembedding_matrix()
        vocab = E.shape[0]
        old, new = self.target_ids or (), self.new_target_ids or ()
        for t in (*old, *new):
            if not 0 <= t < vocab:
                raise ConfigError(f"token id {t} is outside the vocabulary ({vocab})")
        return -self.lambda1 * _mean_row(E, old) + self.lambda2 * _mean_row(E, new)

    @contextlib.contextmanager
    def applied(self, model: Model) -> Iterator[Edit]:
        """Apply the edit to ``model``'s in-memory weights for the ``with`` block.

        The touched value vectors are saved first and written back on exit, also when the
        block raises, so every parameter is bit-for-bit what it was. An empty edit is a no-op.
        """
        check_neurons(model, self.neurons)
        delta = self._delta(model)
        saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        sign_of = dict(zip(self.neurons, self.signs or (1.0,) * len(self.neurons)))
        try:
            with torch.no_grad():
                for layer, idx in neurons_by_layer(self.neurons).items():
                    vv = model.value_vectors(layer)  # view: writes go to the weight
                    index = torch.tensor(idx, device=vv.device, dtype=torch.long)
                    saved.append((vv, index, vv[index].clone()))
                    if self.op == "erase":
                        vv[index] = 0
                    else:
                        sg = torch.tensor([sign_of[(layer, p)] for p in idx],
                                          device=vv.device, dtype=torch.float32)[:, None]
                        rows = vv[index].float() + sg * delta.to(vv.device)  # type: ignore[union-attr]
                        vv[index] = rows.to(vv.dtype)
            yield self
        finally:
            with torch.no_grad():
                for vv, index, rows in reversed(saved):
                    vv[index] = rows


def _token_ids(ids: int | Sequence[int]) -> tuple[int, ...]:
    return (int(ids),) if isinstance(ids, int) else tuple(int(t) for t in ids)


def _ids_text(ids: tuple[int, ...] | None) -> str:
    return ",".join(str(t) for t in ids or ())


def _mean_row(E: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """E(o): the mean of the float32 unembedding rows of ``ids`` (a one-token target's row
    itself, bit for bit)."""
    if len(ids) == 1:
        return E[ids[0]].float()
    return E[list(ids)].float().mean(0)


@torch.no_grad()
def activation_signs(
    model: Model, prompts_ids: Sequence[Sequence[int]], neurons: Iterable[Sequence[int]]
) -> dict[Neuron, float]:
    """Sign (+1/−1; +1 at 0) of each neuron's mean activation at the last position of the
    prompts: the direction in which the neuron reads its value vector."""
    ns = as_neurons(neurons)
    if not ns or not prompts_ids:
        return {n: 1.0 for n in ns}
    acts = torch.stack([prompt_activations(model, list(p)) for p in prompts_ids]).mean(0)
    return {(l, p): (-1.0 if float(acts[l, p]) < 0 else 1.0) for l, p in ns}


def weights_digest(model: Model | torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every parameter and buffer."""
    module = model.hf if isinstance(model, Model) else model
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        data = t.detach().cpu().contiguous().reshape(-1)
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()
