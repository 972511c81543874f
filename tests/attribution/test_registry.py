"""The attribution-method registry: a method registered here, in the test file alone, runs
end to end (gradient x activation, checked against autograd)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from reference_attribution import _last_acts
from tiny import tiny_model

from knowloc import attribute
from knowloc.attribution import (
    AttributionConfig,
    AttributionMethod,
    get_method,
    method_names,
    register_method,
    sort_methods,
    unregister_method,
)
from knowloc.attribution.methods import zero_baseline
from knowloc.errors import ConfigError
from knowloc.models import wrap

PROMPT = "the official language of brazil is"
ANSWER = "portuguese"

# gradient x activation: one point at alpha = 1, zero baseline, no normalization
GXA = AttributionMethod(name="gxa", label="GxA", baseline=zero_baseline, fixed_steps=1)


@pytest.fixture
def gxa() -> Iterator[AttributionMethod]:
    method = register_method(GXA)
    try:
        yield method
    finally:
        unregister_method("gxa")


def _float64_tiny():
    tiny = tiny_model("llama")
    return wrap(copy.deepcopy(tiny.hf).double(), tiny.tokenizer, name="tiny-f64", check=False)


def _gradient_times_activation(model, prompt: str, answer: str) -> torch.Tensor:
    """a_l * dP(answer)/da_l for every layer l, by autograd through the full model, one
    layer at a time (the last position's activation replaced by a leaf of the same value)."""
    tok = model.tokenizer
    ids = tok(prompt)["input_ids"]
    target = tok(prompt + " " + answer)["input_ids"][len(ids)]
    x_ids = torch.tensor([ids])
    acts = _last_acts(model, x_ids)[0]  # [L, D]
    out = torch.zeros_like(acts)
    for layer in range(model.n_layers):
        leaf = acts[layer].clone().requires_grad_(True)

        def patch(mod, args, leaf=leaf):
            h = args[0].clone()
            h[:, -1] = leaf
            return (h,) + tuple(args[1:])

        handle = model.down_proj(layer).register_forward_pre_hook(patch)
        try:
            with torch.enable_grad():
                p = torch.softmax(model.hf(input_ids=x_ids).logits[0, -1], -1)[target]
                (g,) = torch.autograd.grad(p, leaf)
        finally:
            handle.remove()
        out[layer] = acts[layer] * g
    return out


def test_builtin_methods_in_display_order():
    assert method_names()[:3] == ("ig", "sig", "amig")
    assert [get_method(m).label for m in ("ig", "sig", "amig")] == ["IG", "SIG", "AMIG"]
    assert [get_method(m).figure for m in ("ig", "sig", "amig")] == ["3", "8", "9"]


def test_a_registered_method_runs_end_to_end(gxa):
    assert method_names()[-1] == "gxa" and method_names()[:3] == ("ig", "sig", "amig")
    assert get_method("gxa") is gxa and gxa.figure is None
    cfg = AttributionConfig(method="gxa", n_steps=20).validate()
    assert cfg.as_dict() == {"method": "gxa", "n_steps": 1, "target": "first"}  # fixed steps
    model = _float64_tiny()
    attr = attribute(model, (PROMPT, ANSWER), "gxa", progress=False)
    want = _gradient_times_activation(model, PROMPT, ANSWER)
    assert attr.method == "gxa" and attr.config == {"method": "gxa", "n_steps": 1,
                                                    "target": "first"}
    assert attr.scores.dtype == torch.float64
    err = float((attr.scores - want).abs().max() / want.abs().max())
    assert err < 1e-12
    assert float(want.abs().max()) > 0
    # IG shares the zero baseline but integrates over alpha: a different map
    ig = attribute(model, (PROMPT, ANSWER), "ig", n_steps=2, progress=False)
    assert float((ig.scores - attr.scores).abs().max()) > 1e-6


def test_an_unregistered_method_is_refused_everywhere(gxa):
    unregister_method("gxa")
    try:
        with pytest.raises(ConfigError, match="unknown attribution method 'gxa'; choose from ig"):
            get_method("gxa")
        with pytest.raises(ConfigError, match="unknown attribution method"):
            AttributionConfig(method="gxa").validate()
        with pytest.raises(ConfigError, match="unknown attribution method"):
            attribute(tiny_model("llama"), (PROMPT, ANSWER), "gxa", progress=False)
    finally:
        register_method(gxa)


def test_duplicate_names_need_replace(gxa):
    with pytest.raises(ConfigError, match="already registered"):
        register_method(AttributionMethod(name="gxa", label="other", baseline=zero_baseline))
    other = AttributionMethod(name="gxa", label="G x A", baseline=zero_baseline, fixed_steps=1)
    assert register_method(other, replace=True) is other
    assert get_method("gxa").label == "G x A"
    assert method_names()[-1] == "gxa" and method_names().count("gxa") == 1
    with pytest.raises(ConfigError, match="already registered"):
        register_method(get_method("ig"))


def test_sort_methods(gxa):
    assert sort_methods(["zzz", "amig", "gxa", "ig", "aaa", "ig"]) == [
        "ig", "amig", "gxa", "aaa", "zzz"]
    assert sort_methods([]) == []


def test_method_definitions_are_checked():
    with pytest.raises(ConfigError, match="lower-case identifier"):
        AttributionMethod(name="Bad Name", label="x", baseline=zero_baseline)
    with pytest.raises(ConfigError, match="fixed_steps"):
        AttributionMethod(name="zero", label="x", baseline=zero_baseline, fixed_steps=0)
    with pytest.raises(ConfigError, match="unknown attribution method"):
        unregister_method("no_such_method")
