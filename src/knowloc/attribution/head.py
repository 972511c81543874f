"""The fused output head: P(target) and dP/dh by a blocked online softmax.

The attribution engine needs, for every row of a pass, the probability of the target token
and its gradient w.r.t. the final-normed hidden state. Both come from two matrix products
with the unembedding, swept in vocabulary blocks (:func:`target_prob_grad`); autograd never
sees the ``[vocab]`` softmax.

The products run in the unembedding's dtype, except bfloat16 on a CPU without bfloat16
kernels (:func:`knowloc.models.cpu_has_bf16`), where they run in float32 on the same
bfloat16 values (:func:`matmul_dtype`): many times faster there, and more exact.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from ..models import Model, cpu_has_bf16

log = logging.getLogger(__name__)

__all__ = ["HEAD_BLOCK", "HeadOutput", "head_rows", "matmul_dtype", "target_prob",
           "target_prob_grad", "work_dtype"]

# vocabulary rows per block of the fused head: measured on GPT-2 and Gemma shapes, 1024-2048
# beat 8192 by 15-20% (a block's logits stay in cache between its two products)
HEAD_BLOCK = 1024


class HeadOutput(NamedTuple):
    """What :func:`target_prob_grad` returns."""

    prob: torch.Tensor  # [n] P(target) per row
    grad: torch.Tensor  # [n, d_model] dP(target)/dh per row
    top: int | None  # the most likely token of ``argmax_row`` (None without one)
    extra: torch.Tensor | None = None  # [m] P(target) of the forward-only ``extra`` rows


def work_dtype(model: Model) -> torch.dtype:
    """The dtype scores and the softmax are computed in: float32, or float64 for a float64
    model (which makes the engine an exact oracle to compare against)."""
    return torch.promote_types(model.dtype, torch.float32)


def matmul_dtype(model: Model, device: torch.device) -> torch.dtype:
    """The dtype the head's two products run in on ``device``: the unembedding's dtype, or
    float32 for a bfloat16 unembedding on a CPU without bfloat16 kernels
    (:func:`knowloc.models.cpu_has_bf16`), where a bfloat16 product is many times slower."""
    dtype = model.unembedding_matrix().dtype
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        return torch.promote_types(dtype, torch.float32)
    return dtype


def head_rows(model: Model, memory_budget_gb: float) -> int:
    """Rows per block of the fused head (per row: ~3 [HEAD_BLOCK] logit buffers)."""
    el = torch.finfo(work_dtype(model)).bits // 8
    return max(1, int(memory_budget_gb * 2**30 // (3 * HEAD_BLOCK * el)))


@torch.no_grad()
def target_prob_grad(
    model: Model,
    hidden: torch.Tensor,
    target: int,
    max_rows: int | None = None,
    argmax_row: int | None = None,
    extra: torch.Tensor | None = None,
) -> HeadOutput:
    """P(target) and its gradient w.r.t. final-normed hidden states ``hidden`` [n, d_model].

    With z = E h (+ bias, then soft-capping z -> c tanh(z/c) where the model has it) and
    p = softmax(z): dp_t/dh = p_t ((1 - p_t) s_t E_t - sum_{v != t} p_v s_v E_v), s_v the
    soft-cap derivative (1 without). The vocabulary is swept in blocks of ``HEAD_BLOCK`` rows
    with a running maximum (online softmax): each block's logits are computed, exponentiated
    and multiplied back into E while they are still in cache, so the [vocab, n] logits never
    exist in full and E is read once; both products run in :func:`matmul_dtype`. The target
    is left out of the sum, which would otherwise cancel badly when p_t is close to 1. Rows
    go in blocks of ``max_rows``.
    ``extra`` ``[m, d_model]``: rows whose P(target) alone is wanted (``HeadOutput.extra``,
    as :func:`target_prob` gives it). They ride on the first block of rows' sweep of the
    vocabulary -- a product of their own with each vocabulary block while it is in cache --
    so E is not read again for them, and the other rows' products keep their shapes (and
    their bits).
    Returns a :class:`HeadOutput`: ``prob`` ``[n]`` and ``grad`` ``[n, d_model]`` in
    :func:`work_dtype`, and with ``argmax_row`` the most likely token of that row (the first
    one on ties, like ``torch.argmax``) as ``top``, else None.
    """
    head = model.unembedding()
    W = head.weight  # [V, d]
    assert isinstance(W, torch.Tensor)
    bias = getattr(head, "bias", None)
    cap = model.logit_softcap()
    work = work_dtype(model)
    V, d = W.shape
    n = hidden.shape[0]
    max_rows = max_rows or n
    dev = hidden.device
    mm = matmul_dtype(model, dev)
    p_out = torch.empty(n, device=dev, dtype=work)
    g_out = torch.empty(n, d, device=dev, dtype=work)
    w_t = W[target].to(work)
    # (logit, token) of argmax_row, kept on the device: no host sync per block
    best_z = torch.tensor(-torch.inf, device=dev, dtype=work)
    best_t = torch.tensor(-1, device=dev)
    extra_t = extra.to(W.dtype).to(mm).t().contiguous() if extra is not None else None
    extra_acc = (_OnlineProb(extra_t.shape[1], dev, work, target) if extra_t is not None
                 else None)
    for i in range(0, n, max_rows):
        h = hidden[i : i + max_rows].to(W.dtype).to(mm)  # W's rounding, then mm
        r = h.shape[0]
        ht = h.t().contiguous()
        run_max = torch.full((r,), -torch.inf, device=dev, dtype=work)
        total = torch.zeros(r, device=dev, dtype=torch.float64)  # cheap, and p_t hinges on it
        rest = torch.zeros(r, d, device=dev, dtype=work)  # sum_{v != t} exp(z_v - max) s_v E_v
        for s in range(0, V, HEAD_BLOCK):
            if extra_acc is not None and extra_t is not None and i == 0:  # block in cache
                extra_acc.add(_logits(W, s, extra_t, mm, work, bias, cap), s)
            Wb = W[s : s + HEAD_BLOCK].to(mm)  # (no copy unless mm differs)
            z = (Wb @ ht).to(work)  # [block, r]
            if bias is not None:
                z += bias[s : s + HEAD_BLOCK].to(work)[:, None]
            slope = None
            if cap:
                z.div_(cap).tanh_()
                slope = 1 - z * z
                z.mul_(cap)
            if s <= target < s + HEAD_BLOCK:  # the target's logit from the same product
                y_t = z[target - s].clone()
                s_t = slope[target - s].clone() if slope is not None else 1.0
            if argmax_row is not None and i <= argmax_row < i + r:
                top, idx = z[:, argmax_row - i].max(0)
                better = top > best_z  # strictly: an earlier block wins a tie
                best_t = torch.where(better, idx + s, best_t)
                best_z = torch.maximum(top, best_z)
            new_max = torch.maximum(run_max, z.amax(0))
            rescale = torch.exp(run_max - new_max)
            z -= new_max
            z.exp_()
            # the block's sum in the work dtype (a cascade sum: ~1e-7 relative), the running
            # total across blocks in float64; z.sum(0, dtype=float64) would copy the block
            total.mul_(rescale.double()).add_(z.sum(0).double())
            if s <= target < s + HEAD_BLOCK:
                z[target - s] = 0
            if slope is not None:
                z *= slope
            rest.mul_(rescale[:, None]).addmm_(z.t(), Wb.to(work))
            run_max = new_max
        e_t = torch.exp(y_t - run_max)
        total = total.to(work)
        p_t = e_t / total
        rest /= total[:, None]
        g_out[i : i + max_rows] = p_t[:, None] * (((1 - p_t) * s_t)[:, None] * w_t - rest)
        p_out[i : i + max_rows] = p_t
    return HeadOutput(p_out, g_out, int(best_t) if argmax_row is not None else None,
                      extra_acc.prob() if extra_acc is not None else None)



class _OnlineProb:
    """P(target) of ``r`` rows from logits given a vocabulary block at a time (online
    softmax: a running maximum, the running sum of exponentials in float64, the target's
    logit when its block comes), as :func:`target_prob_grad` computes it."""

    def __init__(self, r: int, device: torch.device, work: torch.dtype, target: int):
        self.target = target
        self.max = torch.full((r,), -torch.inf, device=device, dtype=work)
        self.total = torch.zeros(r, device=device, dtype=torch.float64)
        self.y_t: torch.Tensor | None = None

    def add(self, z: torch.Tensor, start: int) -> None:
        """Logits ``z`` ``[block, r]`` (soft-capped) of the vocabulary rows from ``start``;
        ``z`` is overwritten."""
        if start <= self.target < start + z.shape[0]:
            self.y_t = z[self.target - start].clone()
        new_max = torch.maximum(self.max, z.amax(0))
        rescale = torch.exp(self.max - new_max)
        z -= new_max
        z.exp_()
        self.total.mul_(rescale.double()).add_(z.sum(0).double())
        self.max = new_max

    def prob(self) -> torch.Tensor:
        assert self.y_t is not None
        return torch.exp(self.y_t - self.max) / self.total.to(self.max.dtype)


def _logits(W: torch.Tensor, start: int, ht: torch.Tensor, mm: torch.dtype, work: torch.dtype,
            bias: torch.Tensor | None, cap: float | None) -> torch.Tensor:
    """Soft-capped logits ``[block, r]`` of the vocabulary block from ``start`` for the
    hidden states ``ht`` ``[d, r]`` (already in ``mm``)."""
    z = (W[start : start + HEAD_BLOCK].to(mm) @ ht).to(work)
    if bias is not None:
        z += bias[start : start + HEAD_BLOCK].to(work)[:, None]
    if cap:
        z.div_(cap).tanh_().mul_(cap)
    return z


@torch.no_grad()
def target_prob(model: Model, hidden: torch.Tensor, target: int,
                max_rows: int | None = None) -> torch.Tensor:
    """P(target) ``[n]`` of final-normed hidden states ``hidden`` ``[n, d_model]`` without
    the gradient: the forward half of :func:`target_prob_grad` (the same blocks, product
    dtypes, soft-capping and online softmax), one product with the unembedding."""
    head = model.unembedding()
    W = head.weight
    assert isinstance(W, torch.Tensor)
    bias = getattr(head, "bias", None)
    cap = model.logit_softcap()
    work = work_dtype(model)
    n = hidden.shape[0]
    max_rows = max_rows or n
    dev = hidden.device
    mm = matmul_dtype(model, dev)
    p_out = torch.empty(n, device=dev, dtype=work)
    for i in range(0, n, max_rows):
        ht = hidden[i : i + max_rows].to(W.dtype).to(mm).t().contiguous()
        acc = _OnlineProb(ht.shape[1], dev, work, target)
        for s in range(0, W.shape[0], HEAD_BLOCK):
            acc.add(_logits(W, s, ht, mm, work, bias, cap), s)
        p_out[i : i + max_rows] = acc.prob()
    return p_out
