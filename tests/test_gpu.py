"""The CUDA path: equal to CPU in float32, bfloat16 within the documented bounds, memory
sized by ``--memory-gb`` on the device, and a tiny ``knowloc reproduce`` on cuda. Every test
skips without a CUDA device (``benchmarks/gpu_check.sh`` runs them on a GPU machine)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_precision import agreement, check_bounds

from knowloc import attribute, load_model
from knowloc.attribution import auto_batch_size
from knowloc.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QUERIES = [("The official language of Brazil is", "Portuguese"),
           ("The capital of France is", "Paris"),
           ("Alan Turing works in the field of", "mathematics")]


@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
def test_cuda_float32_equals_cpu_float32(method: str) -> None:
    cpu = load_model("gemma3-270m")
    gpu = load_model("gemma3-270m", device="cuda")
    for q in QUERIES:
        a = attribute(cpu, q, method, n_steps=20, progress=False)
        b = attribute(gpu, q, method, n_steps=20, progress=False)
        assert b.scores.device.type == "cpu" and b.scores.dtype == torch.float32
        scale = float(a.scores.abs().max())
        assert float((a.scores - b.scores).abs().max()) <= 1e-4 * scale, (method, q)
        assert b.prob == pytest.approx(a.prob, rel=1e-4) and a.top1 == b.top1


def test_cuda_bfloat16_agrees_with_float32() -> None:
    ref = load_model("gemma3-270m", device="cuda")
    half = load_model("gemma3-270m", device="cuda", dtype="bfloat16")
    check_bounds(agreement(ref, half, QUERIES, ("ig", "sig", "amig"), 20))


def test_memory_budget_bounds_device_memory() -> None:
    """The rows of a pass are sized by ``memory_budget_gb`` and live in device memory: the
    peak above the loaded model stays within the budget, and a larger budget uses more."""
    model = load_model("gemma3-270m", device="cuda")
    q = QUERIES[0]
    peaks = {}
    for gb in (0.125, 0.5):
        attribute(model, q, "ig", n_steps=20, memory_budget_gb=gb, progress=False)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        attribute(model, q, "ig", n_steps=20, memory_budget_gb=gb, progress=False)
        torch.cuda.synchronize()
        peaks[gb] = (torch.cuda.max_memory_allocated() - before) / 2**30
        assert peaks[gb] <= 1.25 * gb, (gb, peaks[gb])
    n = len(model.encode_prompt(q[0]))
    assert auto_batch_size(model, n, 0.125) < auto_batch_size(model, n, 0.5)
    assert peaks[0.125] < peaks[0.5]


def test_tiny_reproduce_on_cuda(tiny_dir, facts_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig", "--n-steps", "3", "--population", "all", "--device", "cuda",
                 "--out", str(out)]) == 0
    assert (out / "report.html").exists()
    q = pd.read_parquet(out / "queries.parquet")
    assert len(q) == 2 * 4 + 2 * 3 and not q.duplicated(["method", "query_id"]).any()
