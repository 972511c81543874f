"""Plain reference implementation of IG / SIG / AMIG (the oracle the fast engine must match).

One layer at a time, the full sequence through the whole model for every step (batched over
the steps of one layer), logits only at the last position. This is the loop existing tools
use. With ``target="all"`` the sequence is the prompt followed by the gold answer tokens but
the last (teacher forcing), the patch stays at the last prompt position, and the target is
the product of the answer tokens' probabilities at the positions that predict them. It shares nothing with knowloc.attribution but the model's adapter (which module is the
down projection).

It computes in the model's dtype when that is float64 (a float64 copy of a real model makes
it an exact oracle), and in float32 otherwise.
"""

from __future__ import annotations

import torch


def _work_dtype(model) -> torch.dtype:
    return torch.promote_types(model.dtype, torch.float32)


def _last_acts(model, ids: torch.Tensor) -> torch.Tensor:
    """[batch, L, D] activations at the last position, via plain forward hooks."""
    out = {}
    handles = []
    for l in range(model.n_layers):
        def hook(mod, args, l=l):
            out[l] = args[0][:, -1].detach().clone()
        handles.append(model.down_proj(l).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([out[l] for l in range(model.n_layers)], 1)


def reference_baselines(model, ids: list[int], method: str, sig_mode: str = "mean") -> torch.Tensor:
    L, D = model.n_layers, model.d_mlp
    work = _work_dtype(model)
    if method == "ig":
        return torch.zeros(1, L, D, dtype=work)
    special = set(model.tokenizer.all_special_ids)
    if method == "amig":
        eos = model.tokenizer.eos_token_id
        b = [t if t in special else eos for t in ids]
        return _last_acts(model, torch.tensor([b])).to(work)
    mask = model.tokenizer.mask_token_id
    if mask is None:
        mask = model.tokenizer.pad_token_id
    if mask is None:
        mask = model.tokenizer.eos_token_id
    rows = []
    for j, t in enumerate(ids):
        if t in special:
            continue
        b = list(ids)
        b[j] = mask
        rows.append(_last_acts(model, torch.tensor([b]))[0].to(work))
    base = torch.stack(rows)
    return base.mean(0, keepdim=True) if sig_mode == "mean" else base


def reference_answer_prob(logits: torch.Tensor, n_prompt: int, answer: list[int]) -> torch.Tensor:
    """[batch] teacher-forced P(answer) from full-sequence logits [batch, seq, vocab]."""
    p = torch.ones(logits.shape[0], dtype=logits.dtype)
    for i, t in enumerate(answer):
        p = p * torch.softmax(logits[:, n_prompt - 1 + i], -1)[:, t]
    return p


def reference_attribute(model, prompt: str, answer: str, method: str = "ig", n_steps: int = 20,
                        sig_mode: str = "mean", target: str = "first") -> torch.Tensor:
    tok = model.tokenizer
    ids = tok(prompt)["input_ids"]
    full = tok(prompt + " " + answer)["input_ids"]
    answer_ids = full[len(ids):] if target == "all" else full[len(ids):len(ids) + 1]
    x_ids = torch.tensor([ids + answer_ids[:-1]]).repeat(n_steps, 1)
    pos = len(ids) - 1
    work = _work_dtype(model)
    a = _last_acts(model, torch.tensor([ids]))[0].to(work)
    bases = reference_baselines(model, ids, method, sig_mode)
    alphas = torch.arange(1, n_steps + 1, dtype=work) / n_steps
    scores = torch.zeros(model.n_layers, model.d_mlp, dtype=work)
    for b in bases:
        for l in range(model.n_layers):
            x = (b[l] + alphas[:, None] * (a[l] - b[l])).to(model.dtype).requires_grad_(True)

            def patch(mod, args, x=x):
                h = args[0].clone()
                h[:, pos] = x
                return (h,) + tuple(args[1:])

            handle = model.down_proj(l).register_forward_pre_hook(patch)
            try:
                with torch.enable_grad():
                    logits = model.hf(input_ids=x_ids).logits.to(work)
                    p = reference_answer_prob(logits, len(ids), answer_ids)
                    (g,) = torch.autograd.grad(p.sum(), x)
            finally:
                handle.remove()
            scores[l] += (a[l] - b[l]) * g.to(work).mean(0)
    if method == "sig":
        scores = scores / scores.norm()
    elif method == "amig":
        scores = scores / scores.sum().abs()
    return scores
