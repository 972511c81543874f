"""Integration rules: nodes and weights against numpy and captum, the engine with each rule
against captum's IntegratedGradients, keys and configs, and a smoke run of the benchmark."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_model

from knowloc import attribute
from knowloc.attribution import AttributionConfig
from knowloc.attribution.quadrature import DEFAULT_RULE, RULES, quadrature
from knowloc.errors import ConfigError
from knowloc.models import wrap

PROMPT, ANSWER = "the official language of brazil is", "portuguese"
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "quadrature.py"


# ------------------------------------------------------------------ nodes and weights
@pytest.mark.parametrize("n", [1, 2, 3, 8, 20, 64])
def test_gauss_legendre_is_numpys_mapped_to_the_unit_interval(n):
    x, w = np.polynomial.legendre.leggauss(n)
    q = quadrature("gausslegendre", n)
    np.testing.assert_array_equal(q.nodes, (x + 1) / 2)
    np.testing.assert_array_equal(q.weights, w / 2)
    assert np.all(np.diff(q.nodes) > 0) and 0 < q.nodes[0] and q.nodes[-1] < 1
    assert not q.has_one and not q.has_zero


@pytest.mark.parametrize("n", [2, 3, 5, 20])
def test_trapezoid_and_riemann_nodes_and_weights(n):
    t = quadrature("trapezoid", n)
    np.testing.assert_allclose(t.nodes, np.linspace(0, 1, n), rtol=0, atol=1e-15)
    expected = np.full(n, 1 / (n - 1))
    expected[[0, -1]] /= 2
    np.testing.assert_allclose(t.weights, expected, rtol=1e-15)
    assert t.has_zero and t.has_one
    r = quadrature("riemann_right", n)
    np.testing.assert_array_equal(r.nodes, np.arange(1, n + 1) / n)
    np.testing.assert_array_equal(r.weights, np.full(n, 1 / n))
    assert r.has_one and not r.has_zero and r.uniform
    for q in (t, r):
        assert q.weights.sum() == pytest.approx(1, abs=1e-14)


def test_riemann_alphas_are_the_papers_float32_values():
    """The default rule's nodes are computed as before rules existed: arange(1, m) / m in
    the work dtype (bit for bit), so results do not move by one bit."""
    for m in (2, 7, 20, 256):
        a = quadrature("riemann_right", m).alphas(torch.float32)
        assert torch.equal(a[:-1], torch.arange(1, m, dtype=torch.float32) / m)
        assert a[-1] == 1


def test_rules_integrate_what_they_should_exactly():
    """Gauss-Legendre with n points is exact for polynomials of degree 2n - 1; the
    trapezoid for linear functions (and converges as 1/n^2 otherwise), the right Riemann sum
    as 1/n."""
    for n in (1, 2, 4, 7):
        q = quadrature("gausslegendre", n)
        for deg in range(2 * n):
            assert q.integrate(lambda x, d=deg: x**d) == pytest.approx(1 / (deg + 1), rel=1e-13)
        assert abs(q.integrate(lambda x, d=2 * n: x**d) - 1 / (2 * n + 1)) > 1e-12
    assert quadrature("trapezoid", 2).integrate(lambda x: 3 * x + 1) == pytest.approx(2.5)

    def err(rule, n):
        return abs(quadrature(rule, n).integrate(np.exp) - (np.e - 1))

    assert 1.8 < err("riemann_right", 10) / err("riemann_right", 20) < 2.2
    assert 3.8 < err("trapezoid", 11) / err("trapezoid", 21) < 4.2
    assert err("gausslegendre", 5) < 1e-10


def test_bad_rules_and_point_counts():
    with pytest.raises(ConfigError, match="unknown integration rule 'simpson'"):
        quadrature("simpson", 8)
    with pytest.raises(ConfigError, match="trapezoid.*>= 2"):
        quadrature("trapezoid", 1)
    with pytest.raises(ConfigError, match="unknown integration rule"):
        AttributionConfig(rule="simpson").validate()
    with pytest.raises(ConfigError, match="unknown integration rule"):
        attribute(tiny_model("llama"), (PROMPT, ANSWER), "ig", n_steps=4, rule="midpoint",
                  progress=False)


def test_cli_rule_choices_are_the_rules():
    from knowloc.cli import parsers

    assert parsers.RULES == RULES and DEFAULT_RULE == RULES[0]
    parser, _ = parsers.build_parsers()
    args = parser.parse_args(["localize", "--prompt", "p", "--answer", "a"])
    assert args.rule == "riemann_right"
    args = parser.parse_args(["localize", "--prompt", "p", "--answer", "a", "--rule",
                              "gausslegendre"])
    assert args.rule == "gausslegendre"
    assert parser.parse_args(["reproduce", "--out", "x", "--rule", "trapezoid"]).rule == "trapezoid"


# ------------------------------------------------------------------ keys and configs
def test_default_rule_leaves_configs_and_keys_unchanged():
    """A key names the rule only when it is not the paper's: runs made before rules existed
    keep their unit keys (cf. target_key)."""
    cfg = AttributionConfig(method="amig", n_steps=20)
    assert cfg.as_dict() == {"method": "amig", "n_steps": 20, "target": "first",
                             "normalization": "abs_sum"}
    other = AttributionConfig(method="amig", n_steps=20, rule="gausslegendre").validate()
    assert other.as_dict() == {**cfg.as_dict(), "rule": "gausslegendre"}
    a = attribute(tiny_model("llama"), (PROMPT, ANSWER), "ig", n_steps=3, rule="trapezoid",
                  progress=False)
    assert a.config["rule"] == "trapezoid"
    assert "rule" not in attribute(tiny_model("llama"), (PROMPT, ANSWER), "ig", n_steps=3,
                                   progress=False).config


def test_localize_config_carries_the_rule():
    from knowloc.pipeline.localize import LocalizeConfig

    cfg = LocalizeConfig(methods=("ig", "sig"), rule="trapezoid")
    assert {c.rule for c in cfg.attribution_configs()} == {"trapezoid"}
    assert cfg.as_dict()["rule"] == "trapezoid"
    assert LocalizeConfig().as_dict()["rule"] == "riemann_right"
    with pytest.raises(ConfigError, match="integration rule"):
        LocalizeConfig(rule="simpson").attribution_configs()


# ------------------------------------------------------------------ the engine per rule
def _captum_raw(model, attr, method, rule, n):
    """captum's IntegratedGradients of every layer (the plain per-layer loop) with the
    method's baseline, normalized as the method normalizes."""
    captum_attr = pytest.importorskip("captum.attr")
    from reference_attribution import reference_baselines

    ids = model.encode_prompt(PROMPT)
    base = reference_baselines(model, ids, method)[0]
    target = model.target_ids(PROMPT, ANSWER)[0]
    x_ids = torch.tensor([ids])
    raw = torch.zeros(model.n_layers, model.d_mlp, dtype=model.dtype)
    for layer in range(model.n_layers):
        def forward(acts, layer=layer):
            def patch(l, h):
                h = h.expand(acts.shape[0], *h.shape[1:]).clone()
                h[:, -1] = acts
                return h

            with model.hook_activations(patch, [layer]):
                logits = model.hf(input_ids=x_ids.expand(acts.shape[0], -1)).logits[:, -1]
            return torch.softmax(logits, -1)[:, target]

        ig = captum_attr.IntegratedGradients(forward)
        raw[layer] = ig.attribute(attr.activations[layer][None], baselines=base[layer][None],
                                  n_steps=n, method=rule)[0].detach()
    if method == "sig":
        raw = raw / raw.norm()
    elif method == "amig":
        raw = raw / raw.sum().abs()
    return raw


@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
@pytest.mark.parametrize("rule,captum_rule", [("trapezoid", "riemann_trapezoid"),
                                              ("gausslegendre", "gausslegendre")])
def test_each_rule_equals_captum_in_float64(method, rule, captum_rule):
    """The staircase passes with arbitrary nodes and weights compute captum's rule
    (float64, several passes: a small batch). captum's trapezoid weighs its n nodes
    linspace(0, 1, n) by 1/n (halved at both ends), which sums to (n - 1)/n: times
    n/(n - 1) it is the trapezoid rule (5 nodes: exact in captum's float32 linspace)."""
    tiny = tiny_model("gemma3")
    m64 = wrap(copy.deepcopy(tiny.hf).double(), tiny.tokenizer, name="tiny-f64", check=False)
    n = 5 if rule == "trapezoid" else 6
    ours = attribute(m64, (PROMPT, ANSWER), method, n_steps=n, rule=rule, internal_batch_size=4,
                     progress=False)
    ref = _captum_raw(m64, ours, method, captum_rule, n)
    if rule == "trapezoid" and method == "ig":  # sig and amig: the normalization cancels it
        ref = ref * n / (n - 1)
    # captum multiplies the gradients by its step sizes in float32 (1e-8 relative); a wrong
    # node or weight moves the map by more than 1e-3
    assert float((ours.scores - ref).abs().max() / ref.abs().max()) < 1e-7


@pytest.mark.parametrize("rule", RULES)
def test_batch_size_and_target_all_do_not_change_a_rule(rule):
    model = tiny_model("llama")
    for target in ("first", "all"):
        q = (PROMPT, "portuguese spanish") if target == "all" else (PROMPT, ANSWER)
        one = attribute(model, q, "amig", n_steps=5, rule=rule, target=target,
                        internal_batch_size=1, progress=False)
        many = attribute(model, q, "amig", n_steps=5, rule=rule, target=target,
                         internal_batch_size=10_000, progress=False)
        assert float((one.scores - many.scores).abs().max() / many.scores.abs().max()) < 1e-5
        # a gap is |sum - delta| / |delta|: float32 noise of P (~1e-8) over small deltas
        assert torch.allclose(one.completeness_gap, many.completeness_gap, rtol=1e-3,
                              atol=1e-4)


def test_gauss_legendre_needs_fewer_points_on_a_tiny_model():
    """Against a 256-point reference, Gauss-Legendre with 8 points beats the right Riemann
    sum with 20 (on this smooth tiny model, by a factor of 5)."""
    model = tiny_model("llama")
    ref = attribute(model, (PROMPT, ANSWER), "amig", n_steps=256, rule="gausslegendre",
                    progress=False)

    def err(rule, n):
        a = attribute(model, (PROMPT, ANSWER), "amig", n_steps=n, rule=rule, progress=False)
        return float((a.scores - ref.scores).norm() / ref.scores.norm())

    r20 = err("riemann_right", 20)
    assert err("gausslegendre", 8) < r20 / 4
    assert err("trapezoid", 20) < r20 / 5


# ------------------------------------------------------------------ the benchmark
def test_benchmark_smoke(tiny_dir: Path, facts_file: Path, tmp_path: Path) -> None:
    """benchmarks/quadrature.py end to end at tiny settings: its table, the verdict and the
    JSON numbers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH.parents[1] / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out, js = tmp_path / "q.md", tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--models", str(tiny_dir), "--dataset",
         f"jsonl:{facts_file}", "--queries", "2", "--methods", "ig", "amig", "--points", "4",
         "20", "--reference-points", "32", "--out", str(out), "--json", str(js)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(js.read_text())
    assert len(rec["cells"]) == 2 * 2 * len(RULES) * 2
    assert {r["rule"] for r in rec["rows"]} == set(RULES)
    assert all(0 <= c["jaccard"] <= 1 and c["err"] >= 0 for c in rec["cells"])
    text = out.read_text()
    assert "| ig | gausslegendre | 4 |" in text and "Riemann-20 err" in text
    # more points, smaller error (median over the queries)
    rows = {(r["method"], r["rule"], r["points"]): r["err"] for r in rec["rows"]}
    for method in ("ig", "amig"):
        for rule in RULES:
            assert rows[method, rule, 20] <= rows[method, rule, 4]
