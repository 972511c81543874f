"""Attention: eager switch, capture, predominance, knowledge synapses, scaling (METHODS §5).

Tiny random GPT-2 / LLaMA / Gemma 3 (and GPT-NeoX) models; the scaling checks compare with a
hand computation of one head from the attention module's own q/k/v weights. The real-model
checks (embedded Gemma 3 270M) are marked slow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from tiny import tiny_model

from knowloc.errors import ConfigError, KnowlocError
from knowloc.interventions.attention import (
    AttentionImplementationError,
    activation_matrix,
    attention_map,
    eager_attention,
    heatmap_frame,
    record_attention,
    scale_attention,
    synapse_effect,
    synapse_effects,
    synapse_experiment,
)
from knowloc.interventions.attention import hooks as A
from knowloc.models.forward import prompt_activations, prompt_probs
from knowloc.synapses import (
    AttentionMap,
    SynapseSet,
    knowledge_synapses,
    mean_activation,
    most_attended,
    predominance,
    predominance_both,
    received_attention,
    signed_relative_change,
)

PROMPT = "the official language of brazil is"
OTHER = "people in japan speak the language known as"  # longer: its synapses get clipped
ARCHS = ("gpt2", "llama", "gemma3", "gpt_neox")
HAND_ARCHS = ("gpt2", "llama", "gemma3")


@pytest.fixture(scope="module")
def models():
    return {a: tiny_model(a) for a in ARCHS}


def _logits(model, prompt=PROMPT):
    ids = torch.tensor([model.encode_prompt(prompt)])
    with torch.no_grad():
        return model.hf(input_ids=ids, use_cache=False).logits[0]


def _nothing_left_behind(model):
    assert not A._INTERCEPTORS and not A._PATCHES
    for l in range(model.n_layers):
        att = model.attention(l)
        hooks = list(att._forward_hooks.values()) + list(att._forward_pre_hooks.values())
        assert not [h for h in hooks if "_intercept" in getattr(h, "__qualname__", "")]
        ns = A._namespace_of(att)
        assert not hasattr(ns[A.EAGER_ATTENTION_NAME], "__wrapped__")


# ============================================================= eager switch / errors
@pytest.mark.parametrize("arch", ARCHS)
def test_eager_attention_switches_and_restores(models, arch):
    m = models[arch]
    assert A.attention_implementation(m) == "sdpa"
    with eager_attention(m):
        assert A.attention_implementation(m) == "eager"
        with eager_attention(m):  # nested: a no-op
            assert A.attention_implementation(m) == "eager"
        assert A.attention_implementation(m) == "eager"
    assert A.attention_implementation(m) == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), eager_attention(m):
        raise RuntimeError("boom")
    assert A.attention_implementation(m) == "sdpa"


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_kernel_is_an_error_not_a_no_op(models, arch):
    m = models[arch]
    with (
        pytest.raises(AttentionImplementationError, match="eager_attention"),
        scale_attention(m, [(1, 0, 0)], 0.0),
    ):
        pass
    with pytest.raises(AttentionImplementationError, match="sdpa"), record_attention(m):
        pass
    assert issubclass(AttentionImplementationError, KnowlocError)
    # switching to a fused kernel inside the block: the forward raises, nothing silent
    with eager_attention(m), scale_attention(m, [(1, 0, 0)], 0.0):
        m.hf.set_attn_implementation("sdpa")
        try:
            with pytest.raises(AttentionImplementationError, match="did not go through eager"):
                _logits(m)
        finally:
            m.hf.set_attn_implementation("eager")
    _nothing_left_behind(m)


# ============================================================================ capture
@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_weights_equal_output_attentions(models, arch):
    m = models[arch]
    ids = torch.tensor([m.encode_prompt(PROMPT)])
    with eager_attention(m):
        with torch.no_grad():
            ref = m.hf(input_ids=ids, output_attentions=True, use_cache=False).attentions
        amap = attention_map(m, PROMPT)
    assert amap.weights.shape == (m.n_layers, 4, ids.shape[1], ids.shape[1])
    for l in range(m.n_layers):
        torch.testing.assert_close(amap.weights[l], ref[l][0].float(), rtol=0, atol=0)
    # causal softmax rows sum to 1
    torch.testing.assert_close(amap.weights.sum(-1), torch.ones(m.n_layers, 4, ids.shape[1]))
    last = attention_map(m, PROMPT, rows="last")
    torch.testing.assert_close(last.weights[:, :, 0], amap.weights[:, :, -1], rtol=0, atol=0)
    assert A.attention_implementation(m) == "sdpa"
    assert amap.tokens[-1] == "is" and amap.token_ids == tuple(ids[0].tolist())
    _nothing_left_behind(m)


# ============================================================== hand-made definitions
def _hand_map() -> torch.Tensor:
    """L=2, H=2, R=C=3 causal attention, every row sums to 1."""
    w = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    w[0, 0] = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.2, 0.6]])
    w[0, 1] = torch.tensor([[1, 0, 0], [0.9, 0.1, 0], [0.1, 0.75, 0.15]])
    w[1, 0] = torch.tensor([[1, 0, 0], [0.3, 0.7, 0], [0.3, 0.3, 0.4]])
    w[1, 1] = torch.tensor([[1, 0, 0], [0.2, 0.8, 0], [0.0, 0.05, 0.95]])
    return w


def test_received_attention_is_column_sum():
    w = _hand_map()
    got = received_attention(w)
    assert got.shape == (2, 2, 3)
    assert got[0, 0].tolist() == pytest.approx([1.7, 0.7, 0.6])
    assert got[0, 1].tolist() == pytest.approx([2.0, 0.85, 0.15])
    assert got[1, 0].tolist() == pytest.approx([1.6, 1.0, 0.4])
    assert got[1, 1].tolist() == pytest.approx([1.2, 0.85, 0.95])


def test_most_attended_by_hand():
    w = _hand_map()
    # mean over (l, h) of the column sums: [6.5, 3.4, 2.1] / 4
    assert most_attended(w) == 0
    assert most_attended(w, skip_first=True) == 1
    assert most_attended(w[0, 0]) == 0  # a single [R, C] map
    assert most_attended(w[:, :, :, :1], skip_first=True) is None  # one token, no candidate
    # ties go to the earlier position
    tie = torch.full((1, 1, 2, 3), 1 / 3)
    assert most_attended(tie, skip_first=True) == 1


def test_predominance_by_hand():
    w = _hand_map()
    # query b: the third column dominates once the first is skipped
    wb = w.clone()
    wb[:, :, 2] = torch.tensor([0.1, 0.1, 0.8])
    maps = [
        AttentionMap(w, (2, 7, 9), ("<bos>", " Brazil", " is")),
        AttentionMap(w, (2, 8, 9), ("<bos>", "Brazil", " is")),  # same word, no space
        AttentionMap(wb, (2, 5, 6), ("<bos>", " language", " Brazil")),
    ]
    # map b, column sums summed over heads: position 1: 0.6 + 0.2 + 0.8 + 0.9 = 2.5, position 2: 3.2
    assert most_attended(wb, skip_first=True) == 2
    with_first = predominance(maps)
    assert with_first.score == 1.0 and with_first.token == "<bos>"
    without = predominance(maps, skip_first=True)
    assert without.positions == (1, 1, 2)
    assert without.tokens == ("Brazil", "Brazil", "Brazil")  # stripped text agrees
    assert without.score == 1.0 and without.n_queries == 3
    # a third query whose most attended token differs: P = 2/3
    maps[2] = AttentionMap(wb, (2, 5, 6), ("<bos>", " language", " spoken"))
    without = predominance(maps, skip_first=True)
    assert without.score == pytest.approx(2 / 3) and without.token == "Brazil"
    both = predominance_both(maps)
    assert both["with_first"].score == 1.0 and both["without_first"].score == pytest.approx(2 / 3)
    # ids are compared when there are no token texts
    assert predominance([AttentionMap(w, (2, 7, 9)), AttentionMap(w, (2, 8, 9))], skip_first=True).score == 0.5
    # no query with a candidate: NaN
    one = AttentionMap(w[:, :, :1, :1], (2,), ("<bos>",))
    assert math.isnan(predominance([one], skip_first=True).score)


def test_knowledge_synapses_by_hand():
    w = _hand_map()
    # Σ over r, c of every (l, h) is R = 3; tau = alpha * mean = 0.3 * 3 = 0.9
    s = knowledge_synapses(w)
    assert s.tau == pytest.approx(0.9)
    # column sums > 0.9: (l0,h0): c0 1.7; (l0,h1): c0 2.0; (l1,h0): c0 1.6, c1 1.0;
    # (l1,h1): c0 1.2, c2 0.95 (0.85 is below)
    assert set(s) == {(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 1, 0), (0, 1, 1), (2, 1, 1)}
    assert list(s) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 1, 0), (0, 1, 1), (2, 1, 1)]
    assert (s.n_layers, s.n_heads, s.n_positions, s.alpha) == (2, 2, 3, 0.3)
    # alpha = 0.5 -> tau = 1.5
    assert set(knowledge_synapses(w, alpha=0.5)) == {(0, 0, 0), (0, 0, 1), (0, 1, 0)}
    # tau uses the sum of the whole map, not R: halve one head and tau drops
    w2 = w.clone()
    w2[1, 1] *= 0.5
    assert knowledge_synapses(w2).tau == pytest.approx(0.3 * (3 + 3 + 3 + 1.5) / 4)
    assert s.clip(1).synapses == {(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)}
    assert knowledge_synapses(w, exclude_first=True).synapses == {(1, 1, 0), (2, 1, 1)}
    assert s.by_layer() == {0: {0: [0], 1: [0]}, 1: {0: [0, 1], 1: [0, 2]}}
    frame = s.to_frame()
    assert list(frame.columns) == ["position", "layer", "head"] and len(frame) == 6
    with pytest.raises(ConfigError):
        knowledge_synapses(w[0])


# ================================================================= scaling, by hand
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def _hand_head(m, arch, layer, head, hidden, kwargs):
    """Post-softmax A [T, T] and per-position values V [T, d] of one head, from the module's
    own projection weights (no transformers attention code)."""
    att = m.attention(layer)
    x = hidden[0]
    T = x.shape[0]
    if arch == "gpt2":
        d = att.head_dim
        q, k, v = att.c_attn(x).split(att.embed_dim, dim=-1)
        sl = slice(head * d, (head + 1) * d)
        q, k, v = q[:, sl], k[:, sl], v[:, sl]
        scale = d ** -0.5
        softcap = None
    else:
        cfg = m.config
        d = cfg.head_dim if arch == "gemma3" else cfg.hidden_size // cfg.num_attention_heads
        n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        q = att.q_proj(x).view(T, -1, d)[:, head]
        k = att.k_proj(x).view(T, -1, d)[:, head // n_rep]
        v = att.v_proj(x).view(T, -1, d)[:, head // n_rep]
        if arch == "gemma3":
            q, k = att.q_norm(q), att.k_norm(k)
            scale = cfg.query_pre_attn_scalar ** -0.5
            softcap = cfg.attn_logit_softcapping
        else:
            scale = d ** -0.5
            softcap = None
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos[0], sin[0]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
    s = (q @ k.T) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s.double(), -1), v.double()


def _out_proj(m, arch, layer):
    att = m.attention(layer)
    return att.c_proj if arch == "gpt2" else att.o_proj


def _run_capturing(m, arch, layer, prompt=PROMPT):
    """Logits, the attention module's input (hidden, kwargs) and its per-head output (the
    input of the output projection) in ``layer``."""
    seen = {}

    def pre_att(mod, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = kwargs

    def pre_out(mod, args):
        seen["heads"] = args[0].detach().clone()

    h1 = m.attention(layer).register_forward_pre_hook(pre_att, with_kwargs=True)
    h2 = _out_proj(m, arch, layer).register_forward_pre_hook(pre_out)
    try:
        logits = _logits(m, prompt)
    finally:
        h1.remove()
        h2.remove()
    return logits, seen


# gemma3: layer 1 is the full-attention layer (layers 0 and 2 use a sliding window of 3)
HAND_LAYER = {"gpt2": 2, "llama": 1, "gemma3": 1}


@pytest.mark.parametrize("arch", HAND_ARCHS)
@pytest.mark.parametrize("factor", [0.0, 2.0])
def test_scaling_one_column_matches_hand_computation(models, arch, factor):
    m = models[arch]
    layer, head, col = HAND_LAYER[arch], 2, 1
    with eager_attention(m):
        base_logits, base = _run_capturing(m, arch, layer)
        with torch.no_grad():
            a, v = _hand_head(m, arch, layer, head, base["hidden"], base["kwargs"])
        with scale_attention(m, [(col, layer, head)], factor):
            new_logits, new = _run_capturing(m, arch, layer)
    d = v.shape[-1]
    sl = slice(head * d, (head + 1) * d)
    # the hand computation reproduces the unmodified head
    torch.testing.assert_close(base["heads"][0, :, sl].double(), a @ v, rtol=0, atol=1e-5)
    # the modified head: column `col` scaled, nothing renormalized
    a2 = a.clone()
    a2[:, col] *= factor
    got = new["heads"][0, :, sl].double()
    torch.testing.assert_close(got, a2 @ v, rtol=0, atol=1e-5)
    # i.e. exactly that key's contribution A[r, col] v[col] removed (x0) / added once more (x2)
    diff = got - base["heads"][0, :, sl].double()
    torch.testing.assert_close(diff, (factor - 1) * a[:, col:col + 1] * v[col], rtol=0, atol=1e-5)
    assert float(a[:, col].abs().sum()) > 1e-3  # the column carried weight
    # other heads of the layer are bit-for-bit unchanged, and so the layer input
    others = torch.ones(base["heads"].shape[-1], dtype=torch.bool)
    others[sl] = False
    assert torch.equal(new["heads"][..., others], base["heads"][..., others])
    assert torch.equal(new["hidden"], base["hidden"])
    assert (new_logits - base_logits).abs().max() > 1e-4
    _nothing_left_behind(m)


@pytest.mark.parametrize("arch", ARCHS)
def test_scaling_by_one_leaves_logits_unchanged(models, arch):
    m = models[arch]
    with eager_attention(m):
        base = _logits(m)
        syn = knowledge_synapses(attention_map(m, PROMPT))
        assert len(syn) > 0
        every = [(c, l, h) for c in range(7) for l in range(m.n_layers) for h in range(4)]
        for s in (syn, every):
            with scale_attention(m, s, 1.0):
                assert (_logits(m) - base).abs().max() <= 1e-6
        with scale_attention(m, syn, 0.0):
            assert (_logits(m) - base).abs().max() > 1e-3
    _nothing_left_behind(m)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gqa_scaling_is_per_query_head(models, arch):
    """Heads that share a key/value head (GQA) are scaled independently."""
    m = models[arch]
    layer = HAND_LAYER[arch]
    with eager_attention(m):
        _, base = _run_capturing(m, arch, layer)
        with scale_attention(m, [(1, layer, 0)], 0.0):
            _, new = _run_capturing(m, arch, layer)
    d = base["heads"].shape[-1] // 4
    assert not torch.equal(new["heads"][..., :d], base["heads"][..., :d])
    assert torch.equal(new["heads"][..., d:], base["heads"][..., d:])  # head 1 shares kv head 0


def test_rows_last_touches_only_the_last_row(models):
    m, arch = models["llama"], "llama"
    layer, head = 1, 3
    with eager_attention(m):
        _, base = _run_capturing(m, arch, layer)
        with scale_attention(m, [(1, layer, head)], 0.0, rows="last"):
            _, new = _run_capturing(m, arch, layer)
    d = base["heads"].shape[-1] // 4
    sl = slice(head * d, (head + 1) * d)
    assert torch.equal(new["heads"][0, :-1], base["heads"][0, :-1])
    assert not torch.equal(new["heads"][0, -1, sl], base["heads"][0, -1, sl])
    bad_rows: Any = "first"
    with pytest.raises(ConfigError), eager_attention(m), scale_attention(m, [(1, 0, 0)], 0, rows=bad_rows):
        pass


def test_recorded_weights_show_the_scaling(models):
    m = models["gemma3"]
    last = m.n_layers - 1  # earlier layers' weights would change through their inputs
    with eager_attention(m):
        base = attention_map(m, PROMPT)
        with scale_attention(m, [(2, last, 0), (0, last, 3)], 0.0), record_attention(m) as rec:
            _logits(m)
    got = torch.stack([rec[l][0] for l in range(m.n_layers)])
    want = base.weights.clone()
    want[last, 0, :, 2] = 0
    want[last, 3, :, 0] = 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_out_of_range_synapses_are_clipped(models):
    m = models["llama"]
    n = len(m.encode_prompt(PROMPT))
    with eager_attention(m):
        base = _logits(m)
        with scale_attention(m, [(n, 0, 0), (n + 5, 2, 1)], 0.0):
            assert torch.equal(_logits(m), base)
        found = knowledge_synapses(attention_map(m, OTHER))
        assert found.n_positions > n
        # late columns rarely pass tau (few rows see them): add some beyond this prompt
        other = SynapseSet(found.synapses | {(n, 1, 0), (n + 1, 2, 3)}, found.n_positions, 3, 4)
        clipped = other.clip(n)
        assert all(c < n for c, _, _ in clipped) and clipped.n_positions == n
        with scale_attention(m, other, 0.0):
            a = _logits(m)
        with scale_attention(m, clipped, 0.0):
            b = _logits(m)
        assert torch.equal(a, b) and not torch.equal(a, base)
    with (
        pytest.raises(ConfigError, match="layer"),
        eager_attention(m),
        scale_attention(m, [(0, 99, 0)], 0.0),
    ):
        pass
    with pytest.raises(ConfigError), eager_attention(m), scale_attention(m, [(0, 0, 4)], 0):
        pass


@pytest.mark.parametrize("arch", HAND_ARCHS)
def test_restored_after_an_exception(models, arch):
    m = models[arch]
    base = _logits(m)  # sdpa
    syn = [(0, l, h) for l in range(m.n_layers) for h in range(4)]
    with (
        pytest.raises(ValueError, match="inside"),
        eager_attention(m),
        scale_attention(m, syn, 0.0),
        record_attention(m),
    ):
        _logits(m)
        raise ValueError("inside")
    assert A.attention_implementation(m) == "sdpa"
    _nothing_left_behind(m)
    torch.testing.assert_close(_logits(m), base, rtol=0, atol=0)
    # an error raised inside the forward (bad hook) also restores everything
    with (
        pytest.raises(RuntimeError, match="in forward"),
        eager_attention(m),
        scale_attention(m, syn, 0.0),
    ):
        def bad(_l, h):
            raise RuntimeError("in forward")

        with m.hook_activations(bad, [0]):
            _logits(m)
    _nothing_left_behind(m)
    torch.testing.assert_close(_logits(m), base, rtol=0, atol=0)


def test_scopes_are_per_model_and_nest(models):
    """Two models of one architecture share the patched function; only the one scoped is
    affected, and nested scopes compose (x0 inside x2 of the same column: x0)."""
    m = models["gpt2"]
    twin = tiny_model("gpt2", seed=1)
    with eager_attention(m), eager_attention(twin):
        base_m, base_t = _logits(m), _logits(twin)
        with scale_attention(m, [(0, l, h) for l in range(3) for h in range(4)], 0.0):
            assert not torch.equal(_logits(m), base_m)
            assert torch.equal(_logits(twin), base_t)
            with scale_attention(twin, [(1, 0, 0)], 1.0):
                assert torch.equal(_logits(twin), base_t)
        assert torch.equal(_logits(m), base_m)
        with scale_attention(m, [(1, 2, 0)], 2.0), scale_attention(m, [(1, 2, 0)], 0.0):
            nested = _logits(m)
        with scale_attention(m, [(1, 2, 0)], 0.0):
            single = _logits(m)
        torch.testing.assert_close(nested, single, rtol=1e-5, atol=1e-5)  # float32 summation order
    _nothing_left_behind(m)


# ============================================================================ metrics
def test_signed_relative_change_and_mean_activation():
    assert signed_relative_change(2.0, 1.0, 0.0) == pytest.approx(0.5)  # suppression: drop > 0
    assert signed_relative_change(2.0, 3.0, 2.0) == pytest.approx(0.5)  # enhancement: rise > 0
    assert signed_relative_change(-2.0, -1.0, 2.0) == pytest.approx(0.5)  # |before|
    assert math.isnan(signed_relative_change(0.0, 1.0, 0.0))
    acts = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert mean_activation(acts, [(0, 2), (1, 0)]) == pytest.approx(3.5)
    assert math.isnan(mean_activation(acts, []))


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_synapse_effect(models, arch):
    m = models[arch]
    syn = knowledge_synapses(attention_map(m, PROMPT))
    kns = [(0, 1), (2, 5), (1, 7)]
    same = synapse_effect(m, PROMPT, "portuguese", syn, 1.0, kns)
    assert same.delta_value == 0 and same.delta_prob == 0 and same.n_synapses == len(syn)
    eff = synapse_effect(m, PROMPT, "portuguese", syn, 0.0, kns)
    acts = prompt_activations(m, m.encode_prompt(PROMPT))
    p = float(prompt_probs(m, [PROMPT])[0, m.answer_ids(PROMPT, "portuguese")[0]])
    assert eff.value_before == pytest.approx(mean_activation(acts, kns), rel=1e-5, abs=1e-6)
    assert eff.prob_before == pytest.approx(p, rel=1e-5)
    assert eff.delta_prob == pytest.approx(-(eff.prob_after - eff.prob_before) / eff.prob_before)
    with eager_attention(m), scale_attention(m, syn, 0.0):
        after = prompt_activations(m, m.encode_prompt(PROMPT))
    assert eff.value_after == pytest.approx(mean_activation(after, kns), rel=1e-5, abs=1e-6)
    assert eff.delta_value != 0
    # an unrelated, longer query's synapses are clipped and counted
    n = len(m.encode_prompt(PROMPT))
    other = sorted(knowledge_synapses(attention_map(m, OTHER))) + [(n, 0, 0), (n + 1, 1, 2)]
    eff2 = synapse_effect(m, PROMPT, "portuguese", other, 0.0, kns)
    assert eff2.n_clipped == 2
    assert eff2.n_synapses + eff2.n_clipped == len(other)
    table = synapse_experiment(m, PROMPT, "portuguese", kns, syn, other)
    assert list(table[["synapses", "operation"]].itertuples(index=False, name=None)) == [
        ("self", "sup"), ("self", "enh"), ("irrelevant", "sup"), ("irrelevant", "enh")
    ]
    assert table.loc[0, "delta_prob"] == pytest.approx(eff.delta_prob)
    assert A.attention_implementation(m) == "sdpa"


def test_heatmap_frame(models):
    m = models["llama"]
    frame = heatmap_frame(m, [PROMPT, OTHER], conditions=("none", "suppress", "enhance"),
                          labels=["brazil", "japan"], neurons=slice(0, 10))
    assert list(frame.columns) == ["query", "prompt", "condition", "layer", "neuron", "activation"]
    assert len(frame) == 2 * 3 * m.n_layers * 10
    none = frame[(frame["query"] == "brazil") & (frame["condition"] == "none")]
    want = prompt_activations(m, m.encode_prompt(PROMPT))[:, :10].numpy().reshape(-1)
    np.testing.assert_allclose(none["activation"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    sup = frame[(frame["query"] == "brazil") & (frame["condition"] == "suppress")]
    syn = knowledge_synapses(attention_map(m, PROMPT))
    np.testing.assert_allclose(
        sup["activation"].to_numpy(),
        activation_matrix(m, PROMPT, synapses=syn, factor=0.0)[:, :10].numpy().reshape(-1),
        rtol=0, atol=0,
    )
    assert not np.allclose(sup["activation"].to_numpy(), none["activation"].to_numpy())
    with pytest.raises(ConfigError):
        heatmap_frame(m, [PROMPT], conditions=("sideways",))


# ===================================================================== real model (slow)
REAL_FACTS = 8


@pytest.fixture(scope="module")
def gemma_known(gemma):
    """The first known fact (top-1 on its first query) of each of the first relations of
    the built-in set."""
    from knowloc import load_facts

    facts, seen = [], set()
    for f in load_facts("builtin").facts:
        if f.relation in seen:
            continue
        q = f.queries[0]
        if int(prompt_probs(gemma, [q.prompt])[0].argmax()) == gemma.answer_ids(q.prompt, q.answer)[0]:
            facts.append(f)
            seen.add(f.relation)
        if len(facts) == REAL_FACTS:
            break
    return facts


def _own_vs_irrelevant(gemma, facts, drop_first: bool):
    own, irr = [], []
    for i, f in enumerate(facts):
        q, other = f.queries[0], facts[(i + 1) % len(facts)].queries[0]
        s_own = knowledge_synapses(attention_map(gemma, q.prompt), exclude_first=drop_first)
        s_irr = knowledge_synapses(attention_map(gemma, other.prompt), exclude_first=drop_first)
        for s, out in ((s_own, own), (s_irr, irr)):
            e = synapse_effect(gemma, q.prompt, q.answer, s, 0.0, [])
            out.append(abs(e.prob_after - e.prob_before) / e.prob_before)
    return np.array(own), np.array(irr)


@pytest.mark.slow
def test_gemma_sink_dominates_synapses(gemma, gemma_known):
    """With METHODS §5's definition, Gemma 3 270M's synapses are almost all the first
    (BOS / sink) position, one per head, and suppressing them (own or an unrelated query's)
    wipes out P(answer) either way: the own-vs-unrelated comparison saturates (both ~1)."""
    own, irr = _own_vs_irrelevant(gemma, gemma_known, drop_first=False)
    first = [knowledge_synapses(attention_map(gemma, f.queries[0].prompt)) for f in gemma_known]
    heads = gemma.n_layers * gemma.config.num_attention_heads
    share_first = np.mean([sum(c == 0 for c, _, _ in s) / len(s) for s in first])
    print(f"\nsynapses per query {np.mean([len(s) for s in first]):.1f} ({heads} heads), "
          f"share at position 0 {share_first:.3f}; |dP|/P own {own.mean():.4f} "
          f"unrelated {irr.mean():.4f} over {len(own)} facts")
    assert share_first > 0.9
    assert own.mean() > 0.9 and irr.mean() > 0.9


@pytest.mark.slow
def test_gemma_own_synapses_matter_more_than_unrelated_ones(gemma, gemma_known):
    """Paper §3.2.2 (Figure 6, ΔProb of Sup): suppressing a query's own synapses changes
    P(answer) more than suppressing an unrelated fact's, on average. Measured with the
    first (sink) position left out, where the comparison is not saturated (see above)."""
    own, irr = _own_vs_irrelevant(gemma, gemma_known, drop_first=True)
    print(f"\nwithout position 0: |dP|/P own {own.mean():.4f} unrelated {irr.mean():.4f} "
          f"(per fact own {np.round(own, 3).tolist()} unrelated {np.round(irr, 3).tolist()})")
    assert own.mean() > irr.mean()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_synapse_effects_share_one_unscaled_forward(models, arch):
    """Several manipulations on several neuron sets: one unscaled forward plus one per
    manipulation, each number equal to the manipulation done by hand."""
    m = models[arch]
    ids = m.encode_prompt(PROMPT)
    answer = m.answer_ids(PROMPT, "portuguese")[:1]
    syn = knowledge_synapses(attention_map(m, PROMPT))
    other = knowledge_synapses(attention_map(m, PROMPT), exclude_first=True)
    variants = [(syn, 0.0), (syn, 2.0), (other, 0.0)]
    sets = [[(0, 1), (2, 5)], [(1, 7)], []]
    calls = []
    handle = m.base_model().register_forward_hook(lambda *a: calls.append(1))
    try:
        effects = synapse_effects(m, ids, answer, variants, sets)
    finally:
        handle.remove()
    assert len(calls) == 1 + len(variants)
    with eager_attention(m):
        acts_b = prompt_activations(m, ids)
        p_b = float(prompt_probs(m, [ids])[0, answer[0]])
        for (s_v, factor), by_set in zip(variants, effects):
            with scale_attention(m, s_v, factor):
                acts_a = prompt_activations(m, ids)
                p_a = float(prompt_probs(m, [ids])[0, answer[0]])
            for kns, e in zip(sets, by_set):
                assert e.factor == factor and e.n_neurons == len(kns)
                assert e.prob_before == pytest.approx(p_b, rel=1e-6)
                assert e.prob_after == pytest.approx(p_a, rel=1e-6)
                if kns:
                    assert e.value_before == pytest.approx(mean_activation(acts_b, kns),
                                                           rel=1e-5, abs=1e-6)
                    assert e.value_after == pytest.approx(mean_activation(acts_a, kns),
                                                          rel=1e-5, abs=1e-6)
                else:
                    assert math.isnan(e.value_before)
