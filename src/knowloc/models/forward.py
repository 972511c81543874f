"""The one forward path: last-position activations and next-token probabilities.

Every next-token probability knowloc reports comes from here: the decoder stack runs
(``Model.base_model()``, no cache), the final-normed hidden state of the last position is
taken as a contiguous ``[batch, d_model]`` tensor, multiplied by the unembedding, soft-capped
where the model has a final logit soft-cap (:func:`apply_softcap`, the only place outside
the fused attribution head), and turned into probabilities in float32. The full
``[batch, seq, vocab]`` logits are never formed, and the unembedding never reads a strided
last-position view (transformers' ``logits_to_keep=1``, a slow matrix product on CPU).

Rows of one call have the same length: nothing is padded, so every row is exact. Results
depend (at float-rounding level) on the batch a row runs in; callers that need stable
numbers keep their batching fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .device import cpu_has_bf16
from .model import ActivationFn, Model

log = logging.getLogger(__name__)

__all__ = [
    "ActivationFn",
    "AnswerScores",
    "activations_and_answer",
    "activations_and_probs",
    "answer_scores",
    "apply_softcap",
    "final_hidden",
    "last_activations",
    "last_hidden",
    "logits_from_hidden",
    "next_token_logits",
    "next_token_probs",
    "probs_from_hidden",
    "prompt_activations",
    "prompt_probs",
]

TokenIds = torch.Tensor | Sequence[Sequence[int]]


def _as_batch(model: Model, ids: TokenIds) -> torch.Tensor:
    x = torch.as_tensor(ids, device=model.device) if not isinstance(ids, torch.Tensor) else ids
    if x.ndim != 2:
        raise ValueError(f"expected a [batch, seq] batch of token ids (got {tuple(x.shape)})")
    return x.to(model.device)


def apply_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (final logit soft-capping), or ``logits`` without a cap."""
    return torch.tanh(logits / cap) * cap if cap else logits


#: Vocabulary rows per block of :func:`logits_from_hidden`'s float32 product.
UNEMBED_BLOCK = 8192


def logits_from_hidden(model: Model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 (soft-capped) logits from final-normed hidden states ``[n, d_model]``.

    A bfloat16 unembedding on a CPU without bfloat16 kernels (:func:`cpu_has_bf16`) is
    multiplied in float32, block by block over the vocabulary, on the same bfloat16 values:
    a bfloat16 product there is many times slower."""
    head = model.unembedding()
    h = hidden.contiguous()
    W = model.unembedding_matrix()
    if (type(head) is torch.nn.Linear and W.dtype == torch.bfloat16
            and h.device.type == "cpu" and not cpu_has_bf16()):
        h32 = h.to(W.dtype).float()
        logits = torch.empty(h.shape[:-1] + W.shape[:1], dtype=torch.float32, device=h.device)
        for s in range(0, W.shape[0], UNEMBED_BLOCK):
            logits[..., s : s + UNEMBED_BLOCK] = h32 @ W[s : s + UNEMBED_BLOCK].float().t()
        bias = getattr(head, "bias", None)
        if bias is not None:
            logits += bias.float()
    else:
        logits = head(h).float()
    return apply_softcap(logits, model.logit_softcap())


def probs_from_hidden(model: Model, hidden: torch.Tensor) -> torch.Tensor:
    """Softmax over the vocabulary from final-normed hidden states ``[n, d_model]`` (float32)."""
    return torch.softmax(logits_from_hidden(model, hidden), -1)


@torch.no_grad()
def final_hidden(model: Model, ids: TokenIds, *, act_fn: ActivationFn | None = None,
                 layers: Sequence[int] | None = None) -> torch.Tensor:
    """``[batch, seq, d_model]`` final-normed hidden states of every position (no cache;
    ``act_fn``/``layers`` as in :func:`last_hidden`)."""
    x = _as_batch(model, ids)
    if act_fn is None:
        return model.base_model()(input_ids=x, use_cache=False).last_hidden_state
    with model.hook_activations(act_fn, layers):
        return model.base_model()(input_ids=x, use_cache=False).last_hidden_state


@torch.no_grad()
def last_hidden(model: Model, ids: TokenIds, *, act_fn: ActivationFn | None = None,
                layers: Sequence[int] | None = None) -> torch.Tensor:
    """``[batch, d_model]`` final-normed hidden state at the last position (contiguous).

    With ``act_fn``, the down-projection inputs of ``layers`` (default: all) are replaced by
    ``act_fn(layer, h)`` during the pass (:meth:`Model.hook_activations`).
    """
    x = _as_batch(model, ids)
    if act_fn is None:
        out = model.base_model()(input_ids=x, use_cache=False)
    else:
        with model.hook_activations(act_fn, layers):
            out = model.base_model()(input_ids=x, use_cache=False)
    return out.last_hidden_state[:, -1].contiguous()


@torch.no_grad()
def next_token_logits(model: Model, ids: TokenIds, *, act_fn: ActivationFn | None = None,
                      layers: Sequence[int] | None = None) -> torch.Tensor:
    """``[batch, vocab]`` float32 (soft-capped) next-token logits after same-length prompts."""
    return logits_from_hidden(model, last_hidden(model, ids, act_fn=act_fn, layers=layers))


@torch.no_grad()
def next_token_probs(model: Model, ids: TokenIds, *, act_fn: ActivationFn | None = None,
                     layers: Sequence[int] | None = None) -> torch.Tensor:
    """``[batch, vocab]`` float32 next-token probabilities after same-length prompts, on the
    model's device (``act_fn``/``layers`` as in :func:`last_hidden`)."""
    return probs_from_hidden(model, last_hidden(model, ids, act_fn=act_fn, layers=layers))


@torch.no_grad()
def last_activations(model: Model, ids: TokenIds) -> torch.Tensor:
    """``[batch, n_layers, d_mlp]`` neuron activations at the last position of same-length
    prompts (model dtype, on the model's device)."""
    x = _as_batch(model, ids)
    out = torch.empty(x.shape[0], model.n_layers, model.d_mlp, device=model.device,
                      dtype=model.dtype)

    def grab(layer: int, h: torch.Tensor) -> torch.Tensor:
        out[:, layer] = h[:, -1]
        return h

    with model.hook_activations(grab):
        model.base_model()(input_ids=x, use_cache=False)
    return out


def prompt_probs(model: Model, prompts: Sequence[str] | Sequence[Sequence[int]]) -> torch.Tensor:
    """``[n, vocab]`` float32 next-token probabilities after each prompt (a string, encoded
    with :meth:`Model.encode_prompt`, or token ids), one pass per prompt, so prompts of any
    lengths give the numbers a batch of one gives (:func:`next_token_probs`)."""
    rows = []
    for p in prompts:
        ids = model.encode_prompt(p) if isinstance(p, str) else list(p)
        rows.append(next_token_probs(model, [ids])[0])
    return torch.stack(rows)


def prompt_activations(model: Model, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``[n_layers, d_mlp]`` neuron activations at the last position of one prompt (model
    dtype, on the model's device; :func:`last_activations` of a batch of one)."""
    ids = torch.as_tensor(prompt_ids, device=model.device).reshape(1, -1)
    return last_activations(model, ids)[0]


@torch.no_grad()
def activations_and_probs(model: Model, ids: Sequence[int], *,
                          act_fn: ActivationFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt: (``[n_layers, d_mlp]`` last-position activations, ``[vocab]`` next-token
    probabilities), both float32 on the CPU. With ``act_fn`` the activations are recorded
    after it replaced them."""
    acts = torch.empty(model.n_layers, model.d_mlp, dtype=torch.float32)

    def grab(layer: int, h: torch.Tensor) -> torch.Tensor:
        if act_fn is not None:
            h = act_fn(layer, h)
        acts[layer] = h[0, -1].detach().float().cpu()
        return h

    probs = next_token_probs(model, [list(ids)], act_fn=grab)
    return acts, probs[0].cpu()


class AnswerScores(NamedTuple):
    """What :func:`answer_scores` returns, one entry per row."""

    prob: torch.Tensor  # [batch] float64 teacher-forced P(answer) (float32 value for one token)
    greedy: torch.Tensor  # [batch, n_answer] the most likely token at each answer position
    known: torch.Tensor  # [batch] bool: greedy decoding reproduces the whole answer


@torch.no_grad()
def answer_scores(model: Model, ids: TokenIds, answers: TokenIds, *,
                  act_fn: ActivationFn | None = None,
                  layers: Sequence[int] | None = None) -> AnswerScores:
    """Teacher-forced scores of same-length answers after same-length prompts.

    ``ids`` ``[batch, seq]`` are the prompts, ``answers`` ``[batch, n]`` the target tokens
    (:meth:`Model.target_ids`). One pass over prompt + answer[:-1]; position ``seq - 1 + i``
    predicts answer token i. ``known`` is True when the argmax at every answer position is
    the gold token, i.e. greedy decoding reproduces the answer. With ``n = 1`` this is
    exactly :func:`next_token_probs` (same pass, same numbers). ``act_fn``/``layers`` as in
    :func:`last_hidden`; the pass includes the answer tokens, so an ``act_fn`` that acts on
    the last prompt position must index it explicitly (``seq - 1``), not as position -1.
    """
    x, a = _as_batch(model, ids), _as_batch(model, answers)
    n = a.shape[1]
    if n == 1:
        probs = next_token_probs(model, x, act_fn=act_fn, layers=layers)[:, None]
    else:
        seq = torch.cat([x, a[:, :-1]], 1)
        hidden = final_hidden(model, seq, act_fn=act_fn, layers=layers)[:, x.shape[1] - 1:]
        hidden = hidden.contiguous()
        probs = probs_from_hidden(model, hidden.reshape(-1, hidden.shape[-1]))
        probs = probs.reshape(a.shape[0], n, -1)
    p = probs.gather(2, a[:, :, None])[:, :, 0]
    greedy = probs.argmax(-1)
    return AnswerScores(p.double().prod(1), greedy, (greedy == a).all(1))


@torch.no_grad()
def activations_and_answer(model: Model, ids: Sequence[int], answer: Sequence[int], *,
                           act_fn: ActivationFn | None = None) -> tuple[torch.Tensor, float]:
    """One prompt: (``[n_layers, d_mlp]`` activations at the last *prompt* position, float32
    on the CPU; the teacher-forced P(``answer``) of :func:`answer_scores`). A one-token
    answer is :func:`activations_and_probs` (same pass, same numbers). With ``act_fn`` the
    activations are recorded after it replaced them."""
    answer = [int(t) for t in answer]
    if len(answer) == 1:
        acts, probs = activations_and_probs(model, ids, act_fn=act_fn)
        return acts, float(probs[answer[0]])
    pos = len(ids) - 1
    acts = torch.empty(model.n_layers, model.d_mlp, dtype=torch.float32)

    def grab(layer: int, h: torch.Tensor) -> torch.Tensor:
        if act_fn is not None:
            h = act_fn(layer, h)
        acts[layer] = h[0, pos].detach().float().cpu()
        return h

    scores = answer_scores(model, [list(ids)], [answer], act_fn=grab)
    return acts, float(scores.prob[0])
