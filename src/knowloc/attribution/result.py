"""The result of one attribution: :class:`Attribution` (scores, activations, prediction,
configuration, completeness gap), its table and plot views, and its save format."""

from __future__ import annotations

import pickle
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..store.io import atomic_write

__all__ = ["SAVE_FORMAT", "SAVE_VERSION", "Attribution"]


@dataclass
class Attribution:
    """Attribution scores of one query: ``scores[layer, neuron]`` (CPU; float32, or float64
    for a float64 model).

    ``prob`` is the probability of the target (``config["target"]``): the answer tokens
    ``target_ids`` (teacher-forced product; ``target_id`` is the first of them). ``top1``:
    greedy decoding after the prompt reproduces ``target_ids``; ``predicted`` is the greedy
    continuation up to the first token that differs (one token for a one-token target).

    ``completeness_gap`` ``[n_layers]`` (float64) is, per layer l, how far the integral is
    from IG's completeness: ``|sum_p Attr(l, p) - (P(a_l) - P(b_l))| / |P(a_l) - P(b_l)|``
    on the raw (unnormalized) map, b_l the method's baseline (the worst baseline of SIG's
    per-token mode); 0 for the exact integral, so it says when the number of points is too
    small. None for an attribution saved before knowloc computed it.
    """

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
    target_ids: tuple[int, ...] = ()
    completeness_gap: torch.Tensor | None = None

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

    def to_frame(self, *, top: int | None = None, meta: bool = False) -> Any:
        """The map as a pandas DataFrame, one row per MLP neuron: ``layer, neuron,
        attribution, activation`` (float64, exactly ``scores`` and ``activations``), in
        (layer, neuron) order, or the ``top`` highest-scoring neurons, highest first.
        ``df.attrs`` holds what was attributed (prompt, answer, method, prob, top1,
        predicted, target_ids, fact_id, query_id, relation, config); ``meta=True`` also
        puts ``method, fact_id, query_id, prompt, answer`` as first columns, so the frames of
        many attributions concatenate into one table."""
        from .views import attribution_frame

        return attribution_frame(self, top=top, meta=meta)

    def plot(self, threshold: float = 0.2, ax: Any = None) -> Any:
        """A scatter of every neuron's score against its layer with the knowledge-neuron
        line at ``threshold × max`` (:func:`knowloc.knowledge_neurons`); the neurons above
        it are highlighted. Draws into ``ax`` when given, else into a new figure (no pyplot
        state); returns the matplotlib Figure (a notebook shows it as an image once its
        inline backend is on: ``%matplotlib inline``, or any pyplot import)."""
        from .views import plot_attribution

        return plot_attribution(self, threshold, ax)

    def _repr_html_(self) -> str:
        """Notebook display: prompt, answer, P(answer), knowledge neurons and top neurons."""
        from .views import attribution_html

        return attribution_html(self)

    def save(self, path: str | Path) -> Path:
        """Write the full map, the activations and every other field to ``path`` (a torch
        file, ``.pt`` by convention); :meth:`load` reads it back exactly."""
        path = Path(path)
        data = asdict(self)
        data["target_ids"] = list(self.target_ids)
        payload = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "attribution": data}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """An :class:`Attribution` written by :meth:`save` (tensors and values bit-identical)."""
        try:
            blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"no such attribution file: {path}") from None
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
                struct.error) as exc:
            raise DataError(f"{path} is not a saved knowloc attribution ({exc})") from None
        if not isinstance(blob, dict) or blob.get("format") != SAVE_FORMAT:
            raise DataError(f"{path} is not a saved knowloc attribution")
        if blob.get("version") != SAVE_VERSION:
            raise DataError(f"{path}: attribution file version {blob.get('version')!r}; this "
                            f"knowloc reads version {SAVE_VERSION}")
        data = dict(blob["attribution"])
        data["target_ids"] = tuple(data["target_ids"])
        return cls(**data)


#: The ``format`` tag and version of :meth:`Attribution.save` files.
SAVE_FORMAT = "knowloc.attribution"
SAVE_VERSION = 1
