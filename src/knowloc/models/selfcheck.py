"""The self-check run when a model is loaded: the adapter hooks the right module.

A neuron is an input of the MLP's down projection (METHODS §0). An adapter that names the
wrong module would silently attribute something else, so every loaded model is checked:
the hook sees ``[batch, seq, d_mlp]`` on every layer, the hooked module is the MLP block's
last operation, and zeroing a neuron's activation changes the logits exactly as zeroing its
value vector does.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from . import forward
from .model import Model

__all__ = ["check_mlp_structure", "self_check"]

#: The prompt the self-check runs.
CHECK_PROMPT = "The capital of France is"


@torch.no_grad()
def check_mlp_structure(model: Model, ids: torch.Tensor) -> None:
    """The hooked module must be the MLP's last operation: its output is the MLP block's
    output, and its input width is d_mlp. (Zeroing an input of *any* linear layer equals
    zeroing the matching weight column, so that check alone cannot catch a wrong site.)
    Raises :class:`ModelError` otherwise."""
    adapter = model.adapter
    parent_path = adapter.mlp
    for layer in (0, model.n_layers - 1):
        mlp = model.mlp(layer)
        proj = model.down_proj(layer)
        if not any(m is proj for m in mlp.modules()):
            raise ModelError(
                f"adapter {adapter.name!r} self-check failed: {adapter.down_proj!r} "
                f"is not inside the MLP block {parent_path!r}"
            )
        seen: dict[str, torch.Tensor] = {}
        h1 = mlp.register_forward_hook(lambda m, a, o, s=seen: s.__setitem__("mlp", o))
        h2 = proj.register_forward_hook(lambda m, a, o, s=seen: s.__setitem__("proj", o))
        try:
            forward.last_hidden(model, ids)
        finally:
            h1.remove()
            h2.remove()
        mlp_out = seen.get("mlp")
        mlp_out = mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out
        width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)
        if (
            "proj" not in seen
            or mlp_out is None
            or mlp_out.shape != seen["proj"].shape
            or not torch.equal(mlp_out, seen["proj"])
            or (width is not None and int(width) != model.d_mlp)
        ):
            raise ModelError(
                f"adapter {adapter.name!r} self-check failed: {adapter.down_proj!r} "
                f"of layer {layer} is not the last operation of its MLP block "
                f"({parent_path or 'layer'}) with {model.d_mlp} inputs; the hooked module is "
                "not the down projection"
            )


@torch.no_grad()
def self_check(model: Model, atol: float = 1e-4) -> None:
    """Verify ``model``'s adapter: the hook's shapes, the MLP structure, and that zeroing a
    neuron's activation equals zeroing its value vector (logits within ``atol`` relative to
    the largest logit). Raises :class:`ModelError` on a failure, also when the model's
    logits are not finite in its dtype; sets ``model.checked`` when all pass."""
    ids = torch.tensor([model.encode_prompt(CHECK_PROMPT)], device=model.device)
    adapter = model.adapter
    seen: dict[int, tuple[int, ...]] = {}

    def shape(layer: int, h: torch.Tensor) -> torch.Tensor:
        seen[layer] = tuple(h.shape)
        return h

    base = forward.next_token_logits(model, ids, act_fn=shape)[0]
    if not bool(torch.isfinite(base).all()):
        dtype = str(model.dtype).removeprefix("torch.")
        raise ModelError(
            f"{model.name} does not run in {dtype}: its activations exceed {dtype}'s range "
            "and become inf/nan; use --dtype bfloat16 (float32's range) or float32")
    expect = (1, ids.shape[1], model.d_mlp)
    bad = {k: v for k, v in seen.items() if v != expect}
    if len(seen) != model.n_layers or bad:
        raise ModelError(
            f"adapter {adapter.name!r} self-check failed: down-projection hook "
            f"shapes {bad or seen} (expected {expect} on all {model.n_layers} layers)"
        )
    check_mlp_structure(model, ids)
    acts = forward.last_activations(model, ids)[0]
    # the neurons with the largest |activation| in the first and last layer
    last = model.n_layers - 1
    checks = [(0, int(acts[0].abs().argmax())), (last, int(acts[-1].abs().argmax()))]
    for layer, neuron in checks:
        def zero(_l: int, h: torch.Tensor, layer: int = layer, neuron: int = neuron) -> torch.Tensor:
            if _l == layer:
                h = h.clone()
                h[..., neuron] = 0
            return h

        via_act = forward.next_token_logits(model, ids, act_fn=zero, layers=[layer])[0]
        vv = model.value_vectors(layer)
        saved = vv[neuron].clone()
        try:
            vv[neuron] = 0
            via_weight = forward.next_token_logits(model, ids)[0]
        finally:
            vv[neuron] = saved
        tol = atol * max(1.0, float(base.abs().max()))
        if (via_act - via_weight).abs().max() > tol:
            raise ModelError(
                f"adapter {adapter.name!r} self-check failed: zeroing neuron "
                f"({layer}, {neuron}) through its activation and through its value vector "
                "give different logits; the hooked module is not the down projection"
            )
        if (via_act - base).abs().max() == 0 and float(acts[layer, neuron]) != 0:
            raise ModelError(
                f"adapter {adapter.name!r} self-check failed: zeroing neuron "
                f"({layer}, {neuron}) did not change the logits"
            )
    model.checked = True
