"""What is measured through the attention hooks: attention maps of a prompt, ΔValue and ΔProb
of scaling knowledge synapses (Figure 6), and the layer × neuron activation tables behind the
heatmaps (Figures 1, 7, 10)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ...errors import ConfigError
from ...models import Model
from ...models.forward import activations_and_answer, activations_and_probs
from ...synapses import (
    CONDITIONS,
    AttentionMap,
    Rows,
    Synapse,
    SynapseEffect,
    SynapseSet,
    activation_frame,
    as_synapses,
    check_rows,
    knowledge_synapses,
    measure_effect,
)
from .hooks import eager_attention, record_attention, scale_attention


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
    check_rows(rows)
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


# ================================================================ synapse manipulation
def synapse_effect(
    model: Model,
    prompt: str | Sequence[int],
    answer: str | int | Sequence[int],
    synapses: SynapseSet | Iterable[Synapse],
    factor: float,
    neurons: Iterable[tuple[int, int]],
    *,
    rows: Rows = "all",
    target: str = "first",
) -> SynapseEffect:
    """ΔValue and ΔProb of scaling ``synapses`` by ``factor`` for one query.

    ``answer``: the gold answer text (its target tokens in ``target`` mode,
    :meth:`knowloc.models.Model.target_ids`), or the target token id(s). P is the
    teacher-forced probability of the target tokens; the synapses are scaled in the prompt's
    rows only and ΔValue reads the activations at the last prompt position. ``neurons``: the
    query's knowledge neurons. Both runs happen under eager attention.
    """
    if isinstance(answer, str):
        if not isinstance(prompt, str):
            raise ConfigError("give the answer as token ids when the prompt is token ids")
        answer_ids = model.target_ids(prompt, answer, target)
    else:
        answer_ids = [int(answer)] if isinstance(answer, int) else [int(t) for t in answer]
    return synapse_effects(model, _ids(model, prompt), answer_ids, [(synapses, factor)],
                           [neurons], rows=rows)[0][0]


def synapse_effects(
    model: Model,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    variants: Sequence[tuple[SynapseSet | Iterable[Synapse], float]],
    neuron_sets: Sequence[Iterable[tuple[int, int]]],
    *,
    rows: Rows = "all",
) -> list[list[SynapseEffect]]:
    """:func:`synapse_effect` of several (synapses, factor) manipulations of one query, each
    read on several neuron sets: ``result[v][s]`` is variant ``v`` on ``neuron_sets[s]``.

    One forward without manipulation and one per variant (not two per variant and neuron
    set); each number is the one :func:`synapse_effect` gives for that pair.
    """
    ids = list(prompt_ids)
    sets = [list(ns) for ns in neuron_sets]
    out: list[list[SynapseEffect]] = []
    with eager_attention(model):
        acts_b, p_b = activations_and_answer(model, ids, answer_ids)
        for synapses, factor in variants:
            triples = as_synapses(synapses)
            kept = [s for s in triples if s[0] < len(ids)]
            with scale_attention(model, kept, factor, rows=rows, last=len(ids) - 1):
                acts_a, p_a = activations_and_answer(model, ids, answer_ids)
            out.append([measure_effect(factor, kns, acts_b, acts_a, p_b, p_a,
                                       n_synapses=len(kept), n_clipped=len(triples) - len(kept))
                        for kns in sets])
    return out


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
    target: str = "first",
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
            eff = synapse_effect(model, prompt, answer, syn, f, kns, rows=rows, target=target)
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
            acts, _ = activations_and_probs(model, ids)
        else:
            with scale_attention(model, [s for s in as_synapses(synapses) if s[0] < len(ids)],
                                 factor, rows=rows):
                acts, _ = activations_and_probs(model, ids)
    return acts


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
            frames.append(activation_frame(labels[i], prompt, cond, acts, cols))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["query", "prompt", "condition", "layer", "neuron", "activation"]
    )
