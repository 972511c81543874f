"""The completeness gap of every attribution: its formula, P at the baseline point against a
plain forward, exactness where the integrand is constant, convergence with the number of
points, and where it is stored (Attribution files, the queries table, kept maps)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from reference_attribution import reference_baselines
from tiny import tiny_model

from knowloc import attribute
from knowloc.attribution import Attribution, engine
from knowloc.attribution.engine import completeness_gap
from knowloc.attribution.methods import (
    AttributionMethod,
    amig_baseline,
    register_method,
    sig_baseline,
    unregister_method,
    zero_baseline,
)
from knowloc.attribution.quadrature import RULES
from knowloc.models import wrap

PROMPT, ANSWER = "the official language of brazil is", "portuguese"


def f64(arch: str):
    tiny = tiny_model(arch)
    return wrap(copy.deepcopy(tiny.hf).double(), tiny.tokenizer, name=f"tiny-{arch}-f64",
                check=False)


# ------------------------------------------------------------------ the formula
def test_gap_formula_by_hand():
    sums = torch.tensor([[0.9, -0.2, 0.0, 0.5], [1.0, -0.1, 0.0, 0.0]])
    deltas = torch.tensor([[1.0, -0.1, 0.0, 0.0], [1.0, -0.1, 0.0, 0.0]])
    gap = completeness_gap(sums, deltas)
    assert gap.dtype == torch.float64
    # layer 0: |0.9 - 1| / 1 and 0 -> 0.1; layer 1: |-0.2 + 0.1| / 0.1 = 1 and 0 -> 1;
    # layer 2: delta 0 and sum 0 -> 0; layer 3: delta 0, sum 0.5 -> inf (worst baseline)
    assert gap[:2].tolist() == pytest.approx([0.1, 1.0], rel=1e-6)
    assert gap[2] == 0 and math.isinf(gap[3])


# ------------------------------------------------------------------ P(b_l), plain
def _plain_prob(model, layer, value):
    """P(answer) with layer ``layer``'s activation at the last position set to ``value``."""
    ids = torch.tensor([model.encode_prompt(PROMPT)])
    target = model.target_ids(PROMPT, ANSWER)[0]

    def patch(l, h):
        h = h.clone()
        h[:, -1] = value
        return h

    with torch.no_grad(), model.hook_activations(patch, [layer]):
        return float(torch.softmax(model.hf(input_ids=ids).logits[0, -1], -1)[target])


@pytest.fixture
def raw_methods():
    """IG, SIG and AMIG without their normalization (the gap is taken before it)."""
    names = []
    for name, base in (("raw_ig", zero_baseline), ("raw_sig", sig_baseline),
                       ("raw_amig", amig_baseline)):
        register_method(AttributionMethod(name=name, label=name, baseline=base,
                                          options=("sig_mode",) if "sig" in name else ()))
        names.append(name)
    yield names
    for name in names:
        unregister_method(name)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gap_equals_plain_forwards(raw_methods, rule, arch):
    """The engine's gap (its P(b_l) from the forward-only baseline pass, or from the alpha = 0
    rows of the trapezoid) equals the gap from plain full-sequence forwards, per method,
    in float64; and the normalized methods carry the gap of their raw map."""
    model = f64(arch)
    ids = model.encode_prompt(PROMPT)
    for raw, method in zip(raw_methods, ("ig", "sig", "amig")):
        a = attribute(model, (PROMPT, ANSWER), raw, n_steps=4, rule=rule,
                      internal_batch_size=5, progress=False)
        base = reference_baselines(model, ids, method)[0]
        deltas = torch.tensor([a.prob - _plain_prob(model, l, base[l])
                               for l in range(model.n_layers)], dtype=torch.float64)
        expected = (a.scores.sum(1) - deltas).abs() / deltas.abs()
        assert torch.allclose(a.completeness_gap, expected, rtol=1e-9, atol=1e-12), method
        normalized = attribute(model, (PROMPT, ANSWER), method, n_steps=4, rule=rule,
                               progress=False)
        assert torch.allclose(normalized.completeness_gap, a.completeness_gap, rtol=1e-9)


def test_sig_per_token_gap_is_the_worst_baseline():
    model = f64("llama")
    ids = model.encode_prompt(PROMPT)
    a = attribute(model, (PROMPT, ANSWER), "sig", n_steps=3, sig_mode="per_token",
                  internal_batch_size=4, progress=False)
    bases = reference_baselines(model, ids, "sig", "per_token")
    # the per-baseline raw maps are not returned: check P(b_l) per baseline through the
    # gap of each single-baseline run instead
    worst = torch.zeros(model.n_layers, dtype=torch.float64)
    for b in bases:
        def one(model, ids, cfg, b=b):
            return b[None].to(model.dtype)

        register_method(AttributionMethod(name="one_base", label="b", baseline=one))
        try:
            single = attribute(model, (PROMPT, ANSWER), "one_base", n_steps=3, progress=False)
        finally:
            unregister_method("one_base")
        worst = torch.maximum(worst, single.completeness_gap)
    assert torch.allclose(a.completeness_gap, worst, rtol=1e-9)


# ------------------------------------------------------------------ exactness
def test_gap_is_zero_where_the_integrand_is_constant(monkeypatch):
    """With no final norm and a linear head (P = w . h), P is linear in the last layer's
    activation (down projection, residual add): the integrand is constant along the path, so
    every rule with any number of points is exact there and the gap is 0 up to rounding --
    while the earlier layers (through attention and MLPs) keep a gap."""
    model = f64("llama")
    model.hf.model.norm = torch.nn.Identity()
    torch.manual_seed(0)
    w = torch.randn(model.d_model, dtype=torch.float64)

    def linear_head(model, hidden, targets, max_rows, argmax_row=None, extra=None):
        h = hidden[:, 0].double()
        tops = [int(targets[0])] if argmax_row is not None else []
        p_extra = None if extra is None else extra[:, 0].double() @ w
        return h @ w, w.expand(h.shape[0], 1, -1).clone(), tops, p_extra

    monkeypatch.setattr(engine, "_answer_head", linear_head)
    for rule in RULES:
        for n in (2, 3):
            for method in ("ig", "amig"):
                a = attribute(model, (PROMPT, ANSWER), method, n_steps=n, rule=rule,
                              progress=False)
                gap = a.completeness_gap
                assert gap[-1] < 1e-10, (rule, n, method)
                assert gap[0] > 1e-4, (rule, n, method)  # not trivially zero


# ------------------------------------------------------------------ convergence
def test_gap_converges_with_the_number_of_points():
    """Against IG's completeness: the right Riemann sum's gap falls as 1/m, the trapezoid's
    as 1/m^2, and a 4096-point Gauss-Legendre map is complete to rounding (float64)."""
    model = f64("llama")

    def gap(rule, n):
        return float(attribute(model, (PROMPT, ANSWER), "ig", n_steps=n, rule=rule,
                               progress=False).completeness_gap.max())

    r = [gap("riemann_right", n) for n in (25, 50, 100)]
    assert 1.7 < r[0] / r[1] < 2.3 and 1.7 < r[1] / r[2] < 2.3
    t = [gap("trapezoid", n) for n in (26, 51)]
    assert 3.4 < t[0] / t[1] < 4.6
    # LLaMA's RMSNorm computes in float32 even in a float64 model: a ~1e-6 floor there;
    # GPT-2 is float64 throughout
    gpt2 = f64("gpt2")
    assert float(attribute(gpt2, (PROMPT, ANSWER), "ig", n_steps=4096, rule="gausslegendre",
                           progress=False).completeness_gap.max()) < 1e-12


# ------------------------------------------------------------------ where it is stored
def test_save_load_keeps_the_gap_and_old_files_load(tmp_path: Path):
    a = attribute(tiny_model("gpt2"), (PROMPT, ANSWER), "amig", n_steps=3, progress=False)
    assert a.completeness_gap is not None and a.completeness_gap.shape == (a.n_layers,)
    back = Attribution.load(a.save(tmp_path / "a.pt"))
    assert torch.equal(back.completeness_gap, a.completeness_gap)
    blob = torch.load(tmp_path / "a.pt", weights_only=True)
    del blob["attribution"]["completeness_gap"]  # a file written before the gap existed
    torch.save(blob, tmp_path / "old.pt")
    old = Attribution.load(tmp_path / "old.pt")
    assert old.completeness_gap is None and torch.equal(old.scores, a.scores)


def test_queries_table_has_the_gap_with_and_without_kept_maps(localized: Path, tiny_dir: Path,
                                                               facts_file: Path,
                                                               tmp_path: Path):
    from knowloc import load_model
    from knowloc.cli import main
    from knowloc.data import load_facts
    from knowloc.pipeline.run import load_maps
    from knowloc.store import RunStore

    queries = RunStore(localized, create=False).table("queries")
    assert queries["completeness_gap"].notna().all()
    model = load_model(str(tiny_dir))
    q = load_facts(f"jsonl:{facts_file}").queries()[0]
    row = queries[(queries["query_id"] == q.query_id) & (queries["method"] == "amig")].iloc[0]
    fresh = attribute(model, q, "amig", n_steps=3, progress=False)
    assert row["completeness_gap"] == pytest.approx(float(fresh.completeness_gap.max()),
                                                    rel=1e-5)

    run = tmp_path / "maps"
    assert main(["-q", "localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "amig", "--n-steps", "3", "--keep-maps", "--out", str(run)]) == 0
    kept = RunStore(run, create=False).table("queries")
    assert kept["completeness_gap"].notna().all()
    maps = load_maps(run)
    assert torch.equal(maps["amig", q.query_id].completeness_gap.float(),
                       fresh.completeness_gap.float()) or torch.allclose(
        maps["amig", q.query_id].completeness_gap, fresh.completeness_gap, rtol=1e-5)
    merged = kept.merge(queries[queries["method"] == "amig"], on="query_id")
    assert (merged["completeness_gap_x"] - merged["completeness_gap_y"]).abs().max() < 1e-6
