"""Half-precision attributions (CPU): float32 scores, agreement with float32 within the bounds
the README documents, float16 gradients that do not underflow, and batch sizing per dtype."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from tiny import tiny_model

from knowloc import attribute, load_model
from knowloc.attribution import auto_batch_size
from knowloc.models import Model, wrap

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "precision.py"
PROMPT, ANSWER = "the official language of brazil is", "portuguese"

#: The bounds the README documents for bfloat16 against float32 (means over queries).
# |ΔP| reaches 1.2e-2 on Gemma with a CPU's native bfloat16 kernels (docs/gpu.md)
TOP20_MEAN, JACCARD_MEAN, MAX_DPROB = 0.85, 0.75, 2e-2


def load_bench() -> ModuleType:
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_precision", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def cast(model: Model, dtype: torch.dtype) -> Model:
    return wrap(copy.deepcopy(model.hf).to(dtype), model.tokenizer, name=f"{model.name}-{dtype}",
                check=False)


def agreement(ref: Model, half: Model, queries: list[Any], methods: tuple[str, ...],
              n_steps: int) -> dict[str, dict[str, Any]]:
    bench = load_bench()
    out = {}
    for method in methods:
        rows = []
        for q in queries:
            a = attribute(ref, q, method, n_steps=n_steps, progress=False)
            b = attribute(half, q, method, n_steps=n_steps, progress=False)
            assert b.scores.dtype == torch.float32 and b.activations.dtype == torch.float32
            rows.append(bench.compare(a, b))
        out[method] = bench.summarize(rows)
    return out


def check_bounds(summary: dict[str, dict[str, Any]]) -> None:
    for method, s in summary.items():
        assert s["all_finite"], method
        assert s["top_overlap_mean"] >= TOP20_MEAN, (method, s)
        assert s["jaccard_mean"] >= JACCARD_MEAN, (method, s)
        assert s["max_dprob"] <= MAX_DPROB, (method, s)
        assert s["known_agrees"] == s["queries"], (method, s)


def test_compare_against_hand_computed_numbers() -> None:
    bench = load_bench()
    ref = attribute(tiny_model("llama"), (PROMPT, ANSWER), "ig", n_steps=3, progress=False)
    other = copy.deepcopy(ref)
    s = ref.scores.clone()
    flat = s.flatten()
    top = int(flat.argmax())
    other.scores = s.clone()
    other.scores.view(-1)[top] = 0.0  # the top neuron drops out of both sets
    other.prob = ref.prob + 0.01
    c = bench.compare(ref, other)
    assert c["rel_error"] == pytest.approx(1.0)  # |diff| = the map's max at the top neuron
    assert c["top_overlap"] == pytest.approx(19 / 20)
    o = other.scores.flatten()
    kn_a = set(torch.nonzero(flat > 0.2 * flat.max()).flatten().tolist())
    kn_b = set(torch.nonzero(o > 0.2 * o.max()).flatten().tolist())
    assert top in kn_a and top not in kn_b
    assert c["jaccard"] == pytest.approx(len(kn_a & kn_b) / len(kn_a | kn_b))
    assert c["dprob"] == pytest.approx(0.01)
    assert c["known_agrees"] and c["finite"]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("cap", [None, 0.5])
def test_the_head_multiplies_in_float32_on_a_cpu_without_bfloat16_kernels(
        monkeypatch: pytest.MonkeyPatch, cap: float | None) -> None:
    """Without bfloat16 kernels (``KNOWLOC_CPU_BF16=0``) the fused head multiplies the
    bfloat16 unembedding and hidden states in float32: P(target) and dP/dh equal a float64
    softmax of the same bfloat16 values, differentiated by autograd, to float32 rounding,
    and closer than the bfloat16 products (``=1``) come."""
    from knowloc.attribution import head as H

    monkeypatch.setattr(H, "HEAD_BLOCK", 7)  # many vocabulary blocks, a partial last one
    m = cast(tiny_model("gemma3"), torch.bfloat16)
    m.hf.config.final_logit_softcapping = cap
    W = m.unembedding_matrix()
    torch.manual_seed(2)
    hidden = (torch.randn(6, W.shape[1]) * 3).to(torch.bfloat16)
    errors: dict[str, list[float]] = {"0": [], "1": []}
    for flag, mm in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv("KNOWLOC_CPU_BF16", flag)
        assert H.matmul_dtype(m, hidden.device) == mm
        for target in (0, 11, W.shape[0] - 1):
            p, g, top = H.target_prob_grad(m, hidden, target, max_rows=4, argmax_row=2)[:3]
            assert p.dtype == g.dtype == torch.float32
            h = hidden.double().requires_grad_(True)
            z = h @ W.double().t()
            z = torch.tanh(z / cap) * cap if cap else z
            ref_p = torch.softmax(z, -1)[:, target]
            (ref_g,) = torch.autograd.grad(ref_p.sum(), h)
            errors[flag].append(max(rel_err(p, ref_p.detach()), rel_err(g, ref_g)))
            if flag == "0":  # the top logit (ties at float32 rounding under a small cap)
                z2 = z[2].detach()
                assert top is not None and float(z2[top]) >= float(z2.max()) - 1e-6
    assert max(errors["0"]) < 1e-5, errors
    assert max(errors["0"]) < max(errors["1"]), errors


@pytest.mark.parametrize("cpu_bf16", ["0", "1"])
@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_bfloat16_tiny_model_agrees_with_float32(arch: str, cpu_bf16: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the README's bounds, with the fused head's products in bfloat16 (a CPU with
    bfloat16 kernels) and in float32 (one without)."""
    monkeypatch.setenv("KNOWLOC_CPU_BF16", cpu_bf16)
    m = tiny_model(arch)
    queries = [(PROMPT, ANSWER), ("the capital of france is", "paris"),
               ("tokyo is the capital of", "japan")]
    check_bounds(agreement(m, cast(m, torch.bfloat16), queries, ("ig", "sig", "amig"), 8))


@pytest.mark.slow
def test_float16_gradients_of_an_unlikely_answer_do_not_underflow() -> None:
    """SmolLM2 gives "logic" P ~ 1.5e-8 here: dP/dh (~1e-8) is below float16's smallest value
    (~6e-8). Unscaled, the float16 backward pass gave an all-zero SIG map; scaled (a power
    of two, undone in float32) it agrees with float32."""
    q = ("The expertise of Alan Turing is", "logic")
    ref = attribute(load_model("smollm2-135m"), q, "sig", n_steps=4, progress=False)
    assert ref.prob < 1e-7 and float(ref.scores.abs().max()) > 0
    half = attribute(load_model("smollm2-135m", dtype="float16"), q, "sig", n_steps=4,
                     progress=False)
    assert half.scores.dtype == torch.float32
    c = load_bench().compare(ref, half)
    assert c["top_overlap"] >= 0.9 and c["jaccard"] >= 0.8 and c["rel_error"] < 0.05, c


def test_batch_size_follows_the_budget_and_the_dtype_not_the_device() -> None:
    """``--memory-gb`` sizes the rows of a pass from the model's shape and dtype; the rows
    live where the model does (device memory on a GPU), so the size is the same there."""
    m = tiny_model("llama")
    b32 = auto_batch_size(m, 8, 0.01)
    assert auto_batch_size(m, 8, 0.02) in (2 * b32, 2 * b32 + 1)
    assert auto_batch_size(cast(m, torch.bfloat16), 8, 0.01) in (2 * b32, 2 * b32 + 1)
    meta = wrap(copy.deepcopy(m.hf).to("meta"), m.tokenizer, name="meta", check=False)
    assert meta.device.type == "meta" and auto_batch_size(meta, 8, 0.01) == b32
    # one row per layer it joins: keys/values of the prompt and the pushed position, and the
    # activations kept for the backward pass (12 d_model + 8 d_mlp per position), float32
    per_row = (12 * m.d_model + 8 * m.d_mlp + 2 * 8 * m.d_model) * 4
    assert b32 == int(0.01 * 2**30 // (per_row * (m.n_layers + 1) // 2))


@pytest.mark.slow
def test_bfloat16_embedded_gemma_agrees_with_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's bounds on the embedded Gemma: two queries, IG/SIG/AMIG, 4 steps, with the
    fused head's products in float32 (what a CPU without bfloat16 kernels runs).

    Sized to stay short where bfloat16 is slow (a CPU with AVX2 only: the model's own
    products run many times slower than in float32); ``benchmarks/precision.py`` makes the
    full comparison (12 ParaRel queries, 20 steps, both embedded models)."""
    monkeypatch.setenv("KNOWLOC_CPU_BF16", "0")
    ref = load_model("gemma3-270m")
    half = load_model("gemma3-270m", dtype="bfloat16")
    queries = [("The official language of Brazil is", "Portuguese"),
               ("The capital of France is", "Paris")]
    check_bounds(agreement(ref, half, queries, ("ig", "sig", "amig"), 4))
